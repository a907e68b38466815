"""Where web processes post their deployments' health for the dashboard and the API.

Each process's router keeps its own `DeploymentHealth`; once a second its runtime posts a
snapshot here. With Redis it is one hash, `tollgate:health:board`, replica id -> JSON, so
any process (or a Django view on another host) reads the whole fleet; without Redis (the
embedded default) the proxy and the dashboard share one process and the board is a dict.
A replica that stops posting drops off after `STALE_AFTER_S`.
"""

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import orjson
import redis
import redis.asyncio

from routing.health import CircuitState, DeploymentStatus

BOARD_KEY = "tollgate:health:board"
STALE_AFTER_S = 10.0

REPLICA_ID = f"{socket.gethostname()}:{os.getpid()}"

# The embedded default's board: replica id -> (posted at, statuses).
_local_board: dict[str, tuple[float, list[dict[str, object]]]] = {}


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """One deployment's health as the whole fleet sees it.

    A breaker open on any replica counts as open (replicas adopt it within a sync);
    in-flight calls add up; the per-minute usage and error window are already fleet-wide
    in each replica, so the largest report wins; latencies are the replicas' mean.
    """

    deployment_id: int
    state: CircuitState
    consecutive_failures: int
    window_requests: int
    window_failures: int
    latency_ms: float | None
    ttft_ms: float | None
    in_flight: int
    retry_in_s: float | None
    minute_requests: int
    minute_tokens: int
    replicas: int


def _as_posted(statuses: Iterable[DeploymentStatus]) -> list[dict[str, object]]:
    posted = []
    for status in statuses:
        fields = asdict(status)
        fields.pop("opened_at")  # monotonic: meaningless in another process
        fields["state"] = status.state.value
        posted.append(fields)
    return posted


def post_local(statuses: Iterable[DeploymentStatus]) -> None:
    """Post this process's statuses to the in-process board (embedded default)."""
    _local_board[REPLICA_ID] = (time.time(), _as_posted(statuses))


async def post_shared(client: redis.asyncio.Redis, statuses: Iterable[DeploymentStatus]) -> None:
    """Post this process's statuses to Redis for the fleet; raises RedisError if down."""
    entry = orjson.dumps({"at": time.time(), "statuses": _as_posted(statuses)})
    async with client.pipeline(transaction=False) as pipe:
        pipe.hset(BOARD_KEY, REPLICA_ID, entry)
        pipe.pexpire(BOARD_KEY, round(STALE_AFTER_S * 1000))
        await pipe.execute()


def _parse(report: object) -> DeploymentStatus | None:
    """A posted status back as a `DeploymentStatus`; None for anything malformed."""
    if not isinstance(report, dict):
        return None
    try:
        return DeploymentStatus(
            deployment_id=int(report["deployment_id"]),
            state=CircuitState(report["state"]),
            consecutive_failures=int(report["consecutive_failures"]),
            window_requests=int(report["window_requests"]),
            window_failures=int(report["window_failures"]),
            latency_ms=_float_or_none(report.get("latency_ms")),
            ttft_ms=_float_or_none(report.get("ttft_ms")),
            in_flight=int(report["in_flight"]),
            opened_at=None,
            retry_in_s=_float_or_none(report.get("retry_in_s")),
            minute_requests=int(report.get("minute_requests") or 0),
            minute_tokens=int(report.get("minute_tokens") or 0),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _float_or_none(value: float | int | str | None) -> float | None:
    return None if value is None else float(value)


def _read_shared(redis_url: str) -> list[list[object]]:
    client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    try:
        raw = client.hgetall(BOARD_KEY)
    finally:
        client.close()
    boards, now = [], time.time()
    for value in raw.values():
        try:
            entry = orjson.loads(value)
            if now - float(entry["at"]) <= STALE_AFTER_S:
                boards.append(list(entry["statuses"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a foreign or damaged entry is not worth a broken page
    return boards


def _read_local() -> list[list[object]]:
    now = time.time()
    return [list(statuses) for at, statuses in _local_board.values() if now - at <= STALE_AFTER_S]


def _merge(reports: list[DeploymentStatus]) -> FleetStatus:
    states = {report.state for report in reports}
    state = CircuitState.CLOSED
    if CircuitState.OPEN in states:
        state = CircuitState.OPEN
    elif CircuitState.HALF_OPEN in states:
        state = CircuitState.HALF_OPEN

    def mean(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return sum(known) / len(known) if known else None

    retries = [r.retry_in_s for r in reports if r.retry_in_s is not None]
    return FleetStatus(
        deployment_id=reports[0].deployment_id,
        state=state,
        consecutive_failures=max(r.consecutive_failures for r in reports),
        window_requests=max(r.window_requests for r in reports),
        window_failures=max(r.window_failures for r in reports),
        latency_ms=mean([r.latency_ms for r in reports]),
        ttft_ms=mean([r.ttft_ms for r in reports]),
        in_flight=sum(r.in_flight for r in reports),
        retry_in_s=max(retries) if retries and state is CircuitState.OPEN else None,
        minute_requests=max(r.minute_requests for r in reports),
        minute_tokens=max(r.minute_tokens for r in reports),
        replicas=len(reports),
    )


def fleet_statuses(redis_url: str | None) -> dict[int, FleetStatus]:
    """Every deployment some live replica has state for, merged across replicas.

    Reads Redis when `redis_url` is set (raises RedisError if it is down), else the
    in-process board.
    """
    boards = _read_shared(redis_url) if redis_url else _read_local()
    by_deployment: dict[int, list[DeploymentStatus]] = {}
    for statuses in boards:
        for report in statuses:
            status = _parse(report)
            if status is not None:
                by_deployment.setdefault(status.deployment_id, []).append(status)
    return {deployment_id: _merge(reports) for deployment_id, reports in by_deployment.items()}
