"""The fault matrix, Redis half: the gateway's Redis stops, comes back empty, or hangs.

The gateway under test and its Celery worker use a private redis-server that the test
stops, restarts (empty, as after a crash without persistence) and freezes (SIGSTOP);
the shared Redis of the run is never touched. For each outage: what a key with a hard
budget gets (fail closed by default, TOLLGATE_LIMITS_FAIL_OPEN to serve), what a key
without limits gets (always served), that every request's usage event reaches the
ledger exactly once (spooled to disk, replayed when Redis returns), and that afterwards
the budget counter, rebuilt from the ledger, equals the ledger. docs/reliability.md
tables it.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from billing.models import UsageEvent
from tenants.models import Budget, Organization
from tests.conftest import IssueKey, MakeRoute
from tests.factories import OrganizationFactory
from tests.support.gateway import (
    GatewayServer,
    gateway_server,
    wait_for_config,
    wait_for_key,
    wait_until,
)
from tests.support.halves import needs_redis_server, production_half_only
from tests.support.private_redis import PrivateRedis, private_redis, usage_ingestion_at

pytestmark = [
    pytest.mark.django_db(transaction=True),
    production_half_only,  # the production-like stack loses its Redis
    needs_redis_server,
]

HELLO = [{"role": "user", "content": "Hello"}]
BUDGET_NANOS = 100_000_000  # $0.10: room for every request here, so refusals are Redis's
REDIS_TIMEOUT_S = 0.5  # TOLLGATE_REDIS_TIMEOUT_SECONDS for the gateway under test
# What "fails within the timeout rather than hangs" allows on this loaded 2-core machine.
ANSWER_BOUND_S = REDIS_TIMEOUT_S + 2.0
# The usage producer's own socket timeout (billing/stream.py) before it spools.
INGESTION_WAIT_S = 60.0


@dataclass
class Stack:
    gateway: GatewayServer
    redis: PrivateRedis
    var_dir: Path
    budgeted: str = ""  # a key of an org with a hard budget
    free: str = ""  # a key of another org, without budget or limits
    budgeted_org: Organization | None = None
    free_org: Organization | None = None
    request_ids: list[str] = field(default_factory=list)

    def ask(self, key: str, model: str = "r") -> tuple[int, str, float]:
        """One chat request: its status, error code ("" on success) and how long it took."""
        client = OpenAI(base_url=self.gateway.v1, api_key=key, max_retries=0, timeout=15)
        started = time.monotonic()
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=HELLO, max_tokens=16
            )
        except openai.APIStatusError as exc:
            self.request_ids.append(exc.response.headers["x-request-id"])
            return exc.status_code, str(exc.code), time.monotonic() - started
        self.request_ids.append(raw.headers["x-request-id"])
        assert raw.parse().choices[0].message.content
        return 200, "", time.monotonic() - started

    def spooled_files(self) -> list[Path]:
        return sorted((self.var_dir / "usage-spool").glob("spool-*"))

    def wait_for_every_event(self) -> list[UsageEvent]:
        """Every chat request sent so far, in the ledger exactly once."""
        rows = UsageEvent.objects.filter(endpoint="chat.completions")
        wait_until(
            lambda: rows.count() >= len(self.request_ids),
            timeout_s=INGESTION_WAIT_S,
            what=f"{len(self.request_ids)} usage events in the ledger",
        )
        time.sleep(1.0)  # a duplicate would arrive within a drain or two
        events = list(rows)
        assert sorted(event.id.hex for event in events) == sorted(self.request_ids)
        return events

    def budget(self) -> dict:
        """The budgeted key's budget as /v1/key/info reports it."""
        response = httpx.get(
            f"{self.gateway.v1}/key/info", headers={"authorization": f"Bearer {self.budgeted}"}
        )
        assert response.status_code == 200, response.text
        (budget,) = response.json()["budgets"]
        return budget

    def assert_budget_equals_ledger(self, *, nothing_held: bool = True) -> None:
        """The budget counter (as /v1/key/info reports it) holds what the ledger holds."""
        assert self.budgeted_org is not None
        spent = sum(e.cost_nanos for e in self.wait_for_every_event() if e.org == self.budgeted_org)
        budget = self.budget()
        assert Decimal(budget["spent_usd"]).scaleb(9) == spent
        if nothing_held:
            assert Decimal(budget["reserved_usd"]) == 0, "a hold outlived its request"
        assert spent <= BUDGET_NANOS


@contextmanager
def outage_stack(
    tmp_path: Path, make_route: MakeRoute, issue_key: IssueKey, **extra_env: str
) -> Iterator[Stack]:
    """A gateway and a Celery worker on a private Redis; two orgs and route "r" (a second
    route "cached" keeps answers in Redis)."""
    make_route(model="r", price=("1.00", "10.00"))
    cached = make_route(model="cached", upstream_model="c", price=("1.00", "10.00"))
    cached.cache_ttl_seconds = 60
    cached.save()
    var_dir = tmp_path / "var"
    with (
        private_redis() as server,
        gateway_server(
            REDIS_URL=server.url,
            TOLLGATE_VAR_DIR=str(var_dir),
            TOLLGATE_REDIS_TIMEOUT_SECONDS=str(REDIS_TIMEOUT_S),
            **extra_env,
        ) as gateway,
        usage_ingestion_at(server.url),
    ):
        stack = Stack(gateway=gateway, redis=server, var_dir=var_dir)
        stack.budgeted_org, stack.free_org = OrganizationFactory(), OrganizationFactory()
        Budget.objects.create(
            org=stack.budgeted_org, scope=Budget.Scope.ORG, limit_nanos=BUDGET_NANOS
        )
        stack.budgeted, stack.free = issue_key(stack.budgeted_org), issue_key(stack.free_org)
        wait_for_key(gateway, stack.budgeted)
        wait_for_config(gateway, stack.free, "cached")
        yield stack


@pytest.mark.parametrize("fail_open", [False, True], ids=["default-fail-closed", "fail-open"])
def test_redis_down_then_back_empty(
    tmp_path: Path, make_route: MakeRoute, issue_key: IssueKey, fail_open: bool
) -> None:
    env = {"TOLLGATE_LIMITS_FAIL_OPEN": "true"} if fail_open else {}
    with outage_stack(tmp_path, make_route, issue_key, **env) as stack:
        assert stack.ask(stack.budgeted)[:2] == (200, "")
        assert stack.ask(stack.free)[:2] == (200, "")
        stack.wait_for_every_event()

        stack.redis.stop()
        status, code, took_s = stack.ask(stack.budgeted)
        if fail_open:
            assert (status, code) == (200, "")  # served, outside the budget's counter
        else:
            assert (status, code) == (503, "limits_unavailable")
        assert took_s < ANSWER_BOUND_S
        assert stack.ask(stack.free)[:2] == (200, "")
        assert stack.ask(stack.free, "cached")[:2] == (200, "")  # the cache is skipped
        # The usage events of the outage wait on disk.
        wait_until(stack.spooled_files, what="usage events spooled to disk")
        assert not UsageEvent.objects.filter(id__in=stack.request_ids[2:]).exists()

        # Back, empty: the spool is replayed, the worker ingests it, the budget's
        # counter is rebuilt from the ledger (the outage's spend included).
        stack.redis.start()
        stack.wait_for_every_event()
        wait_until(lambda: not stack.spooled_files(), what="the spool to be replayed")
        assert stack.ask(stack.budgeted)[:2] == (200, "")
        stack.assert_budget_equals_ledger()
        events = stack.wait_for_every_event()
        outage = [e for e in events if e.id.hex == stack.request_ids[2]]
        assert [(e.outcome, e.status_code) for e in outage] == (
            [("success", 200)] if fail_open else [("client_error", 503)]
        )


def test_redis_hung_fails_budgeted_requests_within_the_timeout_and_loses_nothing(
    tmp_path: Path, make_route: MakeRoute, issue_key: IssueKey
) -> None:
    with outage_stack(tmp_path, make_route, issue_key) as stack:
        assert stack.ask(stack.budgeted)[:2] == (200, "")
        stack.wait_for_every_event()

        stack.redis.hang()
        try:
            status, code, took_s = stack.ask(stack.budgeted)
            assert (status, code) == (503, "limits_unavailable")
            assert took_s < ANSWER_BOUND_S
            status, code, took_s = stack.ask(stack.free)
            assert (status, code) == (200, "")
            assert took_s < ANSWER_BOUND_S
        finally:
            stack.redis.resume()

        stack.wait_for_every_event()
        assert stack.ask(stack.budgeted)[:2] == (200, "")
        # Spend is exact; the refused requests' holds are voided in the background (the
        # next test waits for that).
        stack.assert_budget_equals_ledger(nothing_held=False)


def test_redis_hung_a_refused_request_leaves_nothing_held(
    tmp_path: Path, make_route: MakeRoute, issue_key: IssueKey
) -> None:
    with outage_stack(tmp_path, make_route, issue_key) as stack:
        assert stack.ask(stack.budgeted)[:2] == (200, "")
        stack.redis.hang()
        try:
            assert stack.ask(stack.budgeted)[:2] == (503, "limits_unavailable")
        finally:
            stack.redis.resume()
        # Redis works through what it was sent while frozen: the reserve the gateway gave
        # up on, and the void it sent after it (retried until Redis answers), in any order.
        wait_until(
            lambda: Decimal(stack.budget()["reserved_usd"]) == 0,
            timeout_s=5,
            what="the refused request's hold to be voided",
        )
        assert Decimal(stack.budget()["reserved_usd"]) == 0


def test_redis_hung_a_cached_route_answers_within_the_timeout(
    tmp_path: Path, make_route: MakeRoute, issue_key: IssueKey
) -> None:
    with outage_stack(tmp_path, make_route, issue_key) as stack:
        stack.redis.hang()
        try:
            status, code, took_s = stack.ask(stack.free, "cached")
        finally:
            stack.redis.resume()
        assert (status, code) == (200, "")
        assert took_s < ANSWER_BOUND_S
