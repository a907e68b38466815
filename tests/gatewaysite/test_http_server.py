"""The web server's HTTP protocol (gatewaysite/http_server.py): a response's head goes out
with its first body bytes, in one write, and nothing ever waits on that hold."""

import asyncio
import json
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest

from gatewaysite.http_server import HeadHoldingTransport
from tenants.models import Organization
from tests.conftest import IssueKey, MakeRoute
from tests.support.gateway import GatewayServer


class RecordingTransport:
    """What a response cycle writes, as the kernel would be asked to send it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.writes_after_close = 0

    def write(self, data: bytes) -> None:
        if self.closed:
            self.writes_after_close += 1
            raise RuntimeError("unable to perform operation: the handler is closed")  # as uvloop
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4321) if name == "peername" else default


def _holding() -> tuple[HeadHoldingTransport, RecordingTransport]:
    inner = RecordingTransport()
    return HeadHoldingTransport(inner, asyncio.get_running_loop()), inner  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_the_head_goes_out_in_one_write_with_the_first_body_bytes() -> None:
    transport, inner = _holding()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert inner.writes == []
    transport.write(b"first")
    transport.write(b"second")
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nfirst", b"second"]
    await asyncio.sleep(0)  # the fallback flush was called off: nothing is sent twice
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nfirst", b"second"]


@pytest.mark.asyncio
async def test_a_head_whose_body_is_late_goes_out_on_the_next_turn_of_the_loop() -> None:
    transport, inner = _holding()
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    # Only a cycle's first write is held.
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert inner.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"]


@pytest.mark.asyncio
async def test_closing_sends_a_held_head_before_the_connection_closes() -> None:
    transport, inner = _holding()
    transport.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    transport.close()
    assert inner.writes == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"]
    assert inner.closed
    await asyncio.sleep(0)
    assert (len(inner.writes), inner.writes_after_close) == (1, 0)


@pytest.mark.asyncio
async def test_a_head_held_when_the_client_goes_is_dropped_not_written() -> None:
    transport, inner = _holding()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    inner.close()  # the client disconnected within the hold
    await asyncio.sleep(0)
    transport.close()
    assert inner.writes == []
    assert inner.writes_after_close == 0


@pytest.mark.asyncio
async def test_everything_else_is_asked_of_the_real_transport() -> None:
    transport, inner = _holding()
    assert transport.get_extra_info("peername") == ("127.0.0.1", 4321)
    assert not transport.is_closing()
    inner.close()
    assert transport.is_closing()


# --- Through the served gateway (tests/support/gateway.py runs it with this protocol) ---


def _send_and_read(sock: socket.socket, data: bytes, until: bytes) -> bytes:
    sock.sendall(data)
    received = b""
    while until not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


@pytest.mark.django_db(transaction=True)
def test_a_client_expecting_100_continue_gets_it_then_its_answer(
    gateway: GatewayServer, org: Organization, make_route: MakeRoute, live_key: IssueKey
) -> None:
    """The interim "100 Continue" is its cycle's first write: held by nothing, or the
    client (which waits for it before sending the body) and the server would wait on
    each other."""
    make_route(model="continue-model", org=org)
    key = live_key(org)
    body = json.dumps(
        {"model": "continue-model", "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    address = urlsplit(gateway.base_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        interim = _send_and_read(sock, head, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        answer = _send_and_read(sock, body, b'"usage"')
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'"object":"chat.completion"' in answer
