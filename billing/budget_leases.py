"""Budget and rate leases: a busy key's requests admitted without a round trip to Redis.

A request admitted on budgets or rate limits reserves in Redis before its upstream
call: at one connection that round trip was most of the gateway's added latency. So a
web process *leases* room for a busy profile (the same budget lines and rate buckets;
in practice one key under load): one script call holds room for many requests like
the last one on every line, under the lease's id, and takes units from every bucket.
A request the lease has room for is admitted from it without a call. Its settle moves
its actual cost out of the lease's hold into the lines' settled totals (settled +
reserved unchanged), through the batched settle client. A lease is a hold like a
request's, and requests are admitted from it only within it, so hard budgets stay
exact: the shared totals never let the fleet admit more than a limit allows.

- A profile gets a lease after LEASE_AFTER reserves within LEASE_WINDOW_S. The lease
  grows in the background when half used. It is given back (its hold released, its
  unused units returned to their buckets) once nothing has used it for LEASE_IDLE_S
  and nothing it admitted is in flight, and when the process stops.
- Grants are bounded: at most 1/ROOM_SHARE of a hard line's room and of a bucket's
  level, and never for fewer than MIN_GRANT_REQUESTS requests. Near a limit no grant is
  worth taking: the lease gives back the room it has not handed out, and requests
  reserve one by one again, refused exactly as before. (Another process's lease may
  still hold a sliver of room until it notices the same, on its next request.)
- A lease's hold lives twice as long as the longest request it admits (each grant
  moves its deadline), and it admits only requests that end before it expires. A
  lease whose process died is released by the in-flight reaper (billing/inflight.py)
  once the process is found dead, or else by that expiry. One whose grant or a settle
  failed (Redis away) admits nothing more and is given back when idle.

For readers of the counters: a line's `reserved` includes what busy processes hold
ahead (given back within about a second of idling), and a bucket's level is lower by
the units they hold. A leased request's rate-limit headers are worked out from its
lease's last grant.
"""

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from billing.budget_counters import (
    BucketLevel,
    BudgetCounters,
    BudgetLine,
    InflightEntry,
    LineSpend,
    RateBucket,
    RateCharge,
    RedisBudgetCounters,
    ReserveResult,
    ReserveStatus,
    SettleResult,
)
from billing.inflight import inflight_lease_payload

logger = logging.getLogger(__name__)

LEASE_AFTER = 8  # reserves of one profile within LEASE_WINDOW_S that make it busy
LEASE_WINDOW_S = 1.0
LEASE_REQUESTS = 64  # a grant asks for room for this many requests like the last one
MIN_GRANT_REQUESTS = 16  # a smaller grant is not worth holding: reserve one by one
ROOM_SHARE = 16  # a grant takes at most this share of a hard line's room or a bucket's level
LEASE_IDLE_S = 1.0
_KEEPER_EVERY_S = 0.25
# A lease this close to its deadline is not grown: its hold may expire before the grant
# runs, and the grant would then hold less than this process counts on.
_EXPIRY_MARGIN_S = 10.0
_DEMAND_MAX_ENTRIES = 100_000

# A lease's lines and buckets by identity: the proxy's lines and buckets are cached per
# snapshot, and a lease keeps them alive, so an id in a live lease's profile is never
# reused. A changed budget or limit is a new object, so a new profile (and lease).
Profile = tuple[int, ...]


@dataclass(eq=False, slots=True)
class _Lease:
    lease_id: str
    lines: tuple[BudgetLine, ...]
    buckets: tuple[RateBucket, ...]
    size_nanos: int = 0  # held for it on each line, as this process counts it
    admitted_nanos: int = 0  # the largest costs of its requests in flight
    pools: list[int] = field(default_factory=list)  # units of each bucket not handed out
    levels: list[float] = field(default_factory=list)  # each bucket after the last grant
    spends: tuple[LineSpend, ...] = ()  # each line after the last grant
    in_flight: int = 0
    expires_at: float = 0.0  # monotonic; its hold expires in Redis no earlier
    used_at: float = 0.0
    grant_nanos: int = 0  # the last grant, to tell when half of it is used
    grant_units: tuple[int, ...] = ()
    growing: bool = False
    exhausted: bool = False  # near a limit: no more grants; closed once it cannot admit
    closed: bool = False  # admits nothing more; given back once its requests settle

    def admits(
        self, amount_nanos: int, charges: Sequence[RateCharge], ttl_s: float, now: float
    ) -> bool:
        if self.closed or self.expires_at - now < ttl_s:
            return False
        if self.size_nanos - self.admitted_nanos < amount_nanos:
            return False
        return all(pool >= charge.amount for pool, charge in zip(self.pools, charges, strict=True))

    def running_low(self, ttl_s: float, now: float) -> bool:
        if self.size_nanos - self.admitted_nanos < self.grant_nanos // 2:
            return True
        if any(p < g // 2 for p, g in zip(self.pools, self.grant_units, strict=True)):
            return True
        return self.expires_at - now < 1.5 * ttl_s


def _grant_size(
    amount_nanos: int, charges: Sequence[RateCharge], spends: Sequence[LineSpend],
    levels: Sequence[float],
) -> tuple[int, tuple[int, ...]] | None:  # fmt: skip
    """What to ask for: room for LEASE_REQUESTS requests like this one, bounded by each
    hard line's room and each bucket's level; None if that is too little to be worth it."""
    nanos = LEASE_REQUESTS * amount_nanos
    for spend in spends:
        if spend.line.hard:
            room = spend.line.limit_nanos - (spend.settled_nanos or 0) - spend.reserved_nanos
            nanos = min(nanos, max(0, room) // ROOM_SHARE)
    if nanos < MIN_GRANT_REQUESTS * amount_nanos:
        return None
    units = []
    for charge, level in zip(charges, levels, strict=True):
        granted = min(LEASE_REQUESTS * charge.amount, max(0, math.floor(level / ROOM_SHARE)))
        if granted < MIN_GRANT_REQUESTS * charge.amount:
            return None
        units.append(granted)
    return nanos, tuple(units)


class LeasedBudgetCounters(BudgetCounters):
    """Shared counters that admit a busy profile's requests from a lease held by this
    process. Use it from the event loop that serves requests only: local admission and
    settling run without awaiting, so they are atomic on it."""

    def __init__(
        self, shared: RedisBudgetCounters, *, inflight_key: str | None = None,
        lease_after: int = LEASE_AFTER, idle_s: float = LEASE_IDLE_S,
    ) -> None:  # fmt: skip
        self.shared = shared
        # This process's in-flight hash (billing/inflight.py): a lease registered there is
        # released as soon as the process is found dead, not at the lease's deadline.
        self._inflight_key = inflight_key
        self._lease_after = lease_after
        self._idle_s = idle_s
        self._leases: dict[Profile, _Lease] = {}
        self._demand: dict[Profile, tuple[float, int]] = {}  # window start, reserves
        self._admitted: dict[str, tuple[_Lease, int, tuple[RateCharge, ...]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._process = uuid.uuid4().hex[:12]

    @property
    def leases(self) -> int:
        return len(self._leases)

    async def reserve(
        self,
        request_id: str,
        lines: Sequence[BudgetLine],
        amount_nanos: int,
        ttl_s: float,
        charges: Sequence[RateCharge] = (),
        inflight: InflightEntry | None = None,
    ) -> ReserveResult:
        profile = (*map(id, lines), 0, *(id(charge.bucket) for charge in charges))
        lease = self._leases.get(profile)
        now = time.monotonic()
        if lease is not None:
            if lease.admits(amount_nanos, charges, ttl_s, now):
                return self._admit(lease, request_id, amount_nanos, charges, ttl_s, now)
            if lease.exhausted:
                # Near a limit: the room it has not handed out goes back before this
                # request reserves on its own, so none sits unused while it is refused.
                await self._close(lease)
        result = await self.shared.reserve(
            request_id, lines, amount_nanos, ttl_s, charges, inflight=inflight
        )
        if result.status is ReserveStatus.RESERVED and (lines or charges):
            self._busier(profile, lines, amount_nanos, ttl_s, charges, result, now)
        return result

    def _admit(
        self, lease: _Lease, request_id: str, amount_nanos: int, charges: Sequence[RateCharge],
        ttl_s: float, now: float,
    ) -> ReserveResult:  # fmt: skip
        lease.admitted_nanos += amount_nanos
        lease.in_flight += 1
        lease.used_at = now
        levels = []
        for j, charge in enumerate(charges):
            lease.pools[j] -= charge.amount
            levels.append(
                BucketLevel(charge.bucket, lease.levels[j] + lease.pools[j], charge.amount)
            )
        self._admitted[request_id] = (lease, amount_nanos, tuple(charges))
        if not lease.growing and not lease.exhausted and lease.running_low(ttl_s, now):
            self._grow(lease, amount_nanos, charges, lease.spends, lease.levels, ttl_s)
        return ReserveResult(
            ReserveStatus.RESERVED, amount_nanos, spends=lease.spends, levels=tuple(levels),
            leased=True,
        )  # fmt: skip

    def _busier(
        self, profile: Profile, lines: Sequence[BudgetLine], amount_nanos: int, ttl_s: float,
        charges: Sequence[RateCharge], result: ReserveResult, now: float,
    ) -> None:  # fmt: skip
        """Count a reserve made one by one; lease for its profile once it is busy."""
        lease = self._leases.get(profile)
        if lease is not None:
            # Its lease ran out (or is too close to expiry for this request): grow it.
            if not lease.growing and not lease.exhausted and not lease.closed:
                self._grow(lease, amount_nanos, charges, lease.spends, lease.levels, ttl_s)
            return
        start, count = self._demand.get(profile, (now, 0))
        if now - start > LEASE_WINDOW_S:
            start, count = now, 0
        if count + 1 < self._lease_after:
            self._demand[profile] = (start, count + 1)
            return
        self._demand.pop(profile, None)
        if len(self._demand) > _DEMAND_MAX_ENTRIES:
            self._demand.clear()
        levels = [level.level for level in result.levels]
        if _grant_size(amount_nanos, charges, result.spends, levels) is None:
            return  # near a limit: keep reserving one by one
        lease = _Lease(
            lease_id=f"lease:{self._process}:{next(self._ids)}",
            lines=tuple(lines),
            buckets=tuple(charge.bucket for charge in charges),
            pools=[0] * len(charges),
            levels=levels,
            grant_units=(0,) * len(charges),
            used_at=now,
        )
        self._leases[profile] = lease
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.ensure_future(self._keep())
        self._grow(lease, amount_nanos, charges, result.spends, levels, ttl_s)

    def _grow(
        self, lease: _Lease, amount_nanos: int, charges: Sequence[RateCharge],
        spends: Sequence[LineSpend], levels: Sequence[float], ttl_s: float,
    ) -> None:  # fmt: skip
        if lease.expires_at and lease.expires_at - time.monotonic() < _EXPIRY_MARGIN_S:
            lease.closed = True
            return
        size = _grant_size(amount_nanos, charges, spends, levels)
        if size is None:
            lease.exhausted = True
            self._spawn(self._close(lease))
            return
        lease.growing = True
        self._spawn(self._grant(lease, *size, ttl_s))

    async def _grant(self, lease: _Lease, nanos: int, units: tuple[int, ...], ttl_s: float) -> None:
        sent_at = time.monotonic()
        takes = [RateCharge(bucket, n) for bucket, n in zip(lease.buckets, units, strict=True)]
        entry = None
        if self._inflight_key is not None:
            entry = InflightEntry(self._inflight_key, inflight_lease_payload(lease.lines))
        try:
            result = await self.shared.lease(
                lease.lease_id, lease.lines, nanos, 2 * ttl_s, takes, inflight=entry
            )
        except (RedisError, OSError) as exc:
            # Whether it ran is unknown: count on nothing more from it.
            logger.warning("Growing budget lease %s failed (%s): closing it", lease.lease_id, exc)
            lease.closed = True
            return
        finally:
            lease.growing = False
        if result.status is not ReserveStatus.RESERVED:
            lease.exhausted = True  # near a limit (or counters missing)
            await self._close(lease)
            return
        lease.size_nanos += nanos
        for j, granted in enumerate(units):
            lease.pools[j] += granted
        lease.levels = [level.level for level in result.levels]
        lease.spends = result.spends
        lease.grant_nanos, lease.grant_units = nanos, units
        lease.expires_at = sent_at + 2 * ttl_s

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finished(self, request_id: str) -> tuple[_Lease, tuple[RateCharge, ...]] | None:
        """Take a leased request off its lease's in-flight count (None: not leased)."""
        admitted = self._admitted.pop(request_id, None)
        if admitted is None:
            return None
        lease, amount_nanos, charges = admitted
        lease.admitted_nanos -= amount_nanos
        lease.in_flight -= 1
        return lease, charges

    async def settle(
        self,
        request_id: str,
        lines: Sequence[BudgetLine],
        actual_nanos: int,
        refunds: Sequence[RateCharge] = (),
    ) -> SettleResult:
        finished = self._finished(request_id)
        if finished is None:
            return await self.shared.settle(request_id, lines, actual_nanos, refunds)
        lease, _ = finished
        lease.size_nanos -= actual_nanos  # the script moves it out of the lease's hold
        for refund in refunds:
            lease.pools[lease.buckets.index(refund.bucket)] += refund.amount
        try:
            return await self.shared.settle(
                request_id, lines, actual_nanos, lease_id=lease.lease_id
            )
        except (RedisError, OSError):
            # Redis may have lost the lease's hold (a restart): count on it no more.
            lease.closed = True
            raise

    async def void(
        self, request_id: str, lines: Sequence[BudgetLine], charges: Sequence[RateCharge] = ()
    ) -> None:
        finished = self._finished(request_id)
        if finished is None:
            await self.shared.void(request_id, lines, charges)
            return
        lease, taken = finished
        for charge in taken:
            lease.pools[lease.buckets.index(charge.bucket)] += charge.amount

    async def spent(self, lines: Sequence[BudgetLine]) -> tuple[LineSpend, ...]:
        return await self.shared.spent(lines)

    async def rate_levels(self, buckets: Sequence[RateBucket]) -> tuple[BucketLevel, ...]:
        return await self.shared.rate_levels(buckets)

    async def seed(self, line: BudgetLine, settled_nanos: int) -> int:
        return await self.shared.seed(line, settled_nanos)

    async def _keep(self) -> None:
        """Give back leases nobody uses, while there are any."""
        while self._leases:
            await asyncio.sleep(_KEEPER_EVERY_S)
            now = time.monotonic()
            for profile, lease in list(self._leases.items()):
                if lease.expires_at and now > lease.expires_at:
                    # Its hold has expired in Redis; a request it admitted that never
                    # settled (it would have been settled by now) keeps it no longer.
                    await self._give_back(profile, lease)
                elif lease.in_flight or lease.growing:
                    continue
                elif lease.closed or now - lease.used_at >= self._idle_s:
                    await self._give_back(profile, lease)

    async def _close(self, lease: _Lease) -> None:
        """Admit nothing more from `lease`; give back the room and units it has not handed
        out now, and the rest once its requests have settled (`_give_back`)."""
        if lease.closed:
            return
        lease.closed = True
        unused = max(0, lease.size_nanos - lease.admitted_nanos)
        lease.size_nanos -= unused
        give_back = [
            RateCharge(bucket, pool)
            for bucket, pool in zip(lease.buckets, lease.pools, strict=True)
            if pool > 0
        ]
        lease.pools = [min(0, pool) for pool in lease.pools]
        try:
            # By how much, not down to what: settles still on their way shrink it too.
            await self.shared.lease_return(
                lease.lease_id, lease.lines, give_back, release_nanos=unused
            )
        except (RedisError, OSError) as exc:
            logger.warning("Shrinking budget lease %s failed (%s)", lease.lease_id, exc)

    async def _give_back(self, profile: Profile, lease: _Lease) -> None:
        if self._leases.get(profile) is lease:
            del self._leases[profile]
        lease.closed = True
        give_back = [
            RateCharge(bucket, pool)
            for bucket, pool in zip(lease.buckets, lease.pools, strict=True)
            if pool
        ]
        try:
            await self.shared.lease_return(
                lease.lease_id, lease.lines, give_back, inflight_key=self._inflight_key
            )
        except (RedisError, OSError) as exc:
            logger.warning(
                "Returning budget lease %s failed (%s): it expires by itself", lease.lease_id, exc
            )

    async def aclose(self) -> None:
        """Give back every lease with nothing in flight (call once requests have settled;
        one still holding requests expires by itself)."""
        for task in [*self._tasks, *([self._keeper] if self._keeper else [])]:
            task.cancel()
        for profile, lease in list(self._leases.items()):
            if not lease.in_flight:
                await self._give_back(profile, lease)
