"""Liveness (/healthz) and readiness (/readyz) probes for load balancers and orchestrators.

`gatewaysite/asgi.py` serves both before Django: no middleware, no session, no
ALLOWED_HOSTS check (a load balancer probes each replica by IP, with whatever
Host header it likes), and no authentication. So they reveal nothing but check
names, states and short fixed reasons: never a URL, a host name or an
exception's text (the log gets those, once per change of state).

`/healthz` answers 200 while the process and its event loop run. It checks no
dependency, so an orchestrator never restarts a sound process because a shared
service is away.

`/readyz` checks what this process needs to serve, each within
TOLLGATE_HEALTH_TIMEOUT_SECONDS, and answers 503 if any check is failing, else
200 (degraded included). What each state means is in docs/operations.md:

- database: `failing` when no query gets through. The proxy would keep serving
  from its snapshot, but revoked keys and changed routes no longer reach it, and
  the dashboard and management API fail.
- redis (with REDIS_URL): `failing` when unreachable, because budgets and rate
  limits fail closed (keys that have them get 503); `degraded` instead under
  TOLLGATE_LIMITS_FAIL_OPEN, and when its memory is nearly full.
- usage_ingestion (with REDIS_URL): `degraded` when no Celery worker is draining
  the usage stream, when its oldest event waits longer than
  TOLLGATE_HEALTH_USAGE_LAG_SECONDS, or when this process holds events spooled on
  disk. Never failing: events wait safely, and the proxy keeps serving.

The embedded default (no REDIS_URL) has the database check only: its usage
queue is written through that same database.
"""

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import orjson
import redis.asyncio
import redis.exceptions
from django.conf import settings
from django.db import DatabaseError, OperationalError, connections
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from billing.stream import USAGE_GROUP, UsageSink, UsageStreamProducer
from routing.proxy.http import Receive, Scope, Send

logger = logging.getLogger(__name__)

T = TypeVar("T")

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
HEALTH_PATHS = frozenset({LIVENESS_PATH, READINESS_PATH})

# Probes within this long of a finished check get its result: a flood of probes
# costs the database and Redis at most one check per second per process.
RESULT_REUSE_S = 1.0
# With maxmemory-policy noeviction a full Redis refuses writes (counters, stream).
_REDIS_MEMORY_DEGRADED_RATIO = 0.9


class State(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    FAILING = "failing"


_SEVERITY = {State.OK: 0, State.DEGRADED: 1, State.FAILING: 2}


@dataclass(frozen=True, slots=True)
class Check:
    state: State
    reason: str
    duration_ms: float = 0.0
    # For the log only: exception text may name hosts, so it is never served.
    detail: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Readiness:
    checks: Mapping[str, Check]

    @property
    def state(self) -> State:
        return max((check.state for check in self.checks.values()), key=_SEVERITY.__getitem__)

    @property
    def http_status(self) -> int:
        return 503 if self.state is State.FAILING else 200

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.state.value,
            "checks": {
                name: {
                    "status": check.state.value,
                    "reason": check.reason,
                    "duration_ms": check.duration_ms,
                }
                for name, check in self.checks.items()
            },
        }


# ---------------------------------------------------------------- the checks


def _database_ping() -> None:
    """One trivial query on the default database (run in a thread)."""
    try:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        # Back to the pool (or closed): a later probe must not reuse a dead connection.
        connections.close_all()


def _in_daemon_thread(function: Callable[[], T]) -> "asyncio.Future[T]":
    """Run `function` in a new daemon thread; a hung call never blocks the process's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: Exception | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result, error = None, None
        try:
            result = function()
        except Exception as exc:  # handed to the event loop, which reports it
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=run, name="tollgate-health-db", daemon=True).start()
    # Retrieved even when nobody awaits it any more (a probe that timed out).
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


def _elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _redis_client(timeout_s: float) -> redis.asyncio.Redis:
    # A fresh connection per check: it proves new connections work (restarts,
    # maxclients, auth), costs one connect a second at most, and needs no cleanup.
    return redis.asyncio.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def _redis_failure_reason(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError | redis.exceptions.TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return "still loading its data set"
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return "authentication refused"
    if isinstance(exc, redis.exceptions.ConnectionError | OSError):
        return "unreachable (connection refused or closed)"
    if isinstance(exc, redis.exceptions.ResponseError):
        return "answered with an error"
    return "check failed"


@dataclass(frozen=True, slots=True)
class UsageStreamFacts:
    """What Redis says about the usage stream and the workers draining it."""

    waiting: int  # entries not yet written to the ledger (acknowledged ones are deleted)
    oldest_age_s: float | None  # of the oldest waiting entry, by Redis's own clock
    workers_idle_s: float | None  # since any worker last read; None: no worker ever did
    memory_ratio: float | None  # used / maxmemory; None when there is no limit


async def usage_stream_facts(client: redis.asyncio.Redis, stream: str) -> UsageStreamFacts:
    """Read the stream's state in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.xlen(stream)
    pipe.xrange(stream, count=1)
    pipe.xinfo_consumers(stream, USAGE_GROUP)
    pipe.info("memory")
    now, waiting, oldest, consumers, memory = await pipe.execute(raise_on_error=False)
    # Error replies come back as values: no stream or group yet (ResponseError),
    # or a command the ACL forbids. Connection failures raise.
    for reply in (now, waiting, oldest):
        if isinstance(reply, Exception):
            raise reply
    now_ms = now[0] * 1000 + now[1] // 1000
    oldest_age_s = None
    if oldest:
        # Entry ids start with Redis's clock in milliseconds at XADD.
        added_ms = int(oldest[0][0].split(b"-")[0])
        oldest_age_s = max(0.0, (now_ms - added_ms) / 1000)
    workers_idle_s = None
    if not isinstance(consumers, Exception) and consumers:
        workers_idle_s = min(int(consumer["idle"]) for consumer in consumers) / 1000
    memory_ratio = None
    if not isinstance(memory, Exception) and int(memory.get("maxmemory", 0)):
        memory_ratio = int(memory["used_memory"]) / int(memory["maxmemory"])
    return UsageStreamFacts(
        waiting=int(waiting),
        oldest_age_s=oldest_age_s,
        workers_idle_s=workers_idle_s,
        memory_ratio=memory_ratio,
    )


def usage_ingestion_check(
    facts: UsageStreamFacts | None, *, spooled: int, lag_s: float, duration_ms: float
) -> Check:
    """Whether Celery drains the usage stream in time; `facts` None: Redis unreadable."""
    problems = []
    if facts is None:
        problems.append("cannot be read while Redis is unreachable")
    elif facts.workers_idle_s is None:
        problems.append("no worker has read the usage stream")
    elif facts.workers_idle_s > lag_s:
        problems.append(f"no worker has read the usage stream for {facts.workers_idle_s:.0f} s")
    if facts is not None and facts.oldest_age_s is not None and facts.oldest_age_s > lag_s:
        problems.append(
            f"the oldest of {facts.waiting} waiting events is {facts.oldest_age_s:.0f} s old"
        )
    if spooled:
        problems.append(f"{spooled} events spooled on this process's disk, not yet replayed")
    if problems:
        return Check(State.DEGRADED, "; ".join(problems), duration_ms)
    assert facts is not None
    if facts.waiting and facts.oldest_age_s is not None:
        reason = f"{facts.waiting} events waiting, the oldest {facts.oldest_age_s:.0f} s old"
    else:
        reason = "no events waiting"
    return Check(State.OK, reason, duration_ms)


def redis_check(
    facts: UsageStreamFacts | None, *, failure: str, fail_open: bool, duration_ms: float
) -> Check:
    """Redis's state for serving: `failure` is why it could not be read, if it could not."""
    if facts is None:
        if fail_open:
            return Check(
                State.DEGRADED,
                f"{failure}; budgets and rate limits are not enforced (limits fail open)",
                duration_ms,
            )
        return Check(State.FAILING, failure, duration_ms)
    if facts.memory_ratio is not None and facts.memory_ratio >= _REDIS_MEMORY_DEGRADED_RATIO:
        return Check(
            State.DEGRADED, f"memory {facts.memory_ratio:.0%} of maxmemory used", duration_ms
        )
    return Check(State.OK, "reachable", duration_ms)


# ---------------------------------------------------------------- the ASGI application


class HealthApp:
    """Serves /healthz and /readyz; one instance per process."""

    def __init__(self, *, usage: UsageSink) -> None:
        self._usage = usage
        self._last: Readiness | None = None
        self._last_at = 0.0
        self._running: asyncio.Task[Readiness] | None = None
        self._database_probe: asyncio.Future[None] | None = None
        self._database_probe_started = 0.0
        self._logged_states: dict[str, State] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            body = {"error": {"message": f"{method} is not allowed; use GET or HEAD."}}
            await _send_json(send, 405, body, head=False, headers=[(b"allow", b"GET, HEAD")])
        elif scope["path"] == LIVENESS_PATH:
            await _send_json(send, 200, {"status": "ok"}, head=method == "HEAD")
        else:
            readiness = await self.readiness()
            await _send_json(
                send, readiness.http_status, readiness.as_json(), head=method == "HEAD"
            )

    async def readiness(self) -> Readiness:
        """The latest result, checked again when older than RESULT_REUSE_S.

        Concurrent probes share one run of the checks.
        """
        if self._last is not None and time.monotonic() - self._last_at < RESULT_REUSE_S:
            return self._last
        if self._running is None:
            self._running = asyncio.create_task(self._check_all(), name="tollgate-readyz")
        # Shielded: a probe whose client hangs up must not cancel the others' check.
        return await asyncio.shield(self._running)

    async def _check_all(self) -> Readiness:
        try:
            timeout_s = settings.TOLLGATE_HEALTH_TIMEOUT_SECONDS
            if settings.REDIS_URL:
                database, (redis_state, usage_state) = await asyncio.gather(
                    self._check_database(timeout_s), self._check_redis(timeout_s)
                )
                checks = {
                    "database": database,
                    "redis": redis_state,
                    "usage_ingestion": usage_state,
                }
            else:
                checks = {"database": await self._check_database(timeout_s)}
            readiness = Readiness(checks)
            self._log_changes(readiness)
            self._last, self._last_at = readiness, time.monotonic()
            return readiness
        finally:
            self._running = None

    async def _check_database(self, timeout_s: float) -> Check:
        # One probe at a time: while a hung one runs, later checks wait on it
        # instead of piling up threads and connections.
        started = time.monotonic()
        if self._database_probe is None or self._database_probe.done():
            self._database_probe = _in_daemon_thread(_database_ping)
            self._database_probe_started = started
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._database_probe)
        except TimeoutError:
            waited_s = time.monotonic() - self._database_probe_started
            return Check(
                State.FAILING, f"no connection or answer for {waited_s:.1f} s", _elapsed_ms(started)
            )
        except OperationalError as exc:
            reason = "unreachable or refusing connections"
            return Check(State.FAILING, reason, _elapsed_ms(started), detail=repr(exc))
        except DatabaseError as exc:
            return Check(State.FAILING, "query failed", _elapsed_ms(started), detail=repr(exc))
        except Exception as exc:  # e.g. a misconfigured database: still an answer, not a 500
            return Check(State.FAILING, "check failed", _elapsed_ms(started), detail=repr(exc))
        return Check(State.OK, "reachable", _elapsed_ms(started))

    async def _check_redis(self, timeout_s: float) -> tuple[Check, Check]:
        started = time.monotonic()
        facts: UsageStreamFacts | None = None
        failure, detail = "", ""
        client = _redis_client(timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                facts = await usage_stream_facts(client, settings.TOLLGATE_USAGE_STREAM)
        except Exception as exc:  # every way Redis can fail; the reason says which
            failure, detail = _redis_failure_reason(exc, timeout_s), repr(exc)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout_s):
                    await client.aclose()
        duration_ms = _elapsed_ms(started)
        redis_state = redis_check(
            facts,
            failure=failure,
            fail_open=settings.TOLLGATE_LIMITS_FAIL_OPEN,
            duration_ms=duration_ms,
        )
        redis_state = replace(redis_state, detail=detail)
        spooled = self._usage.spooled if isinstance(self._usage, UsageStreamProducer) else 0
        usage_state = usage_ingestion_check(
            facts,
            spooled=spooled,
            lag_s=settings.TOLLGATE_HEALTH_USAGE_LAG_SECONDS,
            duration_ms=duration_ms,
        )
        return redis_state, usage_state

    def _log_changes(self, readiness: Readiness) -> None:
        """Log each check's changes of state (not every probe: they come every few seconds)."""
        for name, check in readiness.checks.items():
            before = self._logged_states.get(name, State.OK)
            self._logged_states[name] = check.state
            if check.state is before:
                continue
            log = logger.warning if check.state is not State.OK else logger.info
            log(
                "Readiness check %s: %s -> %s (%s)%s",
                name,
                before.value,
                check.state.value,
                check.reason,
                f": {check.detail}" if check.detail else "",
            )


async def _send_json(
    send: Send,
    status: int,
    payload: dict[str, Any],
    *,
    head: bool,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # A cached probe answer would hide a change of state.
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})
