"""Per-process state of the proxy: configuration snapshot, upstream session,
usage buffer, and the one thread that talks to the database."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiohttp
from django.conf import settings
from django.db import connections
from redis.asyncio import Redis
from redis.exceptions import RedisError

from billing.ingest import UsageBuffer
from billing.schedule import EMBEDDED_JOBS
from billing.stream import UsageSink, UsageStreamProducer
from routing.cache import InProcessCache, RedisResponseCache, ResponseCache
from routing.health import BreakerPolicy, DeploymentHealth
from routing.health_board import post_local, post_shared
from routing.health_sync import SharedHealth
from routing.providers import adapters_for
from routing.providers.base import ProviderAdapter
from routing.selectors import config_snapshot_load
from routing.snapshot import EMPTY_SNAPSHOT, ConfigSnapshot
from tenants.config import config_revision_get

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Replicas see each other's circuit openings within about this long.
_HEALTH_SYNC_SECONDS = 1.0


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
        self.cache: ResponseCache = InProcessCache()
        self._database = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollgate-db")
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
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
        connector = aiohttp.TCPConnector(
            limit=settings.TOLLGATE_UPSTREAM_MAX_CONNECTIONS,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=60,
        )
        # trust_env=False: tenant traffic must never pick up a proxy from the environment.
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        self.adapters = adapters_for(self._session)
        self._tasks = [
            asyncio.create_task(self._follow_configuration(), name="tollgate-config"),
            asyncio.create_task(self.usage.run(), name="tollgate-usage"),
        ]
        shared: SharedHealth | None = None
        if settings.REDIS_URL:
            self._redis = Redis.from_url(settings.REDIS_URL)
            self.cache = RedisResponseCache(self._redis)
            shared = SharedHealth(self._redis, policy=self.health.policy)
        else:
            # No Celery beat in the embedded default: this process runs its jobs.
            self._tasks.append(asyncio.create_task(self._run_jobs(), name="tollgate-jobs"))
        self._tasks.append(asyncio.create_task(self._watch_health(shared), name="tollgate-health"))
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

    async def stop(self) -> None:
        """Stop the loops, write every pending usage event, close the pool."""
        for task in [*self._tasks, *self._background]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _attempt in range(3):
            if await self.usage.flush():
                break
            await asyncio.sleep(0.5)
        if self.usage.pending:
            logger.error("Shutting down with %d usage events unwritten", self.usage.pending)
        if isinstance(self.usage, UsageStreamProducer):
            await self.usage.aclose()
        if self._session is not None:
            await self._session.close()
        if self._redis is not None:
            await self._redis.aclose()
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

    async def _follow_configuration(self) -> None:
        """Reload the snapshot whenever the configuration revision changes."""
        interval_s = settings.TOLLGATE_CONFIG_POLL_SECONDS
        while True:
            await asyncio.sleep(interval_s)
            try:
                revision = await self.run_in_database_thread(config_revision_get)
                if revision != self.snapshot.revision:
                    self.snapshot = await self.run_in_database_thread(config_snapshot_load)
            except Exception:
                # Keep serving the last good snapshot while the database is away.
                logger.exception("Reloading the proxy configuration failed")
