"""Admission: a request's rate limits and budgets, taken before the upstream call
and settled after it, one counter operation each (see billing.budget_counters).

Budgets hold the request's largest possible cost: every byte of the prompt
counted as a token (no tokenizer makes more) plus the output limit, at the
dearest rate of any deployment that may serve it. So concurrent requests can
never overspend a hard budget; what a request did not use is released when it
settles. Rate limits are token buckets per key, team and org: one request, and
the request's estimated tokens, refunded to the actual count at settle.

A key with no rate limit and no budget makes no counter call at all.
"""

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from django.db import DatabaseError
from redis.exceptions import RedisError

from billing.budget_counters import (
    BucketLevel,
    BudgetCounters,
    BudgetLine,
    InflightEntry,
    RateBucket,
    RateCharge,
    ReserveResult,
    ReserveStatus,
    budget_line,
)
from billing.budget_ledger import abudget_counters_seed
from billing.budget_standing import budget_forecast
from billing.contracts import PriceRates
from billing.pricing import usd_exact
from routing.contracts import DeploymentSpec, RoutePlan
from routing.errors import LimitExceeded, LimitsUnavailable
from routing.snapshot import ConfigSnapshot
from tenants.contracts import BudgetSpec, KeyContext, ScopeLimits

logger = logging.getLogger(__name__)

_NANOS_PER_USD_PER_MTOK = Decimal(1000)  # 10^9 nano-USD / 10^6 tokens
# How long a hold outlives the longest its request may take, before it expires.
HOLD_MARGIN_S = 60.0


def _usd(nanos: int) -> str:
    """Dollars for a message: cents, or more digits for amounts under a cent."""
    usd = Decimal(nanos) / 10**9
    return f"${usd:,.2f}" if nanos >= 10**7 or nanos == 0 else f"${usd:.6f}"


def _dearest_cost(rates: PriceRates, input_tokens: int, output_tokens: int) -> int:
    """The most this deployment could charge for these tokens, in nano-USD (rounded up)."""
    input_rate = max(rates.input_usd_per_mtok, rates.cached_input_usd_per_mtok or 0)
    output_rate = max(rates.output_usd_per_mtok, rates.reasoning_usd_per_mtok or 0)
    usd_per_mtok_tokens = input_tokens * input_rate + output_tokens * output_rate
    return math.ceil(usd_per_mtok_tokens * _NANOS_PER_USD_PER_MTOK)


def _reachable(plan: RoutePlan, snapshot: ConfigSnapshot, org_id: int) -> list[DeploymentSpec]:
    """Every deployment that may serve the request: the route's, its variant and fallbacks'."""
    plans = [plan]
    for name in plan.fallback_models:
        fallback = snapshot.route_for(org_id=org_id, model=name)
        if fallback is not None:
            plans.append(fallback)
    deployments = [deployment for each in plans for deployment in each.deployments]
    if plan.variant is not None:
        deployments.append(plan.variant)
    return deployments


def deployment_max_cost(
    deployment: DeploymentSpec, snapshot: ConfigSnapshot, *, org_id: int, input_tokens: int,
    output_tokens: int, at: datetime,
) -> int:  # fmt: skip
    """The most this many tokens (at most) could cost on the deployment; 0 if it is unpriced,
    as the meter bills it (and flags it for finance)."""
    rates = snapshot.price_for(
        provider_kind=deployment.provider_kind,
        model=deployment.upstream_model,
        org_id=org_id,
        moment=at,
    )
    return 0 if rates is None else _dearest_cost(rates, input_tokens, output_tokens)


def max_cost_nanos(
    plan: RoutePlan, snapshot: ConfigSnapshot, *, org_id: int, input_tokens: int,
    output_tokens: int, at: datetime,
) -> int:  # fmt: skip
    """The largest cost of this many tokens on any deployment that may serve the request."""
    return max(
        (
            deployment_max_cost(
                deployment,
                snapshot,
                org_id=org_id,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                at=at,
            )  # fmt: skip
            for deployment in _reachable(plan, snapshot, org_id)
        ),
        default=0,
    )


def hold_ttl_s(plan: RoutePlan, snapshot: ConfigSnapshot, org_id: int) -> float:
    """Longer than the request can take: its deadline plus the slowest deployment's timeout."""
    slowest = max((d.total_timeout_s for d in _reachable(plan, snapshot, org_id)), default=0.0)
    return plan.deadline_s + slowest + HOLD_MARGIN_S


# Each budget's current line until its period ends, and each scope's rate buckets:
# worked out per request (time zone arithmetic, key names) they were a measurable
# share of the hot path. Keyed by the identity of the snapshot's immutable specs
# (hashing their fields was itself measurable), each entry keeping its spec so a
# reused id is never mistaken for it; cleared whole if ever this large.
_current_lines: dict[int, tuple[BudgetSpec, BudgetLine]] = {}
_scope_buckets: dict[int, tuple[ScopeLimits, RateBucket | None, RateBucket | None]] = {}
_CACHE_MAX_ENTRIES = 200_000


def limits_cache_clear() -> None:
    """Forget the cached lines and buckets: call when a new snapshot replaces the specs,
    so the old ones are not kept alive."""
    _current_lines.clear()
    _scope_buckets.clear()


def budget_lines(budgets: Sequence[BudgetSpec], at: datetime) -> list[BudgetLine]:
    """The line of each budget for the period containing `at`."""
    lines = []
    for spec in budgets:
        cached = _current_lines.get(id(spec))
        if cached is not None and cached[0] is spec and cached[1].window.contains(at):
            lines.append(cached[1])
            continue
        line = budget_line(
            budget_id=spec.budget_id,
            period=spec.period,
            time_zone=spec.time_zone,
            limit_nanos=spec.limit_nanos,
            hard=spec.hard,
            at=at,
        )
        if len(_current_lines) >= _CACHE_MAX_ENTRIES:
            _current_lines.clear()
        _current_lines[id(spec)] = (spec, line)
        lines.append(line)
    return lines


def has_hard_budget(key: KeyContext) -> bool:
    return any(spec.hard for spec in key.budgets)


def _buckets(limits: ScopeLimits) -> tuple[RateBucket | None, RateBucket | None]:
    """The scope's request and token buckets (None where it sets no limit)."""
    cached = _scope_buckets.get(id(limits))
    if cached is not None and cached[0] is limits:
        return cached[1], cached[2]
    prefix = f"{limits.scope}:{limits.scope_id}"
    requests = RateBucket(f"{prefix}:requests", limits.rpm) if limits.rpm else None
    tokens = RateBucket(f"{prefix}:tokens", limits.tpm) if limits.tpm else None
    if len(_scope_buckets) >= _CACHE_MAX_ENTRIES:
        _scope_buckets.clear()
    _scope_buckets[id(limits)] = (limits, requests, tokens)
    return requests, tokens


def rate_buckets(key: KeyContext) -> list[RateBucket]:
    return [bucket for limits in key.limits for bucket in _buckets(limits) if bucket]


def _scope_of(bucket: RateBucket, key: KeyContext) -> str:
    """Who a bucket limits, for a message: "key 'ci' (tgk_ab12)", "team 'search'"."""
    for limits in key.limits:
        if bucket.name.startswith(f"{limits.scope}:{limits.scope_id}:"):
            return limits.label
    return bucket.name


def _unit(bucket: RateBucket) -> str:
    return "requests" if bucket.name.endswith(":requests") else "tokens"


def rate_charges(key: KeyContext, estimate: Callable[[], int]) -> list[RateCharge]:
    """One request from every request bucket; the estimated tokens from every token bucket.

    A request that could never fit a token bucket is refused here: waiting would not help.
    """
    charges: list[RateCharge] = []
    if not key.limits:
        return charges
    estimated_tokens = estimate() if any(limits.tpm for limits in key.limits) else 0
    for limits in key.limits:
        requests, tokens = _buckets(limits)
        if requests is not None:
            charges.append(RateCharge(requests, 1))
        if tokens is not None:
            if estimated_tokens > tokens.capacity:
                raise LimitExceeded(
                    f"This request needs about {estimated_tokens:,} tokens, more than "
                    f"{_scope_of(tokens, key)} may use in a minute ({tokens.capacity:,} tokens "
                    "per minute). Send a shorter prompt or a lower max_tokens.",
                    code="tokens_per_minute_exceeded",
                    headers={"x-should-retry": "false"},
                )
            charges.append(RateCharge(tokens, estimated_tokens))
    return charges


def _duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def rate_limit_headers(levels: Sequence[BucketLevel]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, for the tightest request and token buckets."""
    headers: dict[str, str] = {}
    for unit in ("requests", "tokens"):
        same = [level for level in levels if _unit(level.bucket) == unit]
        if not same:
            continue
        tightest = min(same, key=lambda level: (level.remaining, level.bucket.capacity))
        headers[f"x-ratelimit-limit-{unit}"] = str(tightest.bucket.capacity)
        headers[f"x-ratelimit-remaining-{unit}"] = str(tightest.remaining)
        headers[f"x-ratelimit-reset-{unit}"] = _duration(tightest.full_in_s)
    return headers


def _budget_refusal(result: ReserveResult, key: KeyContext) -> LimitExceeded:
    labels = {spec.budget_id: spec for spec in key.budgets}
    spend = result.spends[0]  # the first hard line without room
    line, spec = spend.line, labels.get(spend.line.budget_id)
    left = max(0, line.limit_nanos - (spend.settled_nanos or 0) - spend.reserved_nanos)
    label = spec.label if spec is not None else f"Budget {line.budget_id}"
    message = (
        f"Budget exceeded: {label} ({_usd(line.limit_nanos)}) has {_usd(left)} left, and this "
        f"request may cost up to {_usd(result.amount_nanos)}."
    )
    headers = {"x-should-retry": "false"}
    end_at = line.window.end_at
    if end_at is None:
        message += " It is a lifetime budget: it does not reset."
    else:
        local = end_at.astimezone(ZoneInfo(spec.time_zone if spec else "UTC"))
        message += (
            f" It resets at {local:%Y-%m-%d %H:%M} {local.tzname()} ({end_at:%Y-%m-%dT%H:%M:%SZ})."
        )
        headers["x-tollgate-budget-reset"] = f"{end_at:%Y-%m-%dT%H:%M:%SZ}"
    return LimitExceeded(message, code="budget_exceeded", headers=headers)


def _rate_refusal(result: ReserveResult, key: KeyContext) -> LimitExceeded:
    longest = max(result.levels, key=lambda level: level.wait_s)
    wait_s = max(1, math.ceil(longest.wait_s))
    bucket = longest.bucket
    message = (
        f"Rate limit reached for {_scope_of(bucket, key)}: {bucket.capacity:,} "
        f"{_unit(bucket)} per minute"
    )
    if _unit(bucket) == "tokens":
        message += f", and this request needs about {longest.amount:,}"
    headers = {"retry-after": str(wait_s), **rate_limit_headers(result.levels)}
    return LimitExceeded(
        f"{message}. Retry in {wait_s} s.", code="rate_limit_exceeded", headers=headers
    )


# Seeds in progress in this process, by (budget, period): at a period's start
# every concurrent request finds the line missing, and one ledger query serves all.
_seeding: dict[tuple[int, str], asyncio.Task[None]] = {}


async def seed_once(counters: BudgetCounters, lines: Sequence[BudgetLine]) -> None:
    """Seed missing lines from the ledger, joining a seed of the same line already running."""
    tasks = []
    for line in lines:
        key = (line.budget_id, line.period_id)
        task = _seeding.get(key)
        if task is None:
            task = asyncio.ensure_future(abudget_counters_seed(counters=counters, lines=[line]))
            _seeding[key] = task
            task.add_done_callback(lambda _, key=key: _seeding.pop(key, None))  # type: ignore[misc]
        tasks.append(task)
    # Shielded: one request giving up must not cancel the seed the others wait on.
    await asyncio.gather(*(asyncio.shield(task) for task in tasks))


class Admission:
    """A request's hold on its budgets and rate buckets, settled exactly once."""

    __slots__ = ("_charges", "_counters", "_lines", "_request_id", "headers", "inflight_stored")

    def __init__(
        self,
        counters: BudgetCounters,
        request_id: str,
        lines: Sequence[BudgetLine],
        charges: Sequence[RateCharge],
        levels: Sequence[BucketLevel],
        *,
        inflight_stored: bool = True,
    ) -> None:
        self._counters = counters
        self._request_id = request_id
        self._lines = tuple(lines)
        self._charges = tuple(charges)
        self.headers = rate_limit_headers(levels)
        # Its reserve stored its in-flight entry (not when admitted from a lease).
        self.inflight_stored = inflight_stored

    async def settle(self, *, cost_nanos: int, tokens_used: int) -> None:
        """Record the actual cost and give back the tokens estimated but not used.

        A failure is logged, not raised: the hold expires by itself, and the
        reconcile job raises the counters to the ledger, which has the event.
        """
        refunds = [
            RateCharge(charge.bucket, charge.amount - tokens_used)
            for charge in self._charges
            if _unit(charge.bucket) == "tokens"
        ]
        try:
            await self._counters.settle(self._request_id, self._lines, cost_nanos, refunds)
        except (RedisError, OSError):
            logger.exception("Settling request %s on its budgets failed", self._request_id)


class _PendingVoid(NamedTuple):
    counters: BudgetCounters
    lines: tuple[BudgetLine, ...]
    charges: tuple[RateCharge, ...]
    until: float  # monotonic: its hold has expired by itself by then


class _Voids:
    """Reserves that failed at the gateway (a timeout, a dropped connection), voided
    in the background until Redis answers.

    A reserve the gateway gave up on may still sit in Redis's input, and a frozen
    Redis runs it when it resumes; voiding it (whichever runs first) means the
    refused request holds nothing. One drainer at a time, bounded: past the bound
    a hold is left to expire by its own TTL.
    """

    MAX_PENDING = 10_000
    BATCH = 64

    def __init__(self) -> None:
        self._pending: dict[str, _PendingVoid] = {}
        self._drainer: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(
        self,
        counters: BudgetCounters,
        request_id: str,
        lines: Sequence[BudgetLine],
        charges: Sequence[RateCharge],
        ttl_s: float,
    ) -> None:
        if len(self._pending) >= self.MAX_PENDING:
            return
        until = time.monotonic() + ttl_s
        self._pending[request_id] = _PendingVoid(counters, tuple(lines), tuple(charges), until)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        pause_s = 0.1
        while self._pending:
            now = time.monotonic()
            batch: list[str] = []
            for request_id, pending in list(self._pending.items()):
                if pending.until <= now:
                    del self._pending[request_id]
                elif len(batch) < self.BATCH:
                    batch.append(request_id)
            outcomes = await asyncio.gather(
                *(self._void(request_id) for request_id in batch), return_exceptions=True
            )
            if any(isinstance(outcome, (RedisError, OSError)) for outcome in outcomes):
                await asyncio.sleep(pause_s)  # Redis still away: try again, backing off
                pause_s = min(1.0, pause_s * 2)
            else:
                pause_s = 0.1

    async def _void(self, request_id: str) -> None:
        pending = self._pending[request_id]
        try:
            await pending.counters.void(request_id, pending.lines, pending.charges)
        except (RedisError, OSError):
            raise
        except Exception:
            logger.exception("Voiding the reserve of request %s failed", request_id)
        self._pending.pop(request_id, None)


reserves_to_void = _Voids()


async def admit(
    *,
    counters: BudgetCounters,
    key: KeyContext,
    request_id: str,
    lines: Sequence[BudgetLine],
    amount_nanos: int,
    ttl_s: float,
    charges: Sequence[RateCharge],
    fail_open: bool,
    inflight: InflightEntry | None = None,
) -> Admission | None:
    """Reserve on every budget line and take every rate charge, or raise 429.

    None when nothing applies (no counter call), or when the counters are
    unreachable and `fail_open` lets the request through unmetered by them.
    An admitted request's `inflight` entry is stored with its holds.
    """
    if not lines and not charges:
        return None
    try:
        result = await counters.reserve(
            request_id, lines, amount_nanos, ttl_s, charges, inflight=inflight
        )
        if result.status is ReserveStatus.MISSING:
            # First request of a period, or Redis lost its data: start from the ledger.
            try:
                await seed_once(counters, result.missing)
            except DatabaseError as exc:
                # The ledger is out of reach (PostgreSQL restarting): nothing to start from.
                return _unchecked(exc, fail_open=fail_open, what="Budgets")
            result = await counters.reserve(
                request_id, lines, amount_nanos, ttl_s, charges, inflight=inflight
            )
    except (RedisError, OSError) as exc:
        reserves_to_void.add(counters, request_id, lines, charges, ttl_s)
        return _unchecked(exc, fail_open=fail_open, what="Budgets and rate limits")
    if result.status is ReserveStatus.EXCEEDED:
        raise _budget_refusal(result, key)
    if result.status is ReserveStatus.RATE_LIMITED:
        raise _rate_refusal(result, key)
    if not result.admitted:
        # Still missing after seeding (the counters are failing to keep data), or voided.
        logger.error("Budget counters still missing after seeding: %s", result)
        raise LimitsUnavailable(
            "Budgets cannot be checked right now; retry shortly.", headers={"retry-after": "1"}
        )
    return Admission(
        counters, request_id, lines, charges, result.levels, inflight_stored=not result.leased
    )


def _unchecked(exc: Exception, *, fail_open: bool, what: str) -> None:
    """The limits cannot be checked (`exc`): admit unmetered if failing open (None),
    else refuse with 503 `limits_unavailable`."""
    if fail_open:
        logger.error("%s cannot be checked (%s): admitting unmetered", what, exc)
        return None
    logger.error("%s cannot be checked (%s): refusing", what, exc)
    raise LimitsUnavailable(
        f"{what} cannot be checked right now; retry shortly.", headers={"retry-after": "1"}
    ) from exc


def _iso(instant: datetime | None) -> str | None:
    return None if instant is None else instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def key_limits_report(
    counters: BudgetCounters, key: KeyContext, at: datetime
) -> dict[str, Any]:
    """The key's rate limits and budgets as they stand: what `GET /v1/key/info` shows.

    Reads the counters (seeding a budget's from the ledger if it has none yet this
    period); takes nothing and reserves nothing.
    """
    buckets = rate_buckets(key)
    lines = budget_lines(key.budgets, at)
    levels = await counters.rate_levels(buckets)
    spends = await counters.spent(lines)
    missing = [spend.line for spend in spends if spend.settled_nanos is None]
    if missing:
        await seed_once(counters, missing)
        spends = await counters.spent(lines)
    rate_limits = [
        {
            "scope": level.bucket.name.split(":")[0],
            "name": _scope_of(level.bucket, key),
            "unit": _unit(level.bucket),
            "limit_per_minute": level.bucket.capacity,
            "remaining": level.remaining,
            "resets_in_seconds": round(level.full_in_s, 3),
        }
        for level in levels
    ]
    budgets = []
    for spec, spend in zip(key.budgets, spends, strict=True):
        window = spend.line.window
        settled = spend.settled_nanos or 0
        forecast = budget_forecast(
            spent_nanos=settled,
            limit_nanos=spec.limit_nanos,
            measured_from=window.start_at if window.end_at is not None else spec.created_at,
            period_end=window.end_at,
            at=at,
        )
        remaining = max(0, spec.limit_nanos - settled - spend.reserved_nanos)
        budgets.append(
            {
                "id": spec.budget_id,
                "scope": spec.scope,
                "name": spec.label,
                "period": spec.period,
                "enforcement": "hard" if spec.hard else "soft",
                "limit_usd": usd_exact(spec.limit_nanos),
                "spent_usd": usd_exact(settled),
                "reserved_usd": usd_exact(spend.reserved_nanos),
                "remaining_usd": usd_exact(remaining),
                "period_start": _iso(window.start_at if window.end_at is not None else None),
                "resets_at": _iso(window.end_at),
                "forecast": {
                    "projected_usd": None
                    if forecast.projected_nanos is None
                    else usd_exact(forecast.projected_nanos),
                    "exhausted_at": _iso(forecast.exhausted_at),
                },
            }
        )
    return {
        "object": "key_info",
        "key": {
            "name": key.name,
            "prefix": key.prefix,
            "organization": key.org_slug,
            "allowed_models": sorted(key.allowed_models),
            "expires_at": _iso(key.expires_at),
        },
        "rate_limits": rate_limits,
        "budgets": budgets,
    }
