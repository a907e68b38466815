"""Several web replicas on one PostgreSQL and one Redis (issue 10).

Three gateways (uvicorn processes) share the test database and the run's Redis, started
once for the module with the default 1 s configuration poll; the clients are the official
`openai` SDK and, for the management API, httpx. They prove that budgets, rate limits,
circuit state and configuration changes hold for the fleet, not per process. Two more
gateways run under libfaketime (LD_PRELOAD) with clocks the tests set apart, for clock
skew: holds, rate buckets and shared breaker cooldowns are measured on Redis's clock, and
at a budget period's boundary each request is charged to the one period its own usage
event names. Last, two replicas share a private redis-server that is stopped and started
again: both follow the fail-closed policy and their spools are replayed exactly once.
docs/reliability.md tables what each test proves.
"""

import asyncio
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from django.conf import settings

from billing.models import UsageEvent
from routing.models import Deployment, Route
from tenants.api_tokens import api_token_create
from tenants.config import config_revision_bump
from tenants.models import Budget, Organization
from tests.conftest import TEST_ACTOR, IssueKey, MakeRoute
from tests.factories import OrganizationFactory
from tests.support.gateway import (
    TEST_BREAKER_FAILURES,
    GatewayServer,
    chat_burst,
    gateway_server,
    wait_for_config,
    wait_for_key,
    wait_for_usage_writes_to_settle,
    wait_until,
)
from tests.support.halves import production_half
from tests.support.private_redis import private_redis, usage_ingestion_at

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not production_half(),
        reason="replicas share PostgreSQL and Redis: the PostgreSQL + Redis half only "
        "(the embedded default is one process by design)",
    ),
]

HELLO = [{"role": "user", "content": "Hello"}]
# Output tokens per request; the mock answers exactly max_tokens of them (its answer is longer).
OUTPUT_TOKENS = 10
# Input is free and output costs 10,000 nano-USD a token: a request's reserved maximum equals
# its actual cost, so a budget of N x COST admits exactly N requests.
PRICE = ("0.00", "10.00")
COST_NANOS = OUTPUT_TOKENS * 10_000
CONFIG_POLL_S = 1.0  # TOLLGATE_CONFIG_POLL_SECONDS: the default
# A configuration change reaches every replica within one poll plus the snapshot load; on a
# loaded 2-core machine that load (and the probe's own request) gets a generous allowance.
CONFIG_CHANGE_BOUND_S = CONFIG_POLL_S + 2.0
HEALTH_SYNC_S = 1.0  # routing/proxy/runtime.py _HEALTH_SYNC_SECONDS
# An opening reaches the others within two syncs: the opener's publish, then their read.
CIRCUIT_SHARED_BOUND_S = 2 * HEALTH_SYNC_S + 1.0
SKEW_S = 300  # replica A's clock runs five minutes ahead of replica B's
# The skewed replicas' breaker cooldown: far below the skew, above the two-sync bound.
SKEWED_COOLDOWN_S = 5.0
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
REPLICA_ENV = {
    "TOLLGATE_CONFIG_POLL_SECONDS": str(CONFIG_POLL_S),
    # Long enough for the other replicas to find a breaker still open.
    "TOLLGATE_BREAKER_COOLDOWN_SECONDS": "60",
}


def start_gateways(stack: ExitStack, envs: list[dict[str, str]]) -> list[GatewayServer]:
    """Start one gateway per env at once (startup is mostly imports: two cores share it)."""
    managers = [gateway_server(**env) for env in envs]
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(manager.__enter__) for manager in managers]
    servers = []
    for manager, future in zip(managers, futures, strict=True):
        if future.exception() is None:
            stack.push(manager.__exit__)
            servers.append(future.result())
    if len(servers) != len(managers):
        stack.close()
        raise next(f.exception() for f in futures if f.exception() is not None)  # type: ignore[misc]
    return servers


@pytest.fixture(scope="module")
def fleet(gateway: GatewayServer) -> Iterator[list[GatewayServer]]:
    """Three replicas on the test database and the shared Redis. (The session's `gateway`
    brings the Celery worker that ingests their usage.)"""
    with tempfile.TemporaryDirectory(prefix="tollgate-replicas-") as var_dir, ExitStack() as stack:
        envs = [{**REPLICA_ENV, "TOLLGATE_VAR_DIR": f"{var_dir}/{n}"} for n in range(3)]
        yield start_gateways(stack, envs)


@pytest.fixture(autouse=True)
def usage_settled() -> Iterator[None]:
    """Let the replicas' usage reach the ledger before the database is flushed."""
    yield
    wait_for_usage_writes_to_settle()


def accepted_everywhere(replicas: list[GatewayServer], key: str, model: str) -> None:
    for replica in replicas:
        wait_for_key(replica, key)
        wait_for_config(replica, key, model)


@dataclass(frozen=True)
class Answer:
    status: int
    code: str  # "" on success
    deployment: str
    attempts: str
    request_id: str
    retry_after: str = ""


def ask(base_url: str, key: str, model: str, *, timeout_s: float = 15) -> Answer:
    """One chat completion through the official SDK."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout_s)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=HELLO, max_tokens=OUTPUT_TOKENS
        )
    except openai.APIStatusError as exc:
        headers = exc.response.headers
        return Answer(
            exc.status_code, str(exc.code), "", "", headers.get("x-request-id", ""),
            headers.get("retry-after", ""),
        )  # fmt: skip
    finally:
        client.close()
    assert raw.parse().choices[0].message.content
    headers = raw.headers
    return Answer(
        200,
        "",
        headers["x-tollgate-deployment"],
        headers["x-tollgate-attempts"],
        headers["x-request-id"],
    )


def management(org: Organization) -> httpx.Client:
    """An admin token of `org` for the management API (served by the replicas too)."""
    token = api_token_create(org=org, name="replicas", role="admin", actor=TEST_ACTOR)
    return httpx.Client(headers={"authorization": f"Bearer {token.plaintext}"}, timeout=15)


def key_budget(replica: GatewayServer, key: str) -> dict[str, Any]:
    response = httpx.get(f"{replica.v1}/key/info", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    (budget,) = response.json()["budgets"]
    return budget


def nanos(usd: str) -> int:
    return int(Decimal(usd).scaleb(9))


def events_of(request_ids: list[str]) -> list[UsageEvent]:
    """The usage events of these requests, once every one is in the ledger."""
    rows = UsageEvent.objects.filter(id__in=request_ids)
    try:
        wait_until(lambda: rows.count() >= len(request_ids), timeout_s=30, what="usage events")
    except AssertionError:
        found = {event.id.hex for event in rows}
        raise AssertionError(f"no usage event for {sorted(set(request_ids) - found)}") from None
    return list(rows)


# 1. Configuration changes ------------------------------------------------------------------


@dataclass
class Setup:
    org: Organization
    key: str
    route: Route
    primary: Deployment
    backup: Deployment
    budget: Budget
    api: httpx.Client


def second_deployment(make_route: MakeRoute, org: Organization, model: str) -> Deployment:
    """A deployment of another provider of `org` (its own route "model" comes along)."""
    return make_route(model=model, org=org, provider_org=org, price=PRICE).deployments.get()


@pytest.fixture
def setup(make_route: MakeRoute, issue_key: IssueKey) -> Iterator[Setup]:
    """Route "cfg" of an org's own deployments: `primary` serves it, `backup` (priority 1)
    waits behind it; a roomy monthly hard budget; a key."""
    org = OrganizationFactory()
    route = make_route(model="cfg", org=org, provider_org=org, price=PRICE)
    primary = route.deployments.get()
    backup = second_deployment(make_route, org, "cfg-backup")
    backup.priority = 1
    backup.save()
    route.deployments.add(backup)
    budget = Budget.objects.create(org=org, scope=Budget.Scope.ORG, limit_nanos=10**9)
    with management(org) as api:
        yield Setup(org, issue_key(org), route, primary, backup, budget, api)


def until_everywhere(
    replicas: list[GatewayServer], probe: Callable[[GatewayServer], bool], *, limit_s: float
) -> list[float]:
    """Seconds until `probe` first holds on each replica, probed in parallel; inf if never
    within `limit_s`."""
    started = time.monotonic()

    def watch(replica: GatewayServer) -> float:
        while time.monotonic() - started < limit_s:
            if probe(replica):
                return time.monotonic() - started
            time.sleep(0.05)
        return float("inf")

    with ThreadPoolExecutor(len(replicas)) as pool:
        return list(pool.map(watch, replicas))


def made(response: httpx.Response, recognise: Callable[[Answer], bool]) -> Callable[[Answer], bool]:
    assert response.status_code == 200, response.text
    return recognise


def change(setup: Setup, replica: GatewayServer, what: str) -> Callable[[Answer], bool]:
    """Make the change through the management API; return how to recognise it in an answer."""
    api, base = setup.api, f"{replica.base_url}/api/v1"
    if what == "key revoked":
        key_id = setup.org.keys.get().pk  # type: ignore[attr-defined]
        return made(api.post(f"{base}/keys/{key_id}/revoke/"), lambda a: a.status == 401)
    if what == "budget lowered":
        response = api.patch(f"{base}/budgets/{setup.budget.pk}/", json={"limit_nanos": 1})
        return made(response, lambda a: a.code == "budget_exceeded")
    if what == "route moved":  # to the backup alone
        deployments = {"deployments": [setup.backup.pk]}
        response = api.patch(f"{base}/routes/{setup.route.pk}/", json=deployments)
    else:
        assert what == "deployment disabled"
        response = api.patch(f"{base}/deployments/{setup.primary.pk}/", json={"enabled": False})
    return made(response, lambda a: a.deployment == setup.backup.name)


@pytest.mark.parametrize(
    "what", ["key revoked", "budget lowered", "route moved", "deployment disabled"]
)
def test_a_configuration_change_reaches_every_replica_within_the_bound(
    fleet: list[GatewayServer], setup: Setup, what: str
) -> None:
    accepted_everywhere(fleet, setup.key, "cfg")
    before = [ask(replica.v1, setup.key, "cfg") for replica in fleet]
    assert {(a.status, a.deployment) for a in before} == {(200, setup.primary.name)}

    changed = change(setup, fleet[0], what)
    seconds = until_everywhere(
        fleet,
        lambda replica: changed(ask(replica.v1, setup.key, "cfg")),
        limit_s=CONFIG_CHANGE_BOUND_S + 5,
    )
    assert max(seconds) <= CONFIG_CHANGE_BOUND_S, f"{what}: {seconds} s per replica"
    # And it holds: no replica goes back to the old configuration.
    assert all(changed(ask(replica.v1, setup.key, "cfg")) for replica in fleet)


# 2. Budgets and rate limits ----------------------------------------------------------------


def test_a_hard_budget_admits_exactly_what_fits_across_three_replicas(
    fleet: list[GatewayServer], make_route: MakeRoute, issue_key: IssueKey
) -> None:
    org = OrganizationFactory()
    make_route(model="budget", org=org, upstream_model="budget+latency_ms=50", price=PRICE)
    fits = 30
    Budget.objects.create(org=org, scope=Budget.Scope.ORG, limit_nanos=fits * COST_NANOS)
    key = issue_key(org)
    accepted_everywhere(fleet, key, "budget")

    outcomes = asyncio.run(
        chat_burst([r.v1 for r in fleet], key, model="budget", max_tokens=OUTPUT_TOKENS, count=120)
    )

    assert outcomes.count("ok") == fits
    assert outcomes.count("budget_exceeded") == 120 - fits, set(outcomes)
    rows = UsageEvent.objects.filter(org=org, endpoint="chat.completions")
    wait_until(lambda: rows.count() >= 120, timeout_s=30, what="120 usage events")
    events = list(rows)
    assert len(events) == 120
    blocked = [event for event in events if event.outcome == UsageEvent.Outcome.BLOCKED]
    assert len(blocked) == 120 - fits and {e.error_class for e in blocked} == {"budget_exceeded"}
    spent = sum(event.cost_nanos for event in events)
    assert spent == fits * COST_NANOS
    for replica in fleet:  # every replica reads the one counter: the ledger's figure
        budget = key_budget(replica, key)
        assert (nanos(budget["spent_usd"]), nanos(budget["reserved_usd"])) == (spent, 0)


def test_a_rate_limit_is_shared_by_the_replicas_not_multiplied(
    fleet: list[GatewayServer], make_route: MakeRoute, issue_key: IssueKey
) -> None:
    org = OrganizationFactory()
    make_route(model="rpm", org=org, price=PRICE)
    rpm = 6  # one request back every 10 s
    key = issue_key(org, rpm_limit=rpm)
    accepted_everywhere(fleet, key, "rpm")

    started = time.monotonic()
    outcomes = asyncio.run(
        chat_burst(
            [r.v1 for r in fleet], key, model="rpm", max_tokens=OUTPUT_TOKENS, count=3 * 3 * rpm
        )
    )
    refilled = int((time.monotonic() - started) * rpm / 60)

    assert set(outcomes) == {"ok", "rate_limit_exceeded"}
    assert rpm <= outcomes.count("ok") <= rpm + refilled, outcomes.count("ok")


# 3. Circuit state --------------------------------------------------------------------------


def failing_primary_and_backup(
    make_route: MakeRoute, org: Organization, model: str
) -> tuple[Deployment, Deployment]:
    """Route `model` of `org`: a primary whose upstream answers 500, and a backup behind it."""
    route = make_route(
        model=model, org=org, provider_org=org, upstream_model=f"{model}+fault=500", price=PRICE
    )
    primary = route.deployments.get()
    backup = second_deployment(make_route, org, f"{model}-backup")
    backup.priority = 1
    backup.save()
    route.deployments.add(backup)
    return primary, backup


def open_breaker(replica: GatewayServer, key: str, model: str, backup: Deployment) -> float:
    """Fail the primary on `replica` until its breaker opens; return when (monotonic)."""
    for _ in range(TEST_BREAKER_FAILURES):  # each fails on the primary, then the backup answers
        answer = ask(replica.v1, key, model)
        assert (answer.status, answer.deployment, answer.attempts) == (200, backup.name, "2")
    opened_at = time.monotonic()
    answer = ask(replica.v1, key, model)
    assert (answer.deployment, answer.attempts) == (backup.name, "1"), "open on this replica"
    return opened_at


def skips_to(replica: GatewayServer, key: str, model: str, backup: Deployment) -> None:
    """`replica` answers from the backup without trying the primary first."""
    answer = ask(replica.v1, key, model)
    assert (answer.status, answer.deployment, answer.attempts) == (200, backup.name, "1")


def test_a_breaker_one_replica_opens_is_honoured_by_the_others_within_two_syncs(
    fleet: list[GatewayServer], make_route: MakeRoute, issue_key: IssueKey
) -> None:
    org = OrganizationFactory()
    _, backup = failing_primary_and_backup(make_route, org, "cb")
    key = issue_key(org)
    accepted_everywhere(fleet, key, "cb")
    first, others = fleet[0], fleet[1:]

    opened_at = open_breaker(first, key, "cb", backup)

    # The others never called the primary; after two syncs they skip it too.
    time.sleep(max(0.0, CIRCUIT_SHARED_BOUND_S - (time.monotonic() - opened_at)))
    for replica in others:
        skips_to(replica, key, "cb", backup)


# 4. Clock skew -----------------------------------------------------------------------------


@dataclass
class SkewedReplica:
    """A gateway under libfaketime: its clock is real time plus the offset in `clock_file`
    (read again every second). Offsets only ever move forward: libfaketime shifts the
    monotonic clock too, and a jump back would stall every timer in the process."""

    server: GatewayServer
    clock_file: Path
    offset_s: int = 0

    def move_to(self, at: datetime) -> None:
        offset_s = round(at.timestamp() - time.time())
        assert offset_s >= self.offset_s, "a faked clock only moves forward"
        self.clock_file.write_text(f"+{offset_s}\n")
        self.offset_s = offset_s

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset_s)

    def clock_reads(self, at: datetime) -> bool:
        """Its clock (the Date header of its answers) is within 2 s of `at`."""
        shown = parsedate_to_datetime(httpx.get(f"{self.server.v1}/models").headers["date"])
        return abs((shown - at).total_seconds()) <= 2


@dataclass
class SkewedPair:
    ahead: SkewedReplica  # "A": SKEW_S ahead of B
    behind: SkewedReplica  # "B"

    def set_clocks(self, behind_at: datetime, *, skew_s: int = SKEW_S) -> None:
        """Put B's clock at `behind_at` and A's `skew_s` ahead of it, and wait until both
        processes read them."""
        self.behind.move_to(behind_at)
        self.ahead.move_to(behind_at + timedelta(seconds=skew_s))
        for replica in (self.ahead, self.behind):
            wait_until(lambda r=replica: r.clock_reads(r.now()), what="the faked clock")

    def later_day(self) -> datetime:
        """A UTC midnight at least a minute past B's clock (so the clocks move forward)."""
        return (self.behind.now() + timedelta(days=1, minutes=1)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )


@pytest.fixture(scope="module")
def skewed(gateway: GatewayServer) -> Iterator[SkewedPair]:
    """Two replicas whose clocks the tests set (real time until then)."""
    if not FAKETIME_LIB.exists():
        pytest.skip("needs libfaketime (Debian package faketime; `make faketime` installs it)")
    with tempfile.TemporaryDirectory(prefix="tollgate-skew-") as directory, ExitStack() as stack:
        files = [Path(directory, name) for name in ("ahead", "behind")]
        for clock_file in files:
            clock_file.write_text("+0\n")
        envs = [
            {
                **REPLICA_ENV,
                "TOLLGATE_BREAKER_COOLDOWN_SECONDS": str(SKEWED_COOLDOWN_S),
                "TOLLGATE_VAR_DIR": f"{clock_file}-var",
                "LD_PRELOAD": str(FAKETIME_LIB),
                "FAKETIME_TIMESTAMP_FILE": str(clock_file),
                "FAKETIME_CACHE_DURATION": "1",
            }
            for clock_file in files
        ]
        ahead, behind = start_gateways(stack, envs)
        yield SkewedPair(SkewedReplica(ahead, files[0]), SkewedReplica(behind, files[1]))


def test_a_replica_whose_clock_runs_ahead_frees_no_other_replicas_hold(
    skewed: SkewedPair, make_route: MakeRoute, issue_key: IssueKey
) -> None:
    """Holds expire on Redis's clock: A, five minutes ahead, cannot take B's in-flight
    holds for expired and overspend the budget."""
    org = OrganizationFactory()
    # A short hold (deadline + timeout + 60 s margin = 70 s), well inside the skew.
    timeouts = {f"{name}_timeout_ms": 5_000 for name in ("total", "ttft", "read")}
    route = make_route(
        model="slow", org=org, upstream_model="slow+latency_ms=2500", price=PRICE, **timeouts
    )
    route.deadline_ms = 5_000
    route.save()
    make_route(model="quick", org=org, price=PRICE)
    Budget.objects.create(org=org, scope=Budget.Scope.ORG, limit_nanos=2 * COST_NANOS)
    key = issue_key(org)
    # Mid-day, so that both clocks are in the same budget period.
    skewed.set_clocks(skewed.later_day() + timedelta(hours=12))
    ahead, behind = skewed.ahead.server, skewed.behind.server
    accepted_everywhere([ahead, behind], key, "slow")

    # B holds the whole budget with two slow requests, then A asks.
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(ask, behind.v1, key, "slow") for _ in range(2)]
        wait_until(
            lambda: nanos(key_budget(behind, key)["reserved_usd"]) == 2 * COST_NANOS,
            what="B's two holds",
        )
        refused = ask(ahead.v1, key, "quick")
        answers = [future.result() for future in slow]
    assert (refused.status, refused.code) == (429, "budget_exceeded")
    assert [answer.status for answer in answers] == [200, 200]
    events = events_of([a.request_id for a in [*answers, refused]])
    assert sum(event.cost_nanos for event in events) == 2 * COST_NANOS
    for replica in (ahead, behind):
        budget = key_budget(replica, key)
        assert (nanos(budget["spent_usd"]), nanos(budget["reserved_usd"])) == (2 * COST_NANOS, 0)


def test_a_replica_whose_clock_runs_ahead_sees_no_rate_bucket_refilled_early(
    skewed: SkewedPair, make_route: MakeRoute, issue_key: IssueKey
) -> None:
    """Buckets refill on Redis's clock: asked alternately, A and B admit the key's 4
    requests a minute between them, not A's unlimited plus B's 4."""
    org = OrganizationFactory()
    make_route(model="rpm-skew", org=org, price=PRICE)
    key = issue_key(org, rpm_limit=4)
    skewed.set_clocks(skewed.later_day() + timedelta(hours=12))
    ahead, behind = skewed.ahead.server, skewed.behind.server
    accepted_everywhere([ahead, behind], key, "rpm-skew")

    started = time.monotonic()
    statuses = [ask(replica.v1, key, "rpm-skew").status for replica in [ahead, behind] * 6]
    refilled = int((time.monotonic() - started) * 4 / 60)
    assert set(statuses) == {200, 429}
    assert 4 <= statuses.count(200) <= 4 + refilled, statuses


@pytest.mark.parametrize("opener", ["ahead", "behind"])
def test_a_breaker_a_skewed_replica_opens_is_honoured_by_the_other_for_its_cooldown(
    skewed: SkewedPair, make_route: MakeRoute, issue_key: IssueKey, opener: str
) -> None:
    """Cooldowns are shared on Redis's clock: with clocks five minutes apart, the other
    replica skips the open deployment within two syncs (on local clocks, A took B's fresh
    cooldown for long over) and calls it again once the cooldown is over (on local clocks,
    B kept A's for minutes more)."""
    org = OrganizationFactory()
    primary, backup = failing_primary_and_backup(make_route, org, "cb-skew")
    key = issue_key(org)
    skewed.set_clocks(skewed.later_day() + timedelta(hours=12))
    first, other = (
        (skewed.ahead, skewed.behind) if opener == "ahead" else (skewed.behind, skewed.ahead)
    )
    replicas = [first.server, other.server]
    accepted_everywhere(replicas, key, "cb-skew")

    opened_at = open_breaker(first.server, key, "cb-skew", backup)
    # The primary recovers at once: the cooldown alone keeps it out of use.
    Deployment.objects.filter(pk=primary.pk).update(upstream_model="cb-skew")
    config_revision_bump()
    time.sleep(max(0.0, CIRCUIT_SHARED_BOUND_S - (time.monotonic() - opened_at)))
    skips_to(other.server, key, "cb-skew", backup)

    # The other's probe, not a close published by the first, must end its cooldown.
    closed_after = []
    for replica in replicas[::-1]:
        wait_until(
            lambda r=replica: ask(r.v1, key, "cb-skew").deployment == primary.name,
            timeout_s=SKEWED_COOLDOWN_S + CIRCUIT_SHARED_BOUND_S + 5,
            what="the primary in use again",
        )
        closed_after.append(time.monotonic() - opened_at)
    assert SKEWED_COOLDOWN_S - 1 <= closed_after[0] <= SKEWED_COOLDOWN_S + 2, closed_after
    assert closed_after[1] <= SKEWED_COOLDOWN_S + CIRCUIT_SHARED_BOUND_S, closed_after


def settled_counter(budget: Budget, day: datetime) -> int:
    """The settled total of the budget's daily counter for `day`, read from Redis."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        value = client.get(f"tollgate:budget:{budget.pk}:d{day:%Y-%m-%d}:settled")
    finally:
        client.close()
    assert value is not None
    return int(value)


def test_at_a_period_boundary_skewed_replicas_charge_each_request_to_one_period(
    skewed: SkewedPair, make_route: MakeRoute, issue_key: IssueKey
) -> None:
    """A replica five minutes fast starts the next daily period five minutes early for the
    requests it serves, and its usage events say so: each period's counter equals its
    ledger and stays within its limit, and the slow replica, crossing later, finds the
    period already counting (no second reset)."""
    org = OrganizationFactory(time_zone="UTC")
    make_route(model="day", org=org, price=PRICE)
    limit = 6 * COST_NANOS
    budget = Budget.objects.create(
        org=org, scope=Budget.Scope.ORG, period=Budget.Period.DAILY, limit_nanos=limit
    )
    key = issue_key(org)
    ahead, behind = skewed.ahead.server, skewed.behind.server
    accepted_everywhere([ahead, behind], key, "day")
    boundary = skewed.later_day()
    previous_day = boundary - timedelta(days=1)
    # B a minute before midnight, A four minutes past it.
    skewed.set_clocks(boundary - timedelta(seconds=60))
    sent: dict[str, list[Answer]] = {"A": [], "B": []}

    def send(name: str) -> Answer:
        replica = ahead if name == "A" else behind
        answer = ask(replica.v1, key, "day")
        sent[name].append(answer)
        return answer

    # Before B's midnight: B spends the old day's whole budget; A is already in the new day.
    assert [send("B").status for _ in range(6)] == [200] * 6
    refused = send("B")
    assert (refused.status, refused.code) == (429, "budget_exceeded")
    assert [send("A").status for _ in range(3)] == [200] * 3
    on_b, on_a = key_budget(behind, key), key_budget(ahead, key)
    assert (on_b["period_start"], nanos(on_b["spent_usd"])) == (
        f"{previous_day:%Y-%m-%dT%H:%M:%SZ}",
        limit,
    )
    assert (on_a["period_start"], nanos(on_a["spent_usd"])) == (
        f"{boundary:%Y-%m-%dT%H:%M:%SZ}",
        3 * COST_NANOS,
    )

    # B crosses midnight: the new day already holds A's spend; three more fit, then no more.
    skewed.behind.move_to(boundary + timedelta(seconds=5))
    wait_until(lambda: skewed.behind.clock_reads(skewed.behind.now()), what="B past midnight")
    assert nanos(key_budget(behind, key)["spent_usd"]) == 3 * COST_NANOS
    after = [send(name).status for name in ["B", "A"] * 4]
    assert after == [200, 200, 200] + [429] * 5

    # Every request is in the ledger once, in the period of its own replica's clock.
    answers = sent["A"] + sent["B"]
    events = {e.id.hex: e for e in events_of([a.request_id for a in answers])}
    assert len(events) == len(answers)
    old = [e for e in events.values() if previous_day <= e.started_at < boundary]
    new = [e for e in events.values() if boundary <= e.started_at < boundary + timedelta(days=1)]
    assert len(old) + len(new) == len(answers)
    assert all(events[a.request_id].started_at >= boundary for a in sent["A"])
    assert sum(e.cost_nanos for e in old) == settled_counter(budget, previous_day) == limit
    assert sum(e.cost_nanos for e in new) == settled_counter(budget, boundary) == limit


# 5. A Redis outage under several replicas --------------------------------------------------


def test_two_replicas_fail_closed_while_their_redis_is_down_and_replay_their_spools_once(
    tmp_path: Path, make_route: MakeRoute, issue_key: IssueKey
) -> None:
    make_route(model="r", price=PRICE)
    budgeted_org, free_org = OrganizationFactory(), OrganizationFactory()
    Budget.objects.create(org=budgeted_org, scope=Budget.Scope.ORG, limit_nanos=10**8)
    budgeted, free = issue_key(budgeted_org), issue_key(free_org)
    var_dirs = [tmp_path / f"replica-{n}" for n in range(2)]
    with private_redis() as server, ExitStack() as stack:
        envs = [
            {**REPLICA_ENV, "REDIS_URL": server.url, "TOLLGATE_VAR_DIR": str(var_dir),
             "TOLLGATE_REDIS_TIMEOUT_SECONDS": "0.5"}
            for var_dir in var_dirs
        ]  # fmt: skip
        replicas = start_gateways(stack, envs)
        stack.enter_context(usage_ingestion_at(server.url))
        for key in (budgeted, free):
            accepted_everywhere(replicas, key, "r")
        answers = [ask(replica.v1, budgeted, "r") for replica in replicas]
        assert [answer.status for answer in answers] == [200, 200]
        # In the ledger before the stop: this Redis keeps nothing on disk (see
        # docs/operations.md: a crash loses what the stream held).
        events_of([answer.request_id for answer in answers])

        server.stop()
        for replica in replicas:
            refused = ask(replica.v1, budgeted, "r")
            assert (refused.status, refused.code, refused.retry_after) == (
                503, "limits_unavailable", "1",
            )  # fmt: skip
            served = ask(replica.v1, free, "r")
            assert served.status == 200
            answers += [refused, served]

        def spooled() -> list[list[Path]]:
            return [sorted((d / "usage-spool").glob("spool-*")) for d in var_dirs]

        wait_until(lambda: all(spooled()), what="both replicas to spool their usage")
        server.start()
        wait_until(lambda: not any(spooled()), timeout_s=30, what="both spools replayed")
        after = [ask(replica.v1, budgeted, "r") for replica in replicas]
        assert [answer.status for answer in after] == [200, 200]
        answers += after

        ids = sorted(answer.request_id for answer in answers)
        events = events_of(ids)
        time.sleep(1.0)  # a duplicate would arrive within a drain or two
        assert sorted(e.id.hex for e in UsageEvent.objects.filter(id__in=ids)) == ids
        outcomes = sorted((e.org_id == free_org.pk, e.status_code) for e in events)
        assert outcomes == sorted([(False, 200)] * 4 + [(False, 503)] * 2 + [(True, 200)] * 2)
        spent = sum(e.cost_nanos for e in events if e.org_id == budgeted_org.pk)
        for replica in replicas:  # rebuilt from the ledger after Redis came back empty
            budget = key_budget(replica, budgeted)
            assert (nanos(budget["spent_usd"]), nanos(budget["reserved_usd"])) == (spent, 0)
