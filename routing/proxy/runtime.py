"""Per-process state of the proxy: configuration snapshot, upstream session,
usage buffer, and the one thread that talks to the database."""

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiohttp
from django.conf import settings
from django.db import connections
from django.utils import timezone
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from billing.alerts import abudget_alerts_check, alert_deliveries_run_due, spend_spikes_detect
from billing.budget_counters import BudgetCounters, InProcessBudgetCounters, RedisBudgetCounters
from billing.budget_leases import LeasedBudgetCounters
from billing.budget_ledger import abudget_counters_reconcile
from billing.ingest import UsageBuffer
from billing.redis_multiplex import MultiplexedRedis
from billing.schedule import EMBEDDED_JOBS
from billing.stream import UsageSink, UsageStreamProducer
from routing.cache import InProcessCache, RedisResponseCache, ResponseCache
from routing.health import BreakerPolicy, DeploymentHealth
from routing.health_board import post_local, post_shared
from routing.health_sync import SharedHealth
from routing.providers import adapters_for
from routing.providers.base import ProviderAdapter
from routing.providers.upstream import upstream_session
from routing.proxy.limits import limits_cache_clear
from routing.selectors import config_snapshot_load
from routing.snapshot import EMPTY_SNAPSHOT, ConfigSnapshot
from tenants.config import config_revision_get

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Replicas see each other's circuit openings within about this long.
_HEALTH_SYNC_SECONDS = 1.0
# How often the embedded default looks for spend spikes (beat's schedule too).
_SPIKE_CHECK_SECONDS = 300.0
# Longest wait for a free Redis connection before a request fails.
_REDIS_POOL_WAIT_S = 5.0
# How long a finished request's settle may wait, while other commands are in flight,
# to share a write to Redis with them: under load, many settles then cost one
# syscall and one wake-up of Redis; an idle connection sends it at once.
_SETTLE_BATCH_S = 0.002
# Longest wait at shutdown for requests settling on their budgets.
_SETTLE_AT_STOP_S = 10.0


# Cyclic garbage collection on the hot path: a worker holds ~20 long-lived objects
# per key in its snapshot, and with Python's defaults the collector kept walking
# them (measured: ~10 % of a worker's CPU at 10,000 keys). So what is alive after a
# snapshot loads is frozen out of the collector's sight (freed by reference counting
# as usual once a newer snapshot replaces it), and young collections wait for this
# many new objects instead of 700: requests free almost everything they allocate by
# reference counting, so little cyclic garbage waits meanwhile.
_GC_YOUNG_THRESHOLD = 20_000


def _freeze_heap(*, collect: bool) -> None:
    """Keep the collector off what is alive now: the snapshot, modules, the runtime.

    `collect` first at startup; not on a reload, where a full collection would
    pause every request for tens of milliseconds (a few garbage cycles alive at that
    moment are then kept: reloads are rare).
    """
    if collect:
        gc.collect()
    gc.freeze()


def _closing_connections(function: Callable[[], T]) -> Callable[[], T]:
    def run() -> T:
        try:
            return function()
        finally:
            # Hand the connection back (to the pool, on PostgreSQL) after every
            # job, so a database restart never leaves this thread a dead one.
            connections.close_all()

    return run


class ProxyRuntime:
    def __init__(self) -> None:
        self.snapshot: ConfigSnapshot = EMPTY_SNAPSHOT
        self.adapters: dict[str, ProviderAdapter] = {}
        self.health = DeploymentHealth(
            BreakerPolicy(
                consecutive_failures=settings.TOLLGATE_BREAKER_FAILURES,
                cooldown_s=settings.TOLLGATE_BREAKER_COOLDOWN_SECONDS,
                latency_half_life_s=settings.TOLLGATE_LATENCY_HALF_LIFE_SECONDS,
            )
        )
        self._redis: Redis | None = None
        # The budget and rate counters' own client: every request calls it twice.
        self._counters_redis: MultiplexedRedis | None = None
        self.cache: ResponseCache = InProcessCache()
        self._database = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollgate-db")
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Task[None]] = set()
        # Budgets and rate limits: shared through Redis, else this process's own.
        self.counters: BudgetCounters = InProcessBudgetCounters()
        self.usage: UsageSink
        if settings.REDIS_URL:
            # To the Redis Stream that Celery drains; spooled to disk while Redis is away.
            self.usage = UsageStreamProducer.from_settings()
        else:
            self.usage = UsageBuffer(
                run_sync=self.run_in_database_thread,
                flush_interval_s=settings.TOLLGATE_USAGE_FLUSH_SECONDS,
                batch_size=settings.TOLLGATE_USAGE_BATCH_SIZE,
            )

    async def run_in_database_thread(self, function: Callable[[], T]) -> T:
        """Run ORM code off the event loop, in the runtime's database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._database, _closing_connections(function))

    async def start(self) -> None:
        """Load configuration, open the upstream pool, start background loops."""
        self.snapshot = await self.run_in_database_thread(config_snapshot_load)
        self._session = upstream_session()
        self.adapters = adapters_for(self._session)
        self._tasks = [
            asyncio.create_task(self._follow_configuration(), name="tollgate-config"),
            asyncio.create_task(self.usage.run(), name="tollgate-usage"),
        ]
        shared: SharedHealth | None = None
        if settings.REDIS_URL:
            # Requests wait for a free connection rather than fail when all are busy.
            self._redis = Redis(
                connection_pool=BlockingConnectionPool.from_url(
                    settings.REDIS_URL,
                    max_connections=settings.TOLLGATE_REDIS_MAX_CONNECTIONS,
                    timeout=_REDIS_POOL_WAIT_S,
                    # A hung Redis fails a cache lookup as fast as it fails the counters.
                    socket_timeout=settings.TOLLGATE_REDIS_TIMEOUT_SECONDS,
                    socket_connect_timeout=settings.TOLLGATE_REDIS_TIMEOUT_SECONDS,
                )
            )
            self.cache = RedisResponseCache(self._redis)
            self._counters_redis = MultiplexedRedis.from_url(
                settings.REDIS_URL, timeout_s=settings.TOLLGATE_REDIS_TIMEOUT_SECONDS
            )
            shared_counters = RedisBudgetCounters(
                self._counters_redis,
                settle_client=self._counters_redis.deferred(_SETTLE_BATCH_S),
            )
            self.counters = (
                LeasedBudgetCounters(shared_counters, inflight_key=self.usage.inflight_key)
                if settings.TOLLGATE_BUDGET_LEASES
                else shared_counters
            )
            shared = SharedHealth(self._redis, policy=self.health.policy)
        else:
            # No Celery beat in the embedded default: this process runs its jobs.
            self._tasks.append(asyncio.create_task(self._run_jobs(), name="tollgate-jobs"))
            self._tasks.append(asyncio.create_task(self._watch_budgets(), name="tollgate-budgets"))
        self._tasks.append(asyncio.create_task(self._watch_health(shared), name="tollgate-health"))
        _freeze_heap(collect=True)
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        logger.info(
            "Proxy ready: %d keys, %d routes",
            len(self.snapshot.keys_by_prefix),
            len(self.snapshot.routes),
        )

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background (e.g. shadow traffic), kept until it is done."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def settle_later(self, work: Coroutine[Any, Any, None]) -> None:
        """Settle a finished request on its budgets in the background; awaited at shutdown."""
        task = asyncio.create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def stop(self) -> None:
        """Stop the loops, settle and write every pending usage event, close the pool."""
        if self._settling:
            # Each settles its request, then queues its usage event: let them finish.
            await asyncio.wait(set(self._settling), timeout=_SETTLE_AT_STOP_S)
        if isinstance(self.counters, LeasedBudgetCounters):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.counters.aclose(), _SETTLE_AT_STOP_S)
        for task in [*self._tasks, *self._background]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _attempt in range(3):
            if not await self.usage.flush():
                await asyncio.sleep(0.5)  # Redis and the spool both failing: once more
            elif not self.usage.pending:
                break  # (a flush sends what it found; a late settle's record goes next)
        if self.usage.pending:
            logger.error("Shutting down with %d usage events unwritten", self.usage.pending)
        if isinstance(self.usage, UsageStreamProducer):
            await self.usage.aclose()
        if self._session is not None:
            await self._session.close()
        if self._redis is not None:
            await self._redis.aclose()
        if self._counters_redis is not None:
            await self._counters_redis.aclose()
        self._database.shutdown(wait=True)

    async def _watch_health(self, shared: SharedHealth | None) -> None:
        """Once a second: exchange circuit state and usage with the other web processes
        (through Redis, when there is one) and post it for the dashboard and the API."""
        while True:
            await asyncio.sleep(_HEALTH_SYNC_SECONDS)
            if shared is None or self._redis is None:
                post_local(self.health.statuses(time.monotonic()))
                continue
            await shared.sync(self.health, time.monotonic())
            # The sync logs Redis outages; a missed post only ages the board.
            with contextlib.suppress(RedisError, OSError):
                await post_shared(self._redis, self.health.statuses(time.monotonic()))

    async def _run_jobs(self) -> None:
        """Run billing's periodic jobs (rollups, statements, retention) as beat would."""
        next_at = {job.name: time.monotonic() + job.every_s for job in EMBEDDED_JOBS}
        next_at[EMBEDDED_JOBS[0].name] = time.monotonic()  # rollups for the dashboard at once
        while True:
            now = time.monotonic()
            for job in EMBEDDED_JOBS:
                if now < next_at[job.name]:
                    continue
                next_at[job.name] = now + job.every_s
                try:
                    await self.run_in_database_thread(job.run)
                except Exception:
                    logger.exception("Periodic job %r failed; it runs again later", job.name)
            await asyncio.sleep(max(0.0, min(next_at.values()) - time.monotonic()))

    async def _watch_budgets(self) -> None:
        """Embedded default: what beat runs against Redis, here against this process's
        counters: budget alerts and their deliveries, spend spikes, and keeping the
        counters in line with the ledger."""
        jobs = (
            (settings.TOLLGATE_ALERT_CHECK_SECONDS, "budget alerts", self._alerts_check),
            (_SPIKE_CHECK_SECONDS, "spend spikes", self._spikes_check),
            (settings.TOLLGATE_BUDGET_RECONCILE_SECONDS, "budget reconcile", self._reconcile),
        )
        next_at = {name: time.monotonic() + every_s for every_s, name, _ in jobs}
        while True:
            await asyncio.sleep(max(0.0, min(next_at.values()) - time.monotonic()))
            for every_s, name, job in jobs:
                if time.monotonic() < next_at[name]:
                    continue
                next_at[name] = time.monotonic() + every_s
                try:
                    await job()
                except Exception:
                    logger.exception("Periodic job %r failed; it runs again later", name)

    async def _alerts_check(self) -> None:
        await abudget_alerts_check(counters=self.counters, at=timezone.now())
        # Webhooks and e-mail wait on the network: not in the database thread.
        await asyncio.to_thread(_closing_connections(alert_deliveries_run_due))

    async def _spikes_check(self) -> None:
        await self.run_in_database_thread(lambda: spend_spikes_detect(at=timezone.now()))

    async def _reconcile(self) -> None:
        await abudget_counters_reconcile(counters=self.counters)

    async def _follow_configuration(self) -> None:
        """Reload the snapshot whenever the configuration revision changes."""
        interval_s = settings.TOLLGATE_CONFIG_POLL_SECONDS
        while True:
            await asyncio.sleep(interval_s)
            try:
                revision = await self.run_in_database_thread(config_revision_get)
                if revision != self.snapshot.revision:
                    self.snapshot = await self.run_in_database_thread(config_snapshot_load)
                    limits_cache_clear()
                    _freeze_heap(collect=False)
            except Exception:
                # Keep serving the last good snapshot while the database is away.
                logger.exception("Reloading the proxy configuration failed")
