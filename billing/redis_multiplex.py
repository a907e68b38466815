"""A lean Redis client for the proxy's hot path: one connection per process, shared
by every request in flight.

redis-py checks a connection out of a pool for each command and makes a few dozen
Python calls around it: with hiredis installed that was still over a third of a
proxy worker's CPU (bench/README.md). Here hiredis packs each command, the commands
issued in one event-loop turn are written in one go, and the replies, which Redis
sends in order, are matched to waiting futures as they arrive. While commands are in
flight, new ones queue and go together once replies come in (see `_Connection.send`).
A command costs a few microseconds of Python and shares its round trip and syscalls
with the others.

Errors are redis-py's (ConnectionError, TimeoutError, ResponseError, NoScriptError),
so callers' RedisError policies apply unchanged. A command unanswered after
`timeout_s` fails with TimeoutError and the connection is dropped (replies could no
longer be matched to commands); the next command reconnects.
"""

import asyncio
import collections
import ssl
import time
from builtins import TimeoutError as TimeoutError_  # asyncio's; the name below is redis-py's
from typing import Any

import hiredis
from redis.connection import SSLConnection, parse_url
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    ResponseError,
    TimeoutError,
)

_AUTH_ERRORS = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password")


def _error(reply: ResponseError) -> ResponseError:
    """redis-py's exception for an error reply."""
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(_AUTH_ERRORS):
        return AuthenticationError(message)
    return reply


class _Connection(asyncio.Protocol):
    """One connection to Redis: commands written in batches, replies matched in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._transport: asyncio.Transport | None = None
        self._outgoing: list[bytes] = []
        # The pending write: soon (this loop turn's commands), or later (deferred only).
        self._flush_handle: asyncio.Handle | None = None
        self._flush_soon = False
        self._urgent_queued = 0  # queued commands that someone is waiting on
        self._urgent_sent = 0  # and those written, not yet answered
        # Futures of the commands queued or sent and not yet answered, oldest first,
        # with when queued and whether someone waits on them.
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float, bool]] = (
            collections.deque()
        )
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self._watchdog = self._loop.call_later(self._timeout_s / 4, self._check_deadline)

    def send(self, packed: bytes, *, defer_s: float = 0.0) -> asyncio.Future[Any]:
        """Queue a command and return the future of its reply.

        Nagle-like, so that under load one write carries many commands: a command
        someone waits on is written at the end of this loop turn (with the others of
        the turn) unless others someone waits on are in flight; then it waits for
        their replies and goes with the next write, made as soon as replies come in.
        A deferred command (`defer_s` > 0: a settle nobody waits on) waits up to that
        long for company, or goes at once on an idle connection; deferred commands in
        flight never hold back one someone waits on.
        """
        if self.closed:
            raise ConnectionError("The connection to Redis is closed.")
        future = self._loop.create_future()
        in_flight = len(self._waiting) - len(self._outgoing)
        self._outgoing.append(packed)
        urgent = not defer_s
        self._waiting.append((future, time.monotonic(), urgent))
        idle = in_flight == 0 and not self._urgent_queued
        if urgent:
            self._urgent_queued += 1
            if not self._urgent_sent and not self._flush_soon:
                self._schedule_flush_soon()
        elif idle and not self._flush_soon:
            self._schedule_flush_soon()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_later(defer_s, self._flush)
        return future

    def _schedule_flush_soon(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()  # deferred commands go now, with this one
        self._flush_handle = self._loop.call_soon(self._flush)
        self._flush_soon = True

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_handle, self._flush_soon = None, False
        self._urgent_sent += self._urgent_queued
        self._urgent_queued = 0
        outgoing, self._outgoing = self._outgoing, []
        if outgoing and not self.closed and self._transport is not None:
            self._transport.write(b"".join(outgoing))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            reply = self._reader.gets()
            while reply is not False:
                if not self._waiting:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                future, _, urgent = self._waiting.popleft()
                self._urgent_sent -= urgent
                if not future.done():  # a caller that gave up still has its reply read
                    if isinstance(reply, ResponseError):
                        future.set_exception(_error(reply))
                    else:
                        future.set_result(reply)
                reply = self._reader.gets()
        except hiredis.ProtocolError as exc:
            self.close(ConnectionError(f"Redis protocol error: {exc}"))
            return
        if self._urgent_queued:
            self._flush()  # what queued up while these were in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(ConnectionError("The connection to Redis was lost."))

    def _check_deadline(self) -> None:
        if self.closed:
            return
        if self._waiting and time.monotonic() - self._waiting[0][1] > self._timeout_s:
            self.close(TimeoutError(f"Redis did not answer within {self._timeout_s:g} s."))
            return
        self._watchdog = self._loop.call_later(self._timeout_s / 4, self._check_deadline)

    def close(self, error: Exception) -> None:
        """Fail every command still waiting with `error` and drop the connection."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.close()


class MultiplexedRedis:
    """Commands from every concurrent caller over one connection (see the module doc).

    `evalsha` and `eval` take redis-py's arguments, so a `redis.asyncio.Redis` and
    this client are interchangeable where only scripts are run.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        use_ssl: bool = False,
        timeout_s: float = 2.0,
    ) -> None:
        self._address = (host, port, path)
        self._db = db
        self._credentials = (username, password)
        self._ssl = ssl.create_default_context() if use_ssl else None
        self._timeout_s = timeout_s
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 2.0) -> "MultiplexedRedis":
        """A client for `redis://[user:password@]host:port/db`, `rediss://` or `unix://`."""
        options = parse_url(url)
        return cls(
            host=options.get("host", "127.0.0.1"),
            port=options.get("port", 6379),
            path=options.get("path"),
            db=options.get("db", 0),
            username=options.get("username"),
            password=options.get("password"),
            use_ssl=options.get("connection_class") is SSLConnection,
            timeout_s=timeout_s,
        )

    async def execute(self, *args: Any, defer_s: float = 0.0) -> Any:
        """Run one command and return its reply; a Redis error reply is raised.

        With `defer_s`, the command may wait up to that long to share a write with
        others: for work nobody waits on, such as settling a finished request.
        """
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connected()
        return await connection.send(hiredis.pack_command(args), defer_s=defer_s)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute("EVAL", script, numkeys, *keys_and_args)

    def deferred(self, defer_s: float) -> "DeferredScripts":
        """This client for scripts that may wait up to `defer_s` to be sent with others."""
        return DeferredScripts(self, defer_s)

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close(ConnectionError("The Redis client was closed."))
            self._connection = None

    async def _connected(self) -> _Connection:
        """The open connection; callers arriving while it opens wait for the same one."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            # Shielded: one caller giving up must not cancel the others' connection.
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port, path = self._address
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                if path is not None:
                    _, connection = await loop.create_unix_connection(
                        lambda: _Connection(loop, self._timeout_s), path
                    )
                else:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(loop, self._timeout_s), host, port, ssl=self._ssl
                    )
                username, password = self._credentials
                if password is not None:
                    auth = ("AUTH", username, password) if username else ("AUTH", password)
                    await connection.send(hiredis.pack_command(auth))
                if self._db:
                    await connection.send(hiredis.pack_command(("SELECT", self._db)))
        except BaseException as exc:
            if connection is not None:
                connection.close(ConnectionError("Connecting to Redis failed."))
            if isinstance(exc, TimeoutError_):
                raise ConnectionError(
                    f"Cannot connect to Redis: no answer within {self._timeout_s:g} s."
                ) from exc
            if isinstance(exc, OSError):  # refused, unreachable
                raise ConnectionError(f"Cannot connect to Redis: {exc}") from exc
            raise
        self._connection = connection
        return connection


class DeferredScripts:
    """A `MultiplexedRedis` whose scripts wait up to `defer_s` for company: at load,
    many requests' settles then share one write and one wake-up of Redis."""

    def __init__(self, client: MultiplexedRedis, defer_s: float) -> None:
        self._client = client
        self._defer_s = defer_s

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._client.execute(
            "EVALSHA", sha, numkeys, *keys_and_args, defer_s=self._defer_s
        )

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._client.execute(
            "EVAL", script, numkeys, *keys_and_args, defer_s=self._defer_s
        )
