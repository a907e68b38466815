"""uvicorn's HTTP protocol, sending each response's head together with its first body bytes.

uvicorn writes a response's head as soon as the application starts the response,
and the body in a second write: two system calls, and the client is woken twice
(on a VM, each write that wakes a process on another core costs tens of µs).
Holding the head back until the first body write, or the next turn of the event
loop at the latest, makes it one. Serve with
`uvicorn --http gatewaysite.http_server:GatewayHttpProtocol ...`; plain uvicorn
serves the same application, one write more per response.
"""

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadHoldingTransport:
    """One response's view of its connection: the first write (the head) waits for the next.

    Whatever else the response's code asks of the transport goes to the real one.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._first = True
        self._held: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            # Never held longer than this turn of the loop (an interim "100 Continue",
            # or a response whose body is late), so nothing waits on the hold.
            self._flush_handle = self._loop.call_soon(self.flush)
            return
        if self._held is not None:
            data = self._held + data
            self._release_hold()
        self._transport.write(data)

    def flush(self) -> None:
        """Send the held head now, if it is still held and the connection still open."""
        if self._held is not None:
            held = self._held
            self._release_hold()
            # The client may have gone within the hold (uvloop raises on a closed
            # transport; uvicorn itself stops writing once it sees the disconnect).
            if not self._transport.is_closing():
                self._transport.write(held)

    def _release_hold(self) -> None:
        self._held = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """httptools, with each request's response cycle writing through a HeadHoldingTransport."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # The cycle's task is scheduled, not started: its first write comes after this.
        if cycle is not None and not isinstance(cycle.transport, HeadHoldingTransport):
            cycle.transport = HeadHoldingTransport(cycle.transport, self.loop)  # type: ignore[assignment]


# uvicorn's `--http` value for this protocol.
HTTP_PROTOCOL = f"{__name__}:{GatewayHttpProtocol.__name__}"
