"""/metrics after real traffic: counters and histograms equal what was sent, per label,
summed over two uvicorn workers whichever one answers the scrape; spend, budget and
queue gauges agree with the ledger and the budget counters; a scrape needs the token
and an allowed network; the access log has one JSON line per request, and no secret."""

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from django.conf import settings
from django.db.models import Sum

from billing.models import ModelPrice, UsageEvent
from gatewaysite.metrics import metrics_refusal
from routing.models import Deployment, Provider, Route
from tenants.models import Budget, Organization, Team
from tenants.services import budget_create
from tests.conftest import TEST_ACTOR, IssueKey, MakeRoute
from tests.support.gateway import wait_until
from tests.support.observability import (
    PROMPT,
    Answer,
    Scrape,
    access_lines,
    chat,
    delta,
    list_models,
    logged_gateway,
    logged_stack,
    scrape,
)

live_servers = pytest.mark.django_db(transaction=True)
with_production_stack = pytest.mark.skipif(
    not settings.REDIS_URL or "postgresql" not in settings.DATABASES["default"]["ENGINE"],
    reason="the production-like stack runs on PostgreSQL and Redis (DATABASE_URL and "
    "REDIS_URL unset)",
)

METRICS_TOKEN = "metrics-token-for-tests-0123456789"
PROVIDER_SECRET = "sk-upstream-secret-for-tests"  # make_route's provider key
NANOS_PER_USD = 1_000_000_000
# Series a scrape must show the same whichever worker answers it.
SUMMED = (
    "tollgate_requests_total",
    "tollgate_tokens_total",
    "tollgate_request_duration_seconds_count",
    "tollgate_request_duration_seconds_bucket",
    "tollgate_time_to_first_token_seconds_count",
    "tollgate_upstream_attempts_total",
    "tollgate_upstream_errors_total",
    "tollgate_fallbacks_total",
)
# (endpoint, route, deployment, code, outcome): the labels of tollgate_requests_total.
Labels = tuple[str, str, str, str, str]


def flaky_route(org: Organization, mock_url: str) -> Route:
    """Route "flaky": a primary the mock fails with HTTP 500, then a backup that answers."""
    provider = Provider(org=org, name="flaky mock", kind=Provider.Kind.MOCK, base_url=mock_url)
    provider.set_api_key(PROVIDER_SECRET)
    provider.save()
    route = Route.objects.create(org=org, model_name="flaky")
    for priority, (name, upstream) in enumerate(
        [("flaky-primary", "fp+fault=500"), ("flaky-backup", "fb")]
    ):
        route.deployments.add(
            Deployment.objects.create(
                provider=provider, name=name, upstream_model=upstream, priority=priority
            )
        )
    ModelPrice.objects.create(
        provider_kind=Provider.Kind.MOCK,
        model="fb",
        input_usd_per_mtok=Decimal("3"),
        output_usd_per_mtok=Decimal("4"),
        effective_from=datetime(2020, 1, 1, tzinfo=UTC),
    )
    return route


def setup_tenant(
    org: Organization, team: Team, make_route: MakeRoute, issue_key: IssueKey, mock_url: str
) -> str:
    """Routes alpha, beta (one deployment each) and flaky, org and team budgets; a key."""
    make_route(model="alpha", org=org)
    make_route(model="beta", org=org, price=("0.50", "1.50"))
    flaky_route(org, mock_url)
    budget_create(
        org=org,
        scope=Budget.Scope.ORG,
        limit_nanos=100 * NANOS_PER_USD,
        actor=TEST_ACTOR,
        enforcement=Budget.Enforcement.SOFT,
    )
    budget_create(
        org=org,
        scope=Budget.Scope.TEAM,
        team=team,
        limit_nanos=50 * NANOS_PER_USD,
        actor=TEST_ACTOR,
        enforcement=Budget.Enforcement.SOFT,
    )
    return issue_key(org, team=team)


def wrong_key(key: str) -> str:
    return key[:-6] + ("AAAAAA" if not key.endswith("AAAAAA") else "BBBBBB")


def chat_labels(model: str, answer: Answer) -> Labels:
    if answer.status == 401:
        return ("chat.completions", "none", "none", "401", "client_error")
    if answer.status == 404:
        return ("chat.completions", "other", "none", "404", "client_error")
    assert answer.status == 200 and answer.deployment, answer
    return ("chat.completions", model, answer.deployment, "200", "success")


def send_traffic(v1: str, key: str) -> list[tuple[Labels, Answer, bool]]:
    """Every kind of request: (its expected labels, Tollgate's answer, streamed)."""
    sent = []
    for model, stream, times in [
        ("alpha", False, 4),
        ("alpha", True, 2),
        ("beta", False, 3),
        ("flaky", False, 3),
        ("no-such-model", False, 2),
    ]:
        for _ in range(times):
            answer = chat(v1, key, model, stream=stream)
            sent.append((chat_labels(model, answer), answer, stream))
    for _ in range(2):
        answer = chat(v1, wrong_key(key), "alpha")
        sent.append((chat_labels("alpha", answer), answer, False))
    answer = list_models(v1, key)
    sent.append((("models", "none", "none", "200", "success"), answer, False))
    return sent


def requests_of(scrape_delta: dict[Any, float]) -> Counter[Labels]:
    counts: Counter[Labels] = Counter()
    for (name, labels), value in scrape_delta.items():
        if name == "tollgate_requests_total":
            found = dict(labels)
            assert found["status_class"] == found["code"][0] + "xx"
            key = (
                found["endpoint"],
                found["route"],
                found["deployment"],
                found["code"],
                found["outcome"],
            )
            counts[key] += int(value)
    return counts


def expected_requests(sent: list[tuple[Labels, Answer, bool]]) -> Counter[Labels]:
    return Counter(labels for labels, _, _ in sent)


def assert_counters_match(
    changes: dict[Any, float],
    sent: list[tuple[Labels, Answer, bool]],
) -> None:
    """Every counter and histogram moved by exactly what `sent` explains."""

    def value(name: str, **labels: str) -> float:
        return changes.get((name, frozenset(labels.items())), 0.0)

    assert requests_of(changes) == expected_requests(sent)
    per_pair: Counter[tuple[str, str]] = Counter()
    streamed: Counter[tuple[str, str]] = Counter()
    tokens: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for (_, route, deployment, _, _), answer, stream in sent:
        per_pair[(route, deployment)] += 1
        if stream:
            streamed[(route, deployment)] += 1
        tokens[(route, deployment)][0] += answer.input_tokens
        tokens[(route, deployment)][1] += answer.output_tokens
    for (route, deployment), count in per_pair.items():
        labels = {"route": route, "deployment": deployment}
        assert value("tollgate_request_duration_seconds_count", **labels) == count, labels
        assert value("tollgate_request_duration_seconds_bucket", le="+Inf", **labels) == count
        assert value("tollgate_request_duration_seconds_sum", **labels) > 0
        assert (
            value("tollgate_time_to_first_token_seconds_count", **labels)
            == streamed[(route, deployment)]
        ), labels
        input_tokens, output_tokens = tokens[(route, deployment)]
        assert value("tollgate_tokens_total", type="input", **labels) == input_tokens, labels
        assert value("tollgate_tokens_total", type="output", **labels) == output_tokens, labels
    assert sum(tokens["alpha", "alpha-deployment"]) > 0
    # Calls upstream: one per answered request, plus a failed one before each flaky answer.
    flaky = sum(1 for labels, _, _ in sent if labels[1] == "flaky")
    assert flaky > 0
    calls = Counter(answer.deployment for _, answer, _ in sent if answer.deployment)
    calls["flaky-primary"] += flaky
    assert series(changes, "tollgate_upstream_attempts_total") == {
        frozenset({"deployment": name}.items()): count for name, count in calls.items()
    }
    assert series(changes, "tollgate_upstream_errors_total") == {
        frozenset({"deployment": "flaky-primary", "error_class": "upstream_error"}.items()): flaky
    }
    assert series(changes, "tollgate_fallbacks_total") == {
        frozenset(
            {"route": "flaky", "deployment": "flaky-backup", "kind": "deployment"}.items()
        ): flaky
    }


def series(changes: dict[Any, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (found, labels), value in changes.items() if found == name}


def assert_one_access_line_each(
    log: Path, sent: list[tuple[Labels, Answer, bool]], org: Organization, key: str
) -> None:
    """Exactly one JSON access line per request, with its figures; no secret in the log."""
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in access_lines(log):
        if line["source"] == "proxy":
            by_id[line["request_id"]].append(line)
    for (endpoint, route, deployment, code, outcome), answer, stream in sent:
        lines = by_id[answer.request_id]
        assert len(lines) == 1, (answer, lines)
        (line,) = lines
        assert (line["endpoint"], line["status"], line["outcome"]) == (endpoint, int(code), outcome)
        assert line["latency_ms"] >= 0 and line["method"] in ("GET", "POST")
        if code == "401":
            assert "org_id" not in line and "key_prefix" not in line
            continue
        assert (line["org_id"], line["org"], line["key_prefix"]) == (
            org.pk,
            org.slug,
            key[: len("tgk_") + 8],
        )
        if endpoint == "models":
            continue
        assert line["route"] == (None if route == "none" else route)
        assert line["deployment"] == (None if deployment == "none" else deployment)
        assert (line["input_tokens"], line["output_tokens"]) == (
            answer.input_tokens,
            answer.output_tokens,
        )
        assert line["stream"] is stream
        assert (line["ttft_ms"] is not None) is stream
        assert line["attempts"] == {"flaky": 2, "other": 0}.get(route, 1)
        assert line["provider"] == ("mock" if code == "200" else None)
        assert Decimal(line["cost_usd"]) >= 0
    text = log.read_text(errors="replace")
    for secret in (key, wrong_key(key), PROVIDER_SECRET, METRICS_TOKEN):
        assert secret not in text
    assert PROMPT not in text  # no request body either


def ledger_nanos(**filters: Any) -> int:
    total = UsageEvent.objects.filter(**filters).aggregate(total=Sum("cost_nanos"))["total"]
    return int(total or 0)


@pytest.fixture
def usage_stream() -> Iterator[str]:
    """A stream of this test's own: entries pointing at flushed rows bother nobody after."""
    name = f"tollgate:usage:metrics-test:{uuid.uuid4().hex}"
    yield name
    if settings.REDIS_URL:
        client = redis.Redis.from_url(settings.REDIS_URL)
        client.delete(name, f"{name}:dead")
        client.close()


@pytest.mark.slow
@live_servers
@with_production_stack
def test_two_workers_serve_the_sum_of_their_counters_whichever_answers(
    org: Organization,
    team: Team,
    make_route: MakeRoute,
    issue_key: IssueKey,
    mock_url: str,
    usage_stream: str,
    tmp_path: Path,
) -> None:
    key = setup_tenant(org, team, make_route, issue_key, mock_url)
    log = tmp_path / "stack.log"
    with logged_stack(
        tmp_path / "var",
        log,
        WEB_WORKERS="2",
        LOG_FORMAT="json",
        TOLLGATE_METRICS_TOKEN=METRICS_TOKEN,
        TOLLGATE_METRICS_FLUSH_SECONDS="0.1",
        TOLLGATE_METRICS_CACHE_SECONDS="0",
        TOLLGATE_USAGE_STREAM=usage_stream,
        TOLLGATE_USAGE_DRAIN_SECONDS="1",
        TOLLGATE_BREAKER_FAILURES="50",
    ) as stack:

        def both_workers_reporting() -> Scrape | None:
            found = scrape(stack.base_url, METRICS_TOKEN)
            running = found.value("tollgate_metrics_processes", state="running")
            return found if running == 2 else None

        before = wait_until(both_workers_reporting, timeout_s=30, what="both workers' counters")
        sent = send_traffic(stack.v1, key)
        # Each call had its own connection; make sure both workers served some of them.
        snapshots = tmp_path / "var" / "metrics"

        def chats_per_worker() -> list[int]:
            counts = []
            for path in sorted(snapshots.glob("web-*.json")):
                rows = orjson.loads(path.read_bytes())["metrics"]["requests"]
                counts.append(sum(row[5] for row in rows if row[0] == "chat.completions"))
            return counts

        for _ in range(60):
            counts = chats_per_worker()
            if len(counts) == 2 and all(counts):
                break
            answer = chat(stack.v1, key, "beta")
            sent.append((chat_labels("beta", answer), answer, False))
        assert len(counts) == 2 and all(counts), counts

        def settled() -> Scrape | None:
            # Other workers' counts arrive with their next snapshot (0.1 s here).
            found = scrape(stack.base_url, METRICS_TOKEN)
            return found if requests_of(delta(found, before)) == expected_requests(sent) else None

        after = wait_until(settled, timeout_s=10, what="the workers' counters")
        assert_counters_match(delta(after, before), sent)

        # Whichever worker answers, the same sums (scrapes are not counted themselves).
        pids = set()
        for _ in range(80):
            again = scrape(stack.base_url, METRICS_TOKEN)
            assert again.status == 200 and again.worker_pid
            pids.add(again.worker_pid)
            for name in SUMMED:
                assert series(again.samples, name) == series(after.samples, name), name
            if len(pids) == 2:
                break
        assert len(pids) == 2, "one worker answered every scrape"

        # Spend and budgets, once Celery wrote every metered request to the ledger.
        metered = sum(1 for labels, _, _ in sent if labels[3] != "401")
        wait_until(
            lambda: UsageEvent.objects.filter(org=org).count() == metered,
            timeout_s=30,
            what="the ledger",
        )
        org_nanos = ledger_nanos(org=org)
        team_nanos = ledger_nanos(org=org, team=team)
        assert org_nanos > 0 and team_nanos == org_nanos
        gauges = scrape(stack.base_url, METRICS_TOKEN)
        assert gauges.value("tollgate_org_month_spend_usd", org=org.slug) == org_nanos / 1e9
        assert gauges.value("tollgate_team_month_spend_usd", org=org.slug, team=team.slug) == (
            team_nanos / 1e9
        )
        for budget in Budget.objects.filter(org=org):
            labels = {
                "org": org.slug,
                "team": team.slug if budget.team else "",
                "scope": budget.scope,
                "period": "monthly",
                "budget_id": str(budget.pk),
            }
            assert gauges.value("tollgate_budget_limit_usd", **labels) == budget.limit_nanos / 1e9
            assert gauges.value("tollgate_budget_spend_usd", **labels) == org_nanos / 1e9
            assert gauges.value("tollgate_budget_utilization_ratio", **labels) == (
                org_nanos / budget.limit_nanos
            )
        assert gauges.value("tollgate_metrics_source_up", source="database") == 1
        assert gauges.value("tollgate_metrics_source_up", source="redis") == 1
        assert ("tollgate_usage_stream_length", frozenset()) in gauges.samples
        assert ("tollgate_usage_stream_pending", frozenset()) in gauges.samples
        assert (
            gauges.value(
                "tollgate_deployment_circuit_state", deployment="flaky-primary", state="closed"
            )
            == 1
        )

        refused = httpx.get(f"{stack.base_url}/metrics")
        assert refused.status_code == 401 and "tollgate_" not in refused.text
    assert_one_access_line_each(log, sent, org, key)


@live_servers
def test_one_process_counts_and_logs_every_kind_of_request(
    org: Organization,
    team: Team,
    make_route: MakeRoute,
    issue_key: IssueKey,
    mock_url: str,
    usage_stream: str,
    tmp_path: Path,
) -> None:
    key = setup_tenant(org, team, make_route, issue_key, mock_url)
    log = tmp_path / "gateway.log"
    with logged_gateway(
        log,
        LOG_FORMAT="json",
        TOLLGATE_USAGE_STREAM=usage_stream,
        TOLLGATE_BREAKER_FAILURES="50",
        TOLLGATE_METRICS_CACHE_SECONDS="0",
    ) as gateway:
        before = scrape(gateway.base_url)  # loopback, no token set: served
        assert before.status == 200
        sent = send_traffic(gateway.v1, key)
        after = scrape(gateway.base_url)  # one process: nothing to wait for
        assert_counters_match(delta(after, before), sent)
        assert after.value("tollgate_metrics_processes", state="running") == 1
        assert ("tollgate_usage_buffered_events", frozenset()) in after.samples
        if not settings.REDIS_URL:
            # The embedded default writes its own ledger: the gauges read it.
            metered = sum(1 for labels, _, _ in sent if labels[3] != "401")
            wait_until(
                lambda: UsageEvent.objects.filter(org=org).count() == metered, what="the ledger"
            )
            gauges = scrape(gateway.base_url)
            assert gauges.value("tollgate_org_month_spend_usd", org=org.slug) == (
                ledger_nanos(org=org) / 1e9
            )
            assert gauges.value("tollgate_metrics_source_up", source="database") == 1
            assert ("tollgate_metrics_source_up", frozenset({("source", "redis")})) not in (
                gauges.samples
            )
    assert_one_access_line_each(log, sent, org, key)


@live_servers
def test_metrics_need_the_token_when_one_is_set(tmp_path: Path) -> None:
    with logged_gateway(tmp_path / "gateway.log", TOLLGATE_METRICS_TOKEN=METRICS_TOKEN) as gateway:
        url = f"{gateway.base_url}/metrics"
        missing = httpx.get(url)
        wrong = httpx.get(url, headers={"authorization": f"Bearer {METRICS_TOKEN}x"})
        right = httpx.get(url, headers={"authorization": f"Bearer {METRICS_TOKEN}"})
        # Relayed by a proxy on loopback (uvicorn trusts its X-Forwarded-For): the client
        # it names is judged, from an allowed network or not.
        relayed = httpx.get(
            url,
            headers={"authorization": f"Bearer {METRICS_TOKEN}", "x-forwarded-for": "127.0.0.2"},
        )
        relayed_outsider = httpx.get(
            url,
            headers={"authorization": f"Bearer {METRICS_TOKEN}", "x-forwarded-for": "192.0.2.9"},
        )
        posted = httpx.post(url, headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["error"]["code"] == "metrics_token_required"
        assert "tollgate_" not in refused.text
    assert right.status_code == 200
    assert right.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE tollgate_requests_total counter" in right.text
    assert relayed.status_code == 200  # a proxy in front is fine with the token
    assert relayed_outsider.status_code == 403
    assert posted.status_code == 405 and posted.headers["allow"] == "GET"


@live_servers
def test_metrics_are_refused_outside_the_allowed_networks(tmp_path: Path) -> None:
    with logged_gateway(
        tmp_path / "gateway.log",
        TOLLGATE_METRICS_TOKEN=METRICS_TOKEN,
        TOLLGATE_METRICS_ALLOW_NETWORKS="10.0.0.0/8,fd00::/8",
    ) as gateway:
        response = httpx.get(
            f"{gateway.base_url}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}
        )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "metrics_refused"
    assert "tollgate_" not in response.text


@live_servers
def test_without_a_token_only_direct_loopback_clients_are_served(tmp_path: Path) -> None:
    with logged_gateway(tmp_path / "gateway.log") as gateway:
        url = f"{gateway.base_url}/metrics"
        direct = httpx.get(url)
        relayed = [
            httpx.get(url, headers={name: "203.0.113.7"})
            for name in ("x-forwarded-for", "x-real-ip", "forwarded")
        ]
    assert direct.status_code == 200
    assert [response.status_code for response in relayed] == [403, 403, 403]


@pytest.mark.parametrize(
    ("client", "headers", "token", "status"),
    [
        ("127.0.0.1", {}, "", None),
        ("::1", {}, "", None),
        ("::ffff:127.0.0.1", {}, "", None),  # IPv4 loopback through a dual-stack socket
        ("192.0.2.1", {}, "", 403),
        (None, {}, "", 403),  # a Unix socket: no address to judge
        (None, {"authorization": f"Bearer {METRICS_TOKEN}"}, METRICS_TOKEN, None),
        ("127.0.0.1", {"authorization": f"Basic {METRICS_TOKEN}"}, METRICS_TOKEN, 401),
        ("192.0.2.1", {"authorization": f"Bearer {METRICS_TOKEN}"}, METRICS_TOKEN, 403),
    ],
)
def test_who_may_scrape(
    client: str | None, headers: dict[str, str], token: str, status: int | None
) -> None:
    refusal = metrics_refusal(
        client, headers, token=token, allowed_networks=["127.0.0.0/8", "::1/128"]
    )
    assert (refusal.status if refusal else None) == status
