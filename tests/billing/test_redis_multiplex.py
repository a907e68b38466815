"""The proxy's multiplexed Redis client, against a private redis-server.

Many concurrent callers share one connection: each must get its own reply, errors
must be redis-py's, and a lost or hung Redis must fail the callers waiting on it
(never hang them) and be reconnected to once it is back.
"""

import asyncio
import shutil
from collections.abc import Iterator

import pytest
import redis

from billing.redis_multiplex import MultiplexedRedis, _Connection
from tests.support.private_redis import PrivateRedis, private_redis

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def url_of(server: PrivateRedis, db: int = 0, password: str | None = None) -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{server.port}/{db}"


@pytest.fixture(name="private_redis")
def private_redis_fixture() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


@pytest.mark.asyncio
async def test_concurrent_callers_each_get_their_own_reply(private_redis: PrivateRedis) -> None:
    client = MultiplexedRedis.from_url(url_of(private_redis))
    try:
        replies = await asyncio.gather(
            *(client.execute("INCRBY", f"counter:{i % 7}", i) for i in range(2_000))
        )
        assert (
            await client.execute("GET", "counter:3")
            == str(sum(i for i in range(2_000) if i % 7 == 3)).encode()
        )
        # Each INCRBY answered with its own counter's running total.
        totals: dict[int, int] = {}
        for i, reply in enumerate(replies):
            totals[i % 7] = totals.get(i % 7, 0) + i
            assert reply == totals[i % 7]
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_the_database_in_the_url_is_selected(private_redis: PrivateRedis) -> None:
    client = MultiplexedRedis.from_url(url_of(private_redis, db=5))
    try:
        await client.execute("SET", "where", "five")
    finally:
        await client.aclose()
    assert redis.Redis(port=private_redis.port, db=5).get("where") == b"five"
    assert redis.Redis(port=private_redis.port, db=0).get("where") is None


@pytest.mark.asyncio
async def test_error_replies_raise_redis_py_errors_and_the_connection_goes_on(
    private_redis: PrivateRedis,
) -> None:
    client = MultiplexedRedis.from_url(url_of(private_redis))
    try:
        with pytest.raises(redis.exceptions.NoScriptError):
            await client.evalsha("0" * 40, 0)
        with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
            await client.execute("NOT-A-COMMAND")
        assert await client.eval("return ARGV[1] + 1", 0, 41) == 42
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_a_password_in_the_url_authenticates() -> None:
    with private_redis(password="s3cret") as server:
        good = MultiplexedRedis.from_url(url_of(server, password="s3cret"))
        assert await good.execute("PING") == b"PONG"
        await good.aclose()
        wrong = MultiplexedRedis.from_url(url_of(server, password="wrong"))
        with pytest.raises(redis.exceptions.AuthenticationError):
            await wrong.execute("PING")
        await wrong.aclose()


@pytest.mark.asyncio
async def test_a_stopped_redis_fails_callers_and_a_restarted_one_is_used_again(
    private_redis: PrivateRedis,
) -> None:
    client = MultiplexedRedis.from_url(url_of(private_redis), timeout_s=1.0)
    try:
        assert await client.execute("PING") == b"PONG"
        private_redis.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.execute("PING")
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.execute("PING")  # refused: a clear error, not a hang
        private_redis.start()
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_a_hung_redis_fails_waiting_callers_after_the_timeout(
    private_redis: PrivateRedis,
) -> None:
    client = MultiplexedRedis.from_url(url_of(private_redis), timeout_s=0.5)
    blocker = redis.Redis(port=private_redis.port)
    try:
        assert await client.execute("PING") == b"PONG"
        # DEBUG SLEEP blocks the whole server, as a hung Redis would.
        sleeping = asyncio.get_running_loop().run_in_executor(
            None, lambda: blocker.execute_command("DEBUG", "SLEEP", "2")
        )
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.execute("PING")
        waited = asyncio.get_running_loop().time() - started
        assert 0.4 <= waited < 1.5
        await sleeping
        assert await client.execute("PING") == b"PONG"  # a fresh connection
    finally:
        await client.aclose()
        blocker.close()


@pytest.mark.asyncio
async def test_a_caller_that_gives_up_does_not_shift_the_others_replies(
    private_redis: PrivateRedis,
) -> None:
    client = MultiplexedRedis.from_url(url_of(private_redis))
    try:
        await client.execute("SET", "a", "1")
        await client.execute("SET", "b", "2")
        abandoned = asyncio.ensure_future(client.execute("GET", "a"))
        kept = asyncio.ensure_future(client.execute("GET", "b"))
        abandoned.cancel()
        assert await kept == b"2"
        assert await client.execute("GET", "a") == b"1"
    finally:
        await client.aclose()


def test_it_runs_on_uvloop_as_the_proxy_does(private_redis: PrivateRedis) -> None:
    import uvloop

    async def many_calls() -> list[int]:
        client = MultiplexedRedis.from_url(url_of(private_redis))
        try:
            return await asyncio.gather(*(client.execute("INCR", "n") for _ in range(500)))
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert sorted(runner.run(many_calls())) == list(range(1, 501))


@pytest.mark.asyncio
async def test_deferred_commands_wait_for_company_only_while_others_are_in_flight(
    private_redis: PrivateRedis,
) -> None:
    client = MultiplexedRedis.from_url(url_of(private_redis))
    deferred = client.deferred(0.2)
    pusher = redis.Redis(port=private_redis.port)
    loop = asyncio.get_running_loop()
    try:
        await client.execute("PING")
        # An idle connection: nothing to wait for, the command goes at once.
        started = loop.time()
        assert await deferred.eval("return 1", 0) == 1
        assert loop.time() - started < 0.15

        # A busy one (a BLPOP in flight until the list gets an item after 0.1 s): the
        # deferred command waits its 0.2 s for company, then goes on its own.
        blocked = asyncio.ensure_future(client.execute("BLPOP", "queue", 5))
        await asyncio.sleep(0.02)
        started = loop.time()
        waiting = asyncio.ensure_future(deferred.eval("return 2", 0))
        loop.call_later(0.1, pusher.lpush, "queue", "item")
        assert await waiting == 2
        assert 0.18 <= loop.time() - started < 1.0
        assert await blocked == [b"queue", b"item"]

        # Busy again: a command sent meanwhile takes the deferred one along, in order.
        blocked = asyncio.ensure_future(client.execute("BLPOP", "queue", 5))
        await asyncio.sleep(0.02)
        started = loop.time()
        waiting = asyncio.ensure_future(deferred.eval("return redis.call('INCR', 'x')", 0))
        await asyncio.sleep(0.01)
        incremented = asyncio.ensure_future(client.execute("INCR", "x"))
        loop.call_later(0.05, pusher.lpush, "queue", "item")
        assert await waiting == 1 and await incremented == 2
        assert loop.time() - started < 0.15
        await blocked
    finally:
        await client.aclose()
        pusher.close()


class RecordingTransport:
    """Stands in for the socket, to see when each write happens (not observable in Redis)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        pass


@pytest.mark.asyncio
async def test_a_command_someone_waits_on_is_not_held_back_by_deferred_ones_in_flight() -> None:
    connection = _Connection(asyncio.get_running_loop(), timeout_s=5.0)
    transport = RecordingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    try:
        settle = connection.send(b"SETTLE\r\n", defer_s=0.5)  # idle: goes this turn
        await asyncio.sleep(0)
        assert transport.writes == [b"SETTLE\r\n"]

        # Only the settle is in flight: a reserve goes at once, not after its reply.
        reserve = connection.send(b"RESERVE\r\n")
        await asyncio.sleep(0)
        assert transport.writes == [b"SETTLE\r\n", b"RESERVE\r\n"]

        # The reserve is in flight: the next one waits for a reply, then goes.
        second = connection.send(b"RESERVE2\r\n")
        await asyncio.sleep(0.01)
        assert len(transport.writes) == 2
        connection.data_received(b"+settled\r\n")
        assert transport.writes[-1] == b"RESERVE2\r\n"
        connection.data_received(b"+reserved\r\n+reserved2\r\n")
        replies = (await settle, await reserve, await second)
        assert replies == (b"settled", b"reserved", b"reserved2")
    finally:
        connection.close(ConnectionError("test over"))
