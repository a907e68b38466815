"""Budget counters: reserve a request's maximum cost on every budget, settle the actual cost.

Each budget line (one budget in one period) has a *settled* total (what requests
really cost) and a *reserved* total (the maximum cost of requests in flight).
`reserve` admits a request only if every hard line still has room for its maximum
cost, atomically across all lines, so concurrent requests can never overspend a
hard limit; `settle` replaces the hold with the actual cost. A hold whose request
crashed expires after its TTL and is released by the next operation on that line.

The same operation takes the request's rate-limit charges: token buckets
(requests or tokens per minute, for a key, team or org) that refill
continuously. A reserve admits the request only if every budget and every
bucket has room, and then takes from all of them at once; settle gives back
the tokens a request was charged but did not use. So the hot path makes one
round trip before the upstream call and one after, whatever limits apply.

Two implementations with the same semantics (one contract test suite):
`RedisBudgetCounters` (shared by every web replica: one Lua script, one round trip
per operation) and `InProcessBudgetCounters` (the embedded default).

"No counter" is not "zero": after Redis lost its data (or at the start of a new
period) a line has no settled total, and `reserve` answers MISSING, reserving
nothing. The caller then seeds those lines from the ledger
(`billing.budget_ledger.abudget_counters_seed`) and reserves again. That costs
extra round trips and one DB query only on a line's first request after a loss or
a period start; every other request stays at one round trip before the upstream
call and one after, with no DB query. (Precomputing seed values for every request
would put the DB on the hot path.) Retry once: a line still missing after seeding
means the counters are failing, and the caller's fail-open/closed policy applies.

Money is integer nano-USD. Lua numbers are doubles, so limits and amounts must
stay below 2**53 nano-USD (about 9 million USD per budget period); lines and
amounts are checked against that bound.
"""

import abc
import enum
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from billing.budget_counters_lua import BUDGET_COUNTERS_LUA
from billing.budget_periods import BudgetWindow, budget_window

MAX_NANOS = 2**53  # exact integers in Lua's doubles
# Counter keys outlive their period a little, so late settles still find them.
KEY_GRACE_S = 3600
# How long a settle is remembered, so a repeated settle is a no-op.
SETTLE_MEMORY_S = 86_400
# A script runs alone: Redis answers no one else meanwhile. Reading every budget's
# standing (tens of thousands of lines: alerts, the dashboard) goes this many lines per
# call, a few milliseconds each, so the proxy's reserves are never held up for long.
SPENT_LINES_PER_CALL = 500
_SCRIPT_SHA = hashlib.sha1(BUDGET_COUNTERS_LUA.encode()).hexdigest()  # Redis's script id
# A line's keys, in the order the script expects them.
_LINE_KEY_PARTS = ("settled", "reserved", "holds", "amounts", "refused")

Clock = Callable[[], float]


class ScriptClient(Protocol):
    """What the counters need of a Redis client: `redis.asyncio.Redis`, or the proxy's
    `billing.redis_multiplex.MultiplexedRedis`."""

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class InflightEntry:
    """A request's write-ahead usage entry (billing/inflight.py), stored with its holds."""

    hash_key: str  # the in-flight hash of the process serving the request
    payload: bytes


@dataclass(frozen=True, slots=True)
class BudgetLine:
    """One budget in its current period, as the hot path sees it."""

    budget_id: int
    limit_nanos: int
    hard: bool
    window: BudgetWindow
    # Derived once per line, not per call: the hot path sends them with every
    # operation (the keys lazily: the alerts check builds every budget's line).
    end_ts: float | None = field(init=False, repr=False, compare=False)
    _redis_keys: tuple[str, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.limit_nanos < MAX_NANOS:
            raise ValueError(f"limit_nanos must be in (0, 2**53): {self.limit_nanos}")
        end_at = self.window.end_at
        object.__setattr__(self, "end_ts", None if end_at is None else end_at.timestamp())

    @property
    def redis_keys(self) -> tuple[str, ...]:
        keys = self._redis_keys
        if keys is None:
            prefix = self.key_prefix
            keys = tuple(f"{prefix}:{part}" for part in _LINE_KEY_PARTS)
            object.__setattr__(self, "_redis_keys", keys)
        return keys

    @property
    def period_id(self) -> str:
        return self.window.period_id

    @property
    def key_prefix(self) -> str:
        return f"tollgate:budget:{self.budget_id}:{self.period_id}"


def budget_line(
    *, budget_id: int, period: str, time_zone: str, limit_nanos: int, hard: bool, at: datetime
) -> BudgetLine:
    """The line of a budget for the period containing `at` (in the org's time zone)."""
    window = budget_window(period, time_zone, at)
    return BudgetLine(budget_id=budget_id, limit_nanos=limit_nanos, hard=hard, window=window)


@dataclass(frozen=True, slots=True)
class LineSpend:
    """A line's totals at one moment (settled is None when the counter is missing)."""

    line: BudgetLine
    settled_nanos: int | None
    reserved_nanos: int
    # A request was refused on this line during its period (read by `spent` only).
    refused: bool = False


@dataclass(frozen=True, slots=True)
class RateBucket:
    """A per-minute limit as a token bucket: `capacity` a minute, refilled continuously.

    `name` identifies the limited thing, e.g. "key:12:requests". A bucket nobody
    took from lately is full.
    """

    name: str
    capacity: int
    refill_per_s: float = field(init=False, repr=False, compare=False)
    redis_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError(f"capacity must be positive: {self.capacity}")
        object.__setattr__(self, "refill_per_s", self.capacity / 60)
        object.__setattr__(self, "redis_key", f"tollgate:rate:{self.name}")


@dataclass(frozen=True, slots=True)
class RateCharge:
    """Units (requests or tokens) to take from a bucket; at settle, units to give back."""

    bucket: RateBucket
    amount: int


@dataclass(frozen=True, slots=True)
class BucketLevel:
    """What a bucket held at one moment (negative after an under-estimate)."""

    bucket: RateBucket
    level: float
    amount: int = 0  # what the request took, or (refused) wanted

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.level))

    @property
    def full_in_s(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.bucket.capacity - self.level) / self.bucket.refill_per_s)

    @property
    def wait_s(self) -> float:
        """Seconds until the bucket could give `amount`."""
        return max(0.0, (self.amount - self.level) / self.bucket.refill_per_s)


class ReserveStatus(enum.Enum):
    RESERVED = "reserved"
    EXCEEDED = "exceeded"  # a hard line has no room: nothing reserved
    MISSING = "missing"  # some counters are absent: seed them, then reserve again
    ALREADY_HELD = "already_held"  # this request id already holds its reservation
    RATE_LIMITED = "rate_limited"  # a rate bucket is short: nothing reserved or taken
    VOIDED = "voided"  # the request was voided (its caller gave up): nothing taken


@dataclass(frozen=True, slots=True)
class ReserveResult:
    status: ReserveStatus
    amount_nanos: int
    # RESERVED / ALREADY_HELD: every line after reserving; EXCEEDED: the hard lines
    # that had no room, with their totals before this request.
    spends: tuple[LineSpend, ...] = ()
    missing: tuple[BudgetLine, ...] = ()
    # RESERVED: every bucket after taking; RATE_LIMITED: the short buckets, before.
    levels: tuple[BucketLevel, ...] = ()
    # Admitted from this process's lease (billing/budget_leases.py): nothing was written
    # to the shared counters, so neither was the in-flight entry; the totals above are
    # as of the lease's last grant.
    leased: bool = False

    @property
    def admitted(self) -> bool:
        return self.status in (ReserveStatus.RESERVED, ReserveStatus.ALREADY_HELD)


@dataclass(frozen=True, slots=True)
class SettleResult:
    # False when this request was already settled: nothing changed.
    applied: bool
    # The hold found and released (0 when it was unknown or had expired).
    released_nanos: int = 0
    # Lines without a counter: the cost was not added there (the ledger has it).
    missing: tuple[BudgetLine, ...] = ()


def _check_nanos(name: str, value: int) -> None:
    if not 0 <= value < MAX_NANOS:
        raise ValueError(f"{name} must be in [0, 2**53): {value}")


def _key_ttl_ms(line: BudgetLine, now: float) -> int:
    """Milliseconds the line's keys should live (0: forever), measured on our clock."""
    if line.end_ts is None:
        return 0
    return max(1, int((line.end_ts + KEY_GRACE_S - now) * 1000))


class BudgetCounters(abc.ABC):
    """Atomic budget counters and rate buckets. Every operation is all-or-nothing."""

    @abc.abstractmethod
    async def reserve(
        self,
        request_id: str,
        lines: Sequence[BudgetLine],
        amount_nanos: int,
        ttl_s: float,
        charges: Sequence[RateCharge] = (),
        inflight: InflightEntry | None = None,
    ) -> ReserveResult:
        """Hold `amount_nanos` on every line and take every charge, if all have room.

        Room means settled + reserved + amount <= limit on every hard line (soft
        lines never refuse), and at least the charge in every bucket. Otherwise
        nothing is held or taken; a refusing line remembers it was refused.
        The hold expires `ttl_s` seconds from now unless settled before.
        `inflight` is stored with the holds, in the same step (shared counters only:
        a process's own counters die with it).
        """

    @abc.abstractmethod
    async def settle(
        self,
        request_id: str,
        lines: Sequence[BudgetLine],
        actual_nanos: int,
        refunds: Sequence[RateCharge] = (),
    ) -> SettleResult:
        """Release the request's hold, add `actual_nanos` (in full) to each line's settled,
        and give each refund back to its bucket (never above capacity).

        Give the lines the request reserved on. An unknown or expired hold still
        records the cost; settling the same request again changes nothing.
        """

    @abc.abstractmethod
    async def void(
        self, request_id: str, lines: Sequence[BudgetLine], charges: Sequence[RateCharge] = ()
    ) -> None:
        """Cancel a reserve whose answer never came (a timeout), whether it ran or not.

        Releases the request's holds and gives its charges back if the reserve ran;
        a reserve that arrives afterwards takes nothing (VOIDED). Idempotent.
        """

    @abc.abstractmethod
    async def spent(self, lines: Sequence[BudgetLine]) -> tuple[LineSpend, ...]:
        """Each line's settled and reserved totals and whether it refused a request
        this period (expired holds released first)."""

    @abc.abstractmethod
    async def rate_levels(self, buckets: Sequence[RateBucket]) -> tuple[BucketLevel, ...]:
        """What each bucket holds now, taking nothing."""

    @abc.abstractmethod
    async def seed(self, line: BudgetLine, settled_nanos: int) -> int:
        """Raise the line's settled total to at least `settled_nanos`, creating it if missing.

        Never lowers a counter: a lower figure comes from a ledger that has not yet
        caught up with requests in flight. Returns the settled total now.
        """


def _spends(lines: Sequence[BudgetLine], flat: Sequence[int]) -> tuple[LineSpend, ...]:
    return tuple(
        LineSpend(line, None if flat[2 * i] < 0 else int(flat[2 * i]), int(flat[2 * i + 1]))
        for i, line in enumerate(lines)
    )


def _check_charges(charges: Sequence[RateCharge], *, taking: bool) -> None:
    for charge in charges:
        if taking and charge.amount < 0:
            raise ValueError(f"A rate charge takes a positive amount: {charge}")
        if abs(charge.amount) >= MAX_NANOS:
            raise ValueError(f"A rate charge must stay below 2**53: {charge}")


@asynccontextmanager
async def redis_budget_counters(redis_url: str) -> AsyncIterator["RedisBudgetCounters"]:
    """Counters on a Redis client of their own, closed afterwards (for Celery tasks)."""
    client = Redis.from_url(redis_url)
    try:
        yield RedisBudgetCounters(client)
    finally:
        await client.aclose()


class RedisBudgetCounters(BudgetCounters):
    """Counters shared through Redis: each operation is one EVALSHA of one script
    (sent as EVAL, which loads it, when Redis answers NOSCRIPT after a restart or
    SCRIPT FLUSH). All of a request's
    lines and buckets must live on one Redis (no cluster sharding). Redis errors
    propagate: the caller decides whether to fail open or closed. Configure Redis
    with a `noeviction` policy: an evicted settled counter reads as missing and is
    re-seeded from the ledger, which can lag by the requests in flight.

    Keys: `tollgate:budget:{budget_id}:{period_id}:settled|reserved|holds|amounts|refused`,
    expiring KEY_GRACE_S after the period ends (never for lifetime);
    `tollgate:budget:settle:{request_id}`, which remembers a settle for
    SETTLE_MEMORY_S; `tollgate:rate:{bucket}`, dropped once the bucket is full
    again.

    Hold deadlines and bucket refills are compared across replicas, so by default
    they are measured on Redis's clock (TIME, inside the script): one clock for the
    fleet, whatever each host's says. A `clock` given (tests) replaces it. Key TTLs
    are relative, measured here (a skewed host shifts them by its skew, well inside
    KEY_GRACE_S). Which *period* a request counts in is the caller's choice (its
    `started_at`, the instant its usage event carries), so counter and ledger agree.
    """

    def __init__(
        self, client: ScriptClient, *, settle_client: ScriptClient | None = None,
        clock: Clock | None = None,
    ) -> None:  # fmt: skip
        self._client = client
        # Settles nobody waits on may go through a client that batches them.
        self._settle_client = settle_client or client
        self._clock = clock

    async def _run(
        self,
        op: str,
        lines: Sequence[BudgetLine],
        *,
        request_id: str = "",
        nanos: int = 0,
        hold_ttl_s: float = 0,
        buckets: Sequence[RateCharge] = (),
        inflight: InflightEntry | None = None,
        line_keys: Sequence[tuple[str, ...]] | None = None,
        lease_id: str | None = None,
        inflight_key: str | None = None,
    ) -> list[int]:
        clock = self._clock
        now = time.time() if clock is None else clock()
        keys = [f"tollgate:budget:settle:{request_id}"]
        line_keys = line_keys or ()
        # An empty `now` has the script read Redis's clock.
        args: list[str | int | float | bytes] = [
            op, request_id, "" if clock is None else now, len(lines) + len(line_keys), nanos,
            hold_ttl_s, SETTLE_MEMORY_S, len(buckets),
        ]  # fmt: skip
        for line in lines:
            keys += line.redis_keys
            args += [line.limit_nanos, int(line.hard), _key_ttl_ms(line, now)]
        for known_keys in line_keys:  # lines known by their keys alone (no limit needed)
            keys += known_keys
            args += [0, 0, 0]
        for charge in buckets:
            keys.append(charge.bucket.redis_key)
            args += [charge.bucket.capacity, charge.bucket.refill_per_s, charge.amount]
        if inflight is not None:
            keys.append(inflight.hash_key)
            args.append(inflight.payload)
        if inflight_key is not None:
            keys.append(inflight_key)
        if lease_id is not None:
            args.append(lease_id)
        # EVALSHA directly (redis-py's Script wrapper type-checks the client on every
        # call: a measurable share of a proxy worker); EVAL loads it after a restart.
        client = self._settle_client if op == "settle" else self._client
        try:
            reply: list[int] = await client.evalsha(_SCRIPT_SHA, len(keys), *keys, *args)
        except NoScriptError:
            reply = await client.eval(BUDGET_COUNTERS_LUA, len(keys), *keys, *args)
        return reply

    async def reserve(
        self,
        request_id: str,
        lines: Sequence[BudgetLine],
        amount_nanos: int,
        ttl_s: float,
        charges: Sequence[RateCharge] = (),
        inflight: InflightEntry | None = None,
    ) -> ReserveResult:
        _check_nanos("amount_nanos", amount_nanos)
        _check_charges(charges, taking=True)
        if not lines and not charges:
            return ReserveResult(ReserveStatus.RESERVED, amount_nanos)
        reply = await self._run(
            "reserve", lines, request_id=request_id, nanos=amount_nanos, hold_ttl_s=ttl_s,
            buckets=charges, inflight=inflight,
        )  # fmt: skip
        return _reserve_result(reply, lines, amount_nanos, charges)

    async def lease(
        self,
        lease_id: str,
        lines: Sequence[BudgetLine],
        amount_nanos: int,
        ttl_s: float,
        takes: Sequence[RateCharge] = (),
        inflight: InflightEntry | None = None,
    ) -> ReserveResult:
        """Grow lease `lease_id` (billing/budget_leases.py) by `amount_nanos` on every
        line and take `takes` from the buckets, if all have room; as `reserve`, but the
        hold adds up over calls, its deadline moves to `ttl_s` from now, and a refusal
        marks no line refused (no request was). `inflight` is the lease's own entry."""
        _check_nanos("amount_nanos", amount_nanos)
        _check_charges(takes, taking=True)
        reply = await self._run(
            "lease", lines, request_id=lease_id, nanos=amount_nanos, hold_ttl_s=ttl_s,
            buckets=takes, inflight=inflight,
        )  # fmt: skip
        return _reserve_result(reply, lines, amount_nanos, takes)

    async def lease_return(
        self, lease_id: str, lines: Sequence[BudgetLine], give_back: Sequence[RateCharge] = (),
        *, inflight_key: str | None = None, release_nanos: int | None = None,
    ) -> int:  # fmt: skip
        """Release what lease `lease_id` still holds (only `release_nanos` of it, if given),
        give `give_back` to the buckets (negative: take) and, released whole, delete its
        entry from `inflight_key`. Returns the nanos released."""
        _check_charges(give_back, taking=False)
        if release_nanos is not None:
            _check_nanos("release_nanos", release_nanos)
        reply = await self._run(
            "lease_return", lines, request_id=lease_id, buckets=give_back,
            nanos=-1 if release_nanos is None else release_nanos, inflight_key=inflight_key,
        )  # fmt: skip
        return int(reply[1])

    async def settle(
        self,
        request_id: str,
        lines: Sequence[BudgetLine],
        actual_nanos: int,
        refunds: Sequence[RateCharge] = (),
        *,
        lease_id: str | None = None,
    ) -> SettleResult:
        """As the contract says; with `lease_id`, for a request admitted from that lease
        (billing/budget_leases.py): its cost leaves the lease's hold (as far as it holds)
        for each line's settled total."""
        _check_nanos("actual_nanos", actual_nanos)
        _check_charges(refunds, taking=False)
        reply = await self._run(
            "settle", lines, request_id=request_id, nanos=actual_nanos, buckets=refunds,
            lease_id=lease_id,
        )  # fmt: skip
        if int(reply[0]) == 3:
            return SettleResult(applied=False)
        missing = tuple(lines[int(i) - 1] for i in reply[2:])
        return SettleResult(applied=True, released_nanos=int(reply[1]), missing=missing)

    async def void(
        self, request_id: str, lines: Sequence[BudgetLine], charges: Sequence[RateCharge] = ()
    ) -> None:
        _check_charges(charges, taking=True)
        await self._run("void", lines, request_id=request_id, buckets=charges)

    async def abandon(self, request_id: str, key_prefixes: Sequence[str]) -> int | None:
        """Give up on a request whose process died: None if it had not settled (it is
        voided now, its holds released, and a late settle takes nothing), else the
        nanos it settled. `key_prefixes` are its lines' `BudgetLine.key_prefix`."""
        line_keys = [tuple(f"{p}:{part}" for part in _LINE_KEY_PARTS) for p in key_prefixes]
        reply = await self._run("abandon", [], request_id=request_id, line_keys=line_keys)
        return int(reply[1]) if int(reply[0]) == 1 else None

    async def spent(self, lines: Sequence[BudgetLine]) -> tuple[LineSpend, ...]:
        spends: list[LineSpend] = []
        for start in range(0, len(lines), SPENT_LINES_PER_CALL):
            chunk = lines[start : start + SPENT_LINES_PER_CALL]
            flat = (await self._run("spent", chunk))[1:]
            spends.extend(
                LineSpend(
                    line,
                    None if flat[3 * i] < 0 else int(flat[3 * i]),
                    int(flat[3 * i + 1]),
                    refused=bool(flat[3 * i + 2]),
                )
                for i, line in enumerate(chunk)
            )
        return tuple(spends)

    async def rate_levels(self, buckets: Sequence[RateBucket]) -> tuple[BucketLevel, ...]:
        if not buckets:
            return ()
        charges = [RateCharge(bucket, 0) for bucket in buckets]
        flat = (await self._run("levels", [], buckets=charges))[1:]
        return tuple(
            BucketLevel(bucket, int(milli) / 1000)
            for bucket, milli in zip(buckets, flat, strict=True)
        )

    async def seed(self, line: BudgetLine, settled_nanos: int) -> int:
        _check_nanos("settled_nanos", settled_nanos)
        return int(await self._run("seed", [line], nanos=settled_nanos))


def _reserve_result(
    reply: list[int], lines: Sequence[BudgetLine], amount_nanos: int,
    charges: Sequence[RateCharge],
) -> ReserveResult:  # fmt: skip
    """What a `reserve` (or `lease`) script reply says."""
    code, rest = int(reply[0]), reply[1:]
    if code == 5:
        return ReserveResult(ReserveStatus.VOIDED, amount_nanos)
    if code == 2:
        missing = tuple(lines[int(i) - 1] for i in rest)
        return ReserveResult(ReserveStatus.MISSING, amount_nanos, missing=missing)
    if code == 1:
        exceeded = tuple(
            LineSpend(lines[int(rest[j]) - 1], int(rest[j + 1]), int(rest[j + 2]))
            for j in range(0, len(rest), 3)
        )
        return ReserveResult(ReserveStatus.EXCEEDED, amount_nanos, spends=exceeded)
    if code == 4:
        short = tuple(
            BucketLevel(
                charges[int(rest[j]) - 1].bucket,
                int(rest[j + 1]) / 1000,
                charges[int(rest[j]) - 1].amount,
            )  # fmt: skip
            for j in range(0, len(rest), 2)
        )
        return ReserveResult(ReserveStatus.RATE_LIMITED, amount_nanos, levels=short)
    status = ReserveStatus.RESERVED if code == 0 else ReserveStatus.ALREADY_HELD
    flat = rest[: 2 * len(lines)]
    levels = tuple(
        BucketLevel(charge.bucket, int(milli) / 1000, charge.amount)
        for charge, milli in zip(charges, rest[2 * len(lines) :], strict=False)
    )
    return ReserveResult(status, amount_nanos, spends=_spends(lines, flat), levels=levels)


@dataclass(slots=True)
class _Counter:
    settled: int | None = None
    reserved: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (nanos, deadline)
    expires_at: float | None = None  # the period ended (plus grace): forget the counter
    refused: bool = False


class InProcessBudgetCounters(BudgetCounters):
    """The embedded default: the same semantics in one process's memory.

    Each operation runs to completion without awaiting, so on one event loop it
    is atomic like the Lua script. Counters are lost with the process and then
    re-seeded from the ledger, exactly like counters Redis lost. Use it from the
    event loop that serves requests only: it is not thread-safe.
    """

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._counters: dict[tuple[int, str], _Counter] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, at)
        self._settled_requests: OrderedDict[str, float] = OrderedDict()  # id -> forget at
        self._next_sweep_at = 0.0

    def _counter(self, line: BudgetLine, now: float) -> _Counter:
        """The line's counter with its expired holds released (created empty if absent)."""
        key = (line.budget_id, line.period_id)
        counter = self._counters.get(key)
        if counter is None or (counter.expires_at is not None and counter.expires_at <= now):
            counter = self._counters[key] = _Counter()
            self._keep_until(counter, line, now)
        expired = [rid for rid, (_, deadline) in counter.holds.items() if deadline <= now]
        for rid in expired:
            self._release(counter, rid)
        return counter

    def _level(self, bucket: RateBucket, now: float) -> float:
        level, at = self._buckets.get(bucket.name, (bucket.capacity, now))
        return min(bucket.capacity, level + max(0.0, now - at) * bucket.refill_per_s)

    def _store_level(self, bucket: RateBucket, level: float, now: float) -> None:
        if level >= bucket.capacity:
            self._buckets.pop(bucket.name, None)  # full: nothing to remember
        else:
            self._buckets[bucket.name] = (level, now)

    @staticmethod
    def _release(counter: _Counter, request_id: str) -> int:
        amount, _ = counter.holds.pop(request_id, (0, 0.0))
        counter.reserved = max(0, counter.reserved - amount)
        return amount

    @staticmethod
    def _keep_until(counter: _Counter, line: BudgetLine, now: float) -> None:
        ttl_ms = _key_ttl_ms(line, now)
        counter.expires_at = now + ttl_ms / 1000 if ttl_ms else None

    def _sweep(self, now: float) -> None:
        """Forget old settle markers, ended periods and full buckets (at most once a minute)."""
        while self._settled_requests:
            request_id, forget_at = next(iter(self._settled_requests.items()))
            if forget_at > now:
                break
            del self._settled_requests[request_id]
        if now < self._next_sweep_at:
            return
        self._next_sweep_at = now + 60
        for key, counter in list(self._counters.items()):
            if counter.expires_at is not None and counter.expires_at <= now:
                del self._counters[key]
        # A bucket untouched for a minute has refilled whatever it lent.
        for name, (_, at) in list(self._buckets.items()):
            if now - at > 60:
                del self._buckets[name]

    async def reserve(
        self,
        request_id: str,
        lines: Sequence[BudgetLine],
        amount_nanos: int,
        ttl_s: float,
        charges: Sequence[RateCharge] = (),
        inflight: InflightEntry | None = None,  # dies with this process: nothing to write
    ) -> ReserveResult:
        _check_nanos("amount_nanos", amount_nanos)
        _check_charges(charges, taking=True)
        now = self._clock()
        self._sweep(now)
        if request_id in self._settled_requests:
            return ReserveResult(ReserveStatus.VOIDED, amount_nanos)
        counters = [self._counter(line, now) for line in lines]
        missing = tuple(line for line, c in zip(lines, counters, strict=True) if c.settled is None)
        if missing:
            return ReserveResult(ReserveStatus.MISSING, amount_nanos, missing=missing)
        if counters and request_id in counters[0].holds:
            return ReserveResult(
                ReserveStatus.ALREADY_HELD, amount_nanos, spends=self._spends(lines, counters)
            )
        exceeded = []
        for line, c in zip(lines, counters, strict=True):
            if line.hard and (c.settled or 0) + c.reserved + amount_nanos > line.limit_nanos:
                exceeded.append(LineSpend(line, c.settled, c.reserved))
                c.refused = True
        if exceeded:
            return ReserveResult(ReserveStatus.EXCEEDED, amount_nanos, spends=tuple(exceeded))
        levels = [BucketLevel(c.bucket, self._level(c.bucket, now), c.amount) for c in charges]
        short = tuple(level for level in levels if level.level < level.amount)
        if short:
            return ReserveResult(ReserveStatus.RATE_LIMITED, amount_nanos, levels=short)
        for line, counter in zip(lines, counters, strict=True):
            counter.reserved += amount_nanos
            counter.holds[request_id] = (amount_nanos, now + ttl_s)
            self._keep_until(counter, line, now)
        taken = []
        for level in levels:
            self._store_level(level.bucket, level.level - level.amount, now)
            taken.append(BucketLevel(level.bucket, level.level - level.amount, level.amount))
        return ReserveResult(
            ReserveStatus.RESERVED, amount_nanos, spends=self._spends(lines, counters),
            levels=tuple(taken),
        )  # fmt: skip

    async def settle(
        self,
        request_id: str,
        lines: Sequence[BudgetLine],
        actual_nanos: int,
        refunds: Sequence[RateCharge] = (),
    ) -> SettleResult:
        _check_nanos("actual_nanos", actual_nanos)
        _check_charges(refunds, taking=False)
        now = self._clock()
        self._sweep(now)
        if request_id in self._settled_requests:
            return SettleResult(applied=False)
        self._settled_requests[request_id] = now + SETTLE_MEMORY_S
        released, missing = 0, []
        for line in lines:
            counter = self._counter(line, now)
            released = max(released, self._release(counter, request_id))
            if counter.settled is None:
                missing.append(line)
            else:
                counter.settled += actual_nanos
        for refund in refunds:
            if refund.amount:
                level = min(refund.bucket.capacity, self._level(refund.bucket, now) + refund.amount)
                self._store_level(refund.bucket, level, now)
        return SettleResult(applied=True, released_nanos=released, missing=tuple(missing))

    async def void(
        self, request_id: str, lines: Sequence[BudgetLine], charges: Sequence[RateCharge] = ()
    ) -> None:
        # Operations here never time out, so a reserve cannot be left in flight; this
        # keeps the contract (release, refund if it ran, refuse a later reserve) anyway.
        now = self._clock()
        if request_id in self._settled_requests:
            return
        self._settled_requests[request_id] = now + SETTLE_MEMORY_S
        held = False
        for line in lines:
            counter = self._counter(line, now)
            held = held or request_id in counter.holds
            self._release(counter, request_id)
        if held:
            for charge in charges:
                level = min(charge.bucket.capacity, self._level(charge.bucket, now) + charge.amount)
                self._store_level(charge.bucket, level, now)

    async def spent(self, lines: Sequence[BudgetLine]) -> tuple[LineSpend, ...]:
        now = self._clock()
        counters = [self._counter(line, now) for line in lines]
        return tuple(
            LineSpend(line, c.settled, c.reserved, refused=c.refused)
            for line, c in zip(lines, counters, strict=True)
        )

    async def rate_levels(self, buckets: Sequence[RateBucket]) -> tuple[BucketLevel, ...]:
        now = self._clock()
        return tuple(BucketLevel(bucket, self._level(bucket, now)) for bucket in buckets)

    async def seed(self, line: BudgetLine, settled_nanos: int) -> int:
        _check_nanos("settled_nanos", settled_nanos)
        now = self._clock()
        counter = self._counter(line, now)
        if counter.settled is None or counter.settled < settled_nanos:
            counter.settled = settled_nanos
            self._keep_until(counter, line, now)
        return counter.settled

    @staticmethod
    def _spends(lines: Sequence[BudgetLine], counters: Sequence[_Counter]) -> tuple[LineSpend, ...]:
        return tuple(
            LineSpend(line, c.settled, c.reserved) for line, c in zip(lines, counters, strict=True)
        )
