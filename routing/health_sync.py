"""Share circuit-breaker state between web replicas through Redis, off the request path.

The caller runs `await shared.sync(health, time.monotonic())` about once a second (a
background task, never a request). Each sync is one pipelined round trip that first
publishes what this process learned since the last sync and then reads the fleet's state:

- `{prefix}:open` (hash) deployment id -> ms (Redis's clock) when its cooldown ends.
  Written when this process opened a breaker; read by everyone and adopted with
  `DeploymentHealth.merge_shared` (an open breaker wins over a local closed one). Entries
  whose time has passed are ignored; the hash expires when no breaker opened for a while.
- `{prefix}:epoch` (hash) deployment id -> how many times a probe closed its breaker. A
  successful probe removes the `open` entry and increments the epoch; a replica that sees
  the epoch move (and no `open` entry) closes its own breaker too.
- `{prefix}:window` (hash) `"{id}:{epoch}:{bucket}:r|f"` -> requests / failures per
  fleet-window bucket (`window_s / FLEET_BUCKETS` wide, aligned on Redis's clock). Every
  replica adds its counts; each reads the sum over the window for the current epoch,
  subtracts what it added itself, and applies the rest with `DeploymentHealth.merge_window`,
  so an error rate split across replicas still opens the breaker. Counts of an older epoch (from
  before a probe closed the breaker) no longer count; stale fields are deleted by the next
  sync and the hash expires with the window when traffic stops.
- `{prefix}:usage` (hash) `"{id}:{bucket}:r|t"` -> requests sent / tokens used per
  usage bucket (a minute split in `FLEET_BUCKETS`), summed the same way and applied with
  `DeploymentHealth.merge_usage`, so RPM/TPM limits hold for the fleet, not per replica
  (to within one sync interval of traffic).

Four fixed keys instead of one per deployment, so a replica learns about deployments it
has never called without SCAN or a second round trip.

Every time in these keys is on Redis's clock (`TIME`), the one clock every replica
shares, as in the budget counters: monotonic clocks are not comparable across hosts, and
on local wall clocks a replica minutes fast would ignore fresh cooldowns, one minutes slow
would keep ended ones, and their buckets would never line up. Each sync's pipeline runs
TIME just before its reads, which are judged against its reply (cooldown left, current
buckets, stale fields); expiries are relative (PEXPIRE), so Redis counts them. The writes
precede that reply in the pipeline, so they take the local wall clock plus the offset to
Redis's clock that the previous sync measured (at the middle of its round trip: off by
half a round trip, or for one sync after either clock steps). A process's first sync
measures it with a TIME of its own; every later sync stays one round trip. A Lua script
could read TIME before writing, but would move the whole exchange into Lua for no gain at
these scales. The breaker itself runs on the caller's monotonic clock, and an adopted
cooldown is capped at the policy's `cooldown_s`.

Redis being down or slow never reaches the caller: `sync` logs and returns, each process's
breaker keeps working on its own, and breakers opened meanwhile are published when Redis
is back (if still open). Replicas converge within about one sync interval. Every replica
whose cooldown ends admits its own half-open probe (one per process, not one per fleet):
a fleet-wide single probe would need a Redis round trip on the request path.
"""

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from routing.health import USAGE_WINDOW_S, BreakerPolicy, DeploymentHealth

logger = logging.getLogger(__name__)

# The fleet window is coarser than the local one: fewer hash fields to read every second.
FLEET_BUCKETS = 12


@dataclass(frozen=True, slots=True)
class _Field:
    deployment_id: int
    epoch: int
    bucket: int
    is_failures: bool


def _parse_field(raw: bytes | str) -> _Field | None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    parts = text.split(":")
    if len(parts) != 4 or parts[3] not in ("r", "f"):
        return None
    try:
        return _Field(int(parts[0]), int(parts[1]), int(parts[2]), parts[3] == "f")
    except ValueError:
        return None


def _parse_usage_field(raw: bytes | str) -> tuple[int, int, bool] | None:
    """`"{id}:{bucket}:r|t"` -> (deployment id, bucket, is_tokens)."""
    parts = (raw.decode() if isinstance(raw, bytes) else raw).split(":")
    if len(parts) != 3 or parts[2] not in ("r", "t"):
        return None
    try:
        return int(parts[0]), int(parts[1]), parts[2] == "t"
    except ValueError:
        return None


def _seconds(redis_time: tuple[int, int]) -> float:
    """A TIME reply (seconds, microseconds) as seconds."""
    return redis_time[0] + redis_time[1] / 1_000_000


def _int_keys(mapping: dict[bytes | str, bytes | str]) -> dict[int, int]:
    parsed: dict[int, int] = {}
    for key, value in mapping.items():
        try:
            parsed[int(key)] = int(value)
        except ValueError:
            continue
    return parsed


class SharedHealth:
    """Publishes this process's breaker transitions and window counts, and adopts the fleet's."""

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        *,
        key_prefix: str = "tollgate:health",
        policy: BreakerPolicy,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._policy = policy
        self._wall_clock = wall_clock  # this host's (tests skew it)
        # Redis's clock minus ours (seconds), as the last sync that reached Redis measured it.
        self._offset_s: float | None = None
        self._open_key = f"{key_prefix}:open"
        self._epoch_key = f"{key_prefix}:epoch"
        self._window_key = f"{key_prefix}:window"
        self._usage_key = f"{key_prefix}:usage"
        self._bucket_s = policy.window_s / FLEET_BUCKETS
        self._usage_bucket_s = USAGE_WINDOW_S / FLEET_BUCKETS
        # What this process added to the fleet usage: id -> {bucket: [requests, tokens]}.
        self._own_usage: dict[int, dict[int, list[int]]] = {}
        self._stale_usage_fields: list[str] = []
        # Epoch per deployment as last read (absent: 0).
        self._epochs: dict[int, int] = {}
        self._has_read = False
        # What this process added to the fleet window: id -> {(epoch, bucket): [r, f]}.
        self._own: dict[int, dict[tuple[int, int], list[int]]] = {}
        # Window fields found stale by the last read, deleted by the next sync.
        self._stale_fields: list[str] = []
        # Breakers opened here whose publication failed: id -> monotonic end of cooldown.
        self._unpublished_opens: dict[int, float] = {}
        self._failing = False

    async def sync(self, health: DeploymentHealth, now: float) -> None:
        """Publish local changes and apply the fleet's state, in one round trip; never raises.

        `now` is `time.monotonic()`, the clock `health` runs on.
        """
        changes = health.take_changes()
        opened = {**self._unpublished_opens, **changes.opened}
        for deployment_id in changes.closed:
            opened.pop(deployment_id, None)
        opened = {key: retry_at for key, retry_at in opened.items() if retry_at > now}
        closed = sorted(changes.closed)
        if self._offset_s is None:
            try:
                self._offset_s = await self._measure_offset()
            except (RedisError, OSError) as exc:
                self._report_failure(exc, opened)
                return
        shared_s = self._wall_clock() + self._offset_s  # Redis's clock, estimated
        bucket = math.floor(shared_s / self._bucket_s)

        pipe = self._redis.pipeline(transaction=False)
        for deployment_id, retry_at in opened.items():
            deadline_ms = round((shared_s + retry_at - now) * 1000)
            pipe.hset(self._open_key, str(deployment_id), deadline_ms)
        if opened:
            pipe.pexpire(self._open_key, round(2000 * self._policy.cooldown_s))
        # HINCRBY replies of our own closes sit at these positions of the results.
        epoch_replies: list[int] = []
        for deployment_id in closed:
            pipe.hdel(self._open_key, str(deployment_id))
            pipe.hincrby(self._epoch_key, str(deployment_id), 1)
            epoch_replies.append(len(pipe) - 1)
        if self._stale_fields:
            pipe.hdel(self._window_key, *self._stale_fields)
            self._stale_fields = []
        if self._stale_usage_fields:
            pipe.hdel(self._usage_key, *self._stale_usage_fields)
            self._stale_usage_fields = []
        added: list[tuple[int, int, int, int]] = []  # (id, epoch, requests, failures)
        for deployment_id, (requests, failures) in changes.window.items():
            epoch = self._epochs.get(deployment_id, 0)
            name = f"{deployment_id}:{epoch}:{bucket}"
            pipe.hincrby(self._window_key, f"{name}:r", requests)
            if failures:
                pipe.hincrby(self._window_key, f"{name}:f", failures)
            added.append((deployment_id, epoch, requests, failures))
        if added:
            window_ttl_ms = math.ceil(1000 * (self._policy.window_s + self._bucket_s))
            pipe.pexpire(self._window_key, window_ttl_ms)
        usage_bucket = math.floor(shared_s / self._usage_bucket_s)
        for deployment_id, (requests, tokens) in changes.usage.items():
            if requests:
                pipe.hincrby(self._usage_key, f"{deployment_id}:{usage_bucket}:r", requests)
            if tokens:
                pipe.hincrby(self._usage_key, f"{deployment_id}:{usage_bucket}:t", tokens)
        if changes.usage:
            usage_ttl_ms = math.ceil(1000 * (USAGE_WINDOW_S + self._usage_bucket_s))
            pipe.pexpire(self._usage_key, usage_ttl_ms)
        reads_at = len(pipe)
        pipe.time()
        pipe.hgetall(self._open_key)
        pipe.hgetall(self._epoch_key)
        pipe.hgetall(self._window_key)
        pipe.hgetall(self._usage_key)
        sent_s = self._wall_clock()
        try:
            results = await pipe.execute()
        except (RedisError, OSError) as exc:
            # Opens are re-sent next time if still open; closes and counts are dropped (a
            # late close could delete a newer open, and late counts would land in the
            # wrong bucket).
            self._report_failure(exc, opened)
            return
        redis_s = _seconds(results[reads_at])
        self._offset_s = redis_s - (sent_s + self._wall_clock()) / 2
        self._unpublished_opens = {}
        if self._failing:
            self._failing = False
            logger.info("health sync with Redis recovered; sharing circuit state again")

        for deployment_id, epoch, requests, failures in added:
            own = self._own.setdefault(deployment_id, {}).setdefault((epoch, bucket), [0, 0])
            own[0] += requests
            own[1] += failures
        for deployment_id, (requests, tokens) in changes.usage.items():
            own = self._own_usage.setdefault(deployment_id, {}).setdefault(usage_bucket, [0, 0])
            own[0] += requests
            own[1] += tokens
        # A close this process published is no signal to itself.
        for deployment_id, position in zip(closed, epoch_replies, strict=True):
            self._epochs[deployment_id] = int(results[position])
        open_raw, epoch_raw, window_raw, usage_raw = results[reads_at + 1 :]
        self._apply(health, now, redis_s, _int_keys(open_raw), _int_keys(epoch_raw), window_raw)
        self._apply_usage(health, now, redis_s, usage_raw)

    async def _measure_offset(self) -> float:
        """Redis's clock minus ours, from one TIME (taken as read mid-round-trip)."""
        sent_s = self._wall_clock()
        redis_s = _seconds(await self._redis.time())
        return redis_s - (sent_s + self._wall_clock()) / 2

    def _apply_usage(
        self,
        health: DeploymentHealth,
        now: float,
        redis_s: float,
        usage_raw: dict[bytes | str, bytes | str],
    ) -> None:
        """Apply the other replicas' last-minute usage (the fleet's sum minus our own)."""
        oldest = math.floor(redis_s / self._usage_bucket_s) - FLEET_BUCKETS + 1
        fleet: dict[int, list[int]] = {}
        for raw_name, raw_value in usage_raw.items():
            parsed = _parse_usage_field(raw_name)
            if parsed is None or parsed[1] < oldest:
                self._stale_usage_fields.append(
                    raw_name.decode() if isinstance(raw_name, bytes) else raw_name
                )
                continue
            try:
                value = int(raw_value)
            except ValueError:
                continue
            fleet.setdefault(parsed[0], [0, 0])[1 if parsed[2] else 0] += value
        for deployment_id in list(self._own_usage):
            own = {b: v for b, v in self._own_usage[deployment_id].items() if b >= oldest}
            if own:
                self._own_usage[deployment_id] = own
            else:
                del self._own_usage[deployment_id]
        health.merge_usage(_minus_own(fleet, self._own_usage), now)

    def _apply(
        self,
        health: DeploymentHealth,
        now: float,
        redis_s: float,
        deadlines_ms: dict[int, int],
        epochs: dict[int, int],
        window_raw: dict[bytes | str, bytes | str],
    ) -> None:
        opened: dict[int, float] = {}
        for deployment_id, deadline_ms in deadlines_ms.items():
            left_s = deadline_ms / 1000 - redis_s
            if left_s > 0:
                opened[deployment_id] = min(left_s, self._policy.cooldown_s)

        # An epoch that moved since the last read is a close, unless the breaker is open
        # again. The first read only learns the epochs: they hold past closes.
        closed: list[int] = []
        for deployment_id, epoch in epochs.items():
            moved = epoch != self._epochs.get(deployment_id, 0)
            if moved and self._has_read and deployment_id not in opened:
                closed.append(deployment_id)
            self._epochs[deployment_id] = epoch
        self._has_read = True
        health.merge_shared(opened, now, closed=closed)

        current = math.floor(redis_s / self._bucket_s)
        oldest = current - FLEET_BUCKETS + 1
        fleet: dict[int, list[int]] = {}
        for raw_name, raw_value in window_raw.items():
            parsed = _parse_field(raw_name)
            if parsed is None:
                continue
            epoch = self._epochs.get(parsed.deployment_id, 0)
            if parsed.epoch != epoch or parsed.bucket < oldest:
                self._stale_fields.append(
                    raw_name.decode() if isinstance(raw_name, bytes) else raw_name
                )
                continue
            try:
                value = int(raw_value)
            except ValueError:
                continue
            counts = fleet.setdefault(parsed.deployment_id, [0, 0])
            counts[1 if parsed.is_failures else 0] += value

        for deployment_id in list(self._own):
            epoch = self._epochs.get(deployment_id, 0)
            own = {
                key: value
                for key, value in self._own[deployment_id].items()
                if key[0] == epoch and key[1] >= oldest
            }
            if own:
                self._own[deployment_id] = own
            else:
                del self._own[deployment_id]
        health.merge_window(_minus_own(fleet, self._own), now)

    def _report_failure(self, exc: Exception, opened: dict[int, float]) -> None:
        """Keep `opened` to publish next time; warn once per outage, not once per second."""
        self._unpublished_opens = opened
        if self._failing:
            logger.debug("health sync with Redis still failing: %s", exc)
            return
        self._failing = True
        logger.warning(
            "health sync with Redis failed (%s); circuit breakers work per process until back",
            exc,
        )


def _minus_own(
    fleet: dict[int, list[int]], own: Mapping[int, Mapping[Any, list[int]]]
) -> dict[int, tuple[int, int]]:
    """The other replicas' share: the fleet's pair of counts per deployment minus the
    counts this process added itself (summed over its buckets)."""
    others: dict[int, tuple[int, int]] = {}
    for deployment_id, (first, second) in fleet.items():
        own_first = own_second = 0
        for value in own.get(deployment_id, {}).values():
            own_first += value[0]
            own_second += value[1]
        remote = (max(0, first - own_first), max(0, second - own_second))
        if any(remote):
            others[deployment_id] = remote
    return others
