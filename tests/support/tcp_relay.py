"""A TCP relay a test puts between the stack and a server, to make the server go away.

To a client, cutting the relay is what a stopped or restarting server looks like (every
connection reset, new ones refused), and a black hole is a hung one (connections accepted
and never answered), without stopping the real server other tests share. The usual use is
the test PostgreSQL: `relay_to_test_database()` and `relayed_database_url(relay)`.
"""

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator

from django.db import connection

from tests.support.gateway import database_env
from tests.support.processes import free_port


class TcpRelay:
    """Forwards 127.0.0.1:port to a target until cut; can also swallow connections.

    Modes: "forward" relays bytes both ways; "cut" closes the listener and every
    relayed connection (a stopped server: refused, reset); "blackhole" accepts
    connections and never answers (a hung server or a dropped route).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._mode = "forward"
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        with self._lock:
            self._mode = "cut"
            self._close_all()

    def blackhole(self) -> None:
        with self._lock:
            self._mode = "blackhole"
            self._close_all()
        self._listen()

    def restore(self) -> None:
        with self._lock:
            self._mode = "forward"
            self._close_all()
        self._listen()

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def open_connections(self) -> int:
        """Sockets relayed right now (each connection counts its two ends)."""
        with self._lock:
            return len(self._sockets)

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            self._close_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 2
        while True:
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:
                # The old listener lives on until the accept polling it returns.
                if time.monotonic() > deadline:
                    listener.close()
                    raise
                time.sleep(0.02)
        listener.listen(64)
        listener.settimeout(0.05)
        with self._lock:
            self._listener = listener

    def _close_all(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def _serve(self) -> None:
        while not self._stopping:
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                client, _address = listener.accept()
            except (TimeoutError, OSError):
                continue
            # Closed with a reset, never gracefully: no FIN_WAIT socket may keep the
            # port from being listened on again, and the peer sees the drop at once.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    continue
                self._sockets.add(client)
                mode = self._mode
            if mode == "forward":
                threading.Thread(target=self._pump_pair, args=(client,), daemon=True).start()

    def _pump_pair(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets.add(upstream)
        peers = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            while True:
                try:
                    ready = selector.select(timeout=0.5)
                    if self._stopping:
                        return
                    for key, _events in ready:
                        source: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = source.recv(65536)
                        if not data:
                            raise ConnectionResetError
                        peers[source].setblocking(True)
                        peers[source].sendall(data)
                        peers[source].setblocking(False)
                except (OSError, ValueError):
                    with self._lock:
                        for sock in peers:
                            self._sockets.discard(sock)
                            sock.close()
                    return


@contextlib.contextmanager
def relay_to_test_database() -> Iterator[TcpRelay]:
    """A relay to the test run's PostgreSQL, for the block."""
    database = connection.settings_dict
    relay = TcpRelay((database["HOST"] or "127.0.0.1", int(database["PORT"] or 5432)))
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


def relayed_database_url(relay: TcpRelay) -> str:
    """The test database's URL (see `database_env`), through the relay."""
    url = database_env()["DATABASE_URL"]
    prefix, _, rest = url.rpartition("@")
    _hostport, _, name = rest.partition("/")
    return f"{prefix}@127.0.0.1:{relay.port}/{name}"
