"""A real HTTP webhook receiver on loopback, answering with scripted statuses."""

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    received_at: float  # time.monotonic()


@dataclass
class WebhookReceiver:
    """What the receiver got, in order; it answers `statuses` in turn, then the last one."""

    url: str
    statuses: list[int]
    requests: list[ReceivedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self) -> list[ReceivedRequest]:
        with self.lock:
            return list(self.requests)

    def _answer(self, request: ReceivedRequest) -> int:
        with self.lock:
            self.requests.append(request)
            index = min(len(self.requests), len(self.statuses)) - 1
            return self.statuses[index]


@contextmanager
def webhook_receiver(
    statuses: Sequence[int] = (200,), *, path: str = "/hooks/tollgate"
) -> Iterator[WebhookReceiver]:
    """Serve on 127.0.0.1 (a free port) for the block; yields the receiver with its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            request = ReceivedRequest(
                method="POST",
                path=self.path,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=self.rfile.read(length),
                received_at=time.monotonic(),
            )
            status = receiver._answer(request)
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://127.0.0.1:1/elsewhere")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host, port = server.server_address[:2]
    receiver = WebhookReceiver(url=f"http://{host}:{port}{path}", statuses=list(statuses))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
