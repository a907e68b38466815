"""Budgets and rate limits on the proxy, end to end: real gateways, the official SDKs,
the mock provider, and (in the PostgreSQL run) the shared Redis counters."""

import asyncio
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal

import anthropic
import httpx
import openai
import orjson
import pytest
import redis
from django.conf import settings
from django.test import override_settings

from billing.alert_tasks import budget_alerts_check
from billing.alerts import alert_channel_create
from billing.models import AlertChannel, UsageEvent
from billing.webhooks import webhook_signature_verify
from tenants.models import Budget, Organization, Team
from tenants.services import budget_create
from tests.conftest import TEST_ACTOR, IssueKey, MakeRoute
from tests.support.gateway import (
    GatewayServer,
    chat_burst,
    gateway_server,
    wait_for_config,
    wait_for_events,
    wait_for_key,
    wait_until,
)
from tests.support.halves import production_half_only
from tests.support.tcp_relay import relay_to_test_database, relayed_database_url
from tests.support.webhooks import webhook_receiver

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello"}]
# Prices (USD per million tokens) that make output dominate: 100 and 10,000 nano-USD a token.
INPUT_RATE, OUTPUT_RATE = "0.10", "10.00"
# "Hello" is 5 bytes: the reserved prompt is 16 + 8 + 5 = 29 tokens; the mock counts 1 + 3.
RESERVED_INPUT, ACTUAL_INPUT, OUTPUT = 29, 4, 10
MAX_COST = RESERVED_INPUT * 100 + OUTPUT * 10_000  # nano-USD: 102,900
ACTUAL_COST = ACTUAL_INPUT * 100 + OUTPUT * 10_000  # 100,400

needs_redis = pytest.mark.skipif(not settings.REDIS_URL, reason="needs the shared Redis counters")


def budget(org: Organization, limit_nanos: int, **fields: object) -> Budget:
    return Budget.objects.create(
        org=org, scope=fields.pop("scope", Budget.Scope.ORG), limit_nanos=limit_nanos, **fields
    )


def key_info(gateway: GatewayServer, key: str) -> dict:
    response = httpx.get(f"{gateway.v1}/key/info", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def check_concurrent_budget(bases: list[str], org: Organization, key: str) -> None:
    limit = 50 * ACTUAL_COST  # room for 50 requests at their actual cost, 48 at their maximum
    outcomes = asyncio.run(chat_burst(bases, key, model="capped", max_tokens=OUTPUT, count=200))
    served = outcomes.count("ok")
    assert set(outcomes) == {"ok", "budget_exceeded"}, set(outcomes)
    # Never more than fits; never fewer than fit even at every request's maximum cost.
    assert limit // MAX_COST <= served <= limit // ACTUAL_COST
    events = wait_for_events(UsageEvent.objects.filter(org=org, model="capped"), 200)
    spent = sum(event.cost_nanos for event in events)
    assert spent == served * ACTUAL_COST <= limit
    blocked = [event for event in events if event.outcome == UsageEvent.Outcome.BLOCKED]
    assert len(blocked) == 200 - served and {e.error_class for e in blocked} == {"budget_exceeded"}


@pytest.fixture
def capped(make_route: MakeRoute) -> None:
    make_route(
        model="capped", upstream_model="capped+latency_ms=50", price=(INPUT_RATE, OUTPUT_RATE)
    )


def test_200_concurrent_requests_never_overspend_a_hard_budget(
    gateway: GatewayServer, org: Organization, capped: None, live_key: IssueKey
) -> None:
    budget(org, 50 * ACTUAL_COST)
    check_concurrent_budget([gateway.v1], org, live_key(org))


@needs_redis
def test_two_gateway_processes_share_one_budget_exactly(
    gateway: GatewayServer, org: Organization, capped: None, live_key: IssueKey
) -> None:
    budget(org, 50 * ACTUAL_COST)
    key = live_key(org)
    with gateway_server() as second:
        wait_for_key(second, key)
        check_concurrent_budget([gateway.v1, second.v1], org, key)


def test_a_refused_request_names_the_budget_and_when_it_resets(
    gateway: GatewayServer, org: Organization, capped: None, live_key: IssueKey
) -> None:
    org.time_zone = "Asia/Kolkata"
    org.save()
    budget(org, MAX_COST - 1, period=Budget.Period.DAILY)
    key = live_key(org)
    sent: list[httpx.Request] = []
    http_client = httpx.Client(event_hooks={"request": [sent.append]})
    # The SDK's default retries: a refusal that lasts until the period ends is not retried.
    sdk = openai.OpenAI(base_url=gateway.v1, api_key=key, http_client=http_client)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model="capped", messages=HELLO, max_tokens=OUTPUT)
    assert len(sent) == 1
    error = raised.value
    assert error.code == "budget_exceeded"
    assert f"Organization '{org.name}' daily budget" in error.message
    assert "resets at" in error.message and "IST" in error.message
    assert error.response.headers["x-tollgate-budget-reset"].endswith("T18:30:00Z")  # IST midnight
    (event,) = wait_for_events(UsageEvent.objects.filter(org=org, model="capped"), 1)
    assert event.outcome == UsageEvent.Outcome.BLOCKED and event.cost_nanos == 0

    messages = anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as anthropic_raised:
        messages.messages.create(model="capped", max_tokens=OUTPUT, messages=HELLO)
    assert "budget" in anthropic_raised.value.message


def check_alerts(embedded: bool) -> None:
    """Run the budget alert check the way production does: beat's task reading Redis,
    delivered by the session's worker; the embedded gateway checks every second itself."""
    if not embedded:
        budget_alerts_check.apply()


@override_settings(TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS=True)  # the receiver is on loopback
def test_thresholds_alert_once_each_with_a_signature_the_receiver_verifies(
    gateway: GatewayServer, org: Organization, capped: None, live_key: IssueKey
) -> None:
    # Four requests fit (the last one exactly, at its maximum cost), then one is refused.
    budget_create(
        org=org, scope=Budget.Scope.ORG, limit_nanos=3 * ACTUAL_COST + MAX_COST,
        soft_thresholds=(50, 90), actor=TEST_ACTOR,
    )  # fmt: skip
    embedded = not settings.REDIS_URL
    with webhook_receiver() as receiver:
        secret = alert_channel_create(
            channel=AlertChannel(org=org, name="ops", kind=AlertChannel.Kind.WEBHOOK,
                                 url=receiver.url),
            actor=TEST_ACTOR,
        )  # fmt: skip
        sdk = openai.OpenAI(base_url=gateway.v1, api_key=live_key(org), max_retries=0)
        for _ in range(4):
            sdk.chat.completions.create(model="capped", messages=HELLO, max_tokens=OUTPUT)
            check_alerts(embedded)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="capped", messages=HELLO, max_tokens=OUTPUT)

        def three_alerts() -> bool:
            check_alerts(embedded)
            return len(receiver.received()) >= 3

        wait_until(three_alerts, timeout_s=30, what="three alerts at the receiver")
        for _ in range(3):  # later checks find nothing new to say
            check_alerts(embedded)
            time.sleep(1)
        received = receiver.received()
    assert len(received) == 3
    bodies = [orjson.loads(request.body) for request in received]
    assert sorted((body["event"], body["threshold_pct"]) for body in bodies) == [
        ("exhausted", None), ("threshold", 50), ("threshold", 90),
    ]  # fmt: skip
    for request in received:
        header = request.headers["x-tollgate-signature"]
        assert webhook_signature_verify(secret, header, request.body)
        assert not webhook_signature_verify(secret, header, request.body + b" ")
        assert not webhook_signature_verify("whsec_other", header, request.body)
    assert len({request.headers["x-tollgate-delivery"] for request in received}) == 3


def test_a_soft_budget_only_reports_and_a_team_budget_binds_its_team_only(
    gateway: GatewayServer, org: Organization, team: Team, capped: None, live_key: IssueKey
) -> None:
    budget(org, 1, enforcement=Budget.Enforcement.SOFT)
    budget(org, 1, scope=Budget.Scope.TEAM, team=team)
    outside, inside = live_key(org), live_key(org, team=team)
    ok = openai.OpenAI(base_url=gateway.v1, api_key=outside, max_retries=0)
    ok.chat.completions.create(model="capped", messages=HELLO, max_tokens=OUTPUT)
    blocked = openai.OpenAI(base_url=gateway.v1, api_key=inside, max_retries=0)
    with pytest.raises(openai.RateLimitError, match=f"Team '{team.name}' monthly budget"):
        blocked.chat.completions.create(model="capped", messages=HELLO, max_tokens=OUTPUT)
    # The soft budget saw the spend it did not stop.
    (soft,) = [b for b in key_info(gateway, outside)["budgets"] if b["enforcement"] == "soft"]
    assert soft["spent_usd"] == f"{ACTUAL_COST / 1e9:.9f}"


def test_an_unbounded_request_under_a_hard_budget_gets_the_route_output_limit(
    gateway: GatewayServer, org: Organization, make_route: MakeRoute, live_key: IssueKey
) -> None:
    route = make_route(model="bounded", price=(INPUT_RATE, OUTPUT_RATE))
    route.max_output_tokens = 5
    route.save()
    free_key = live_key(org)
    sdk = openai.OpenAI(base_url=gateway.v1, api_key=free_key, max_retries=0)
    unlimited = sdk.chat.completions.create(model="bounded", messages=HELLO)
    assert unlimited.usage.completion_tokens == 16  # the mock's whole answer
    budget(org, 10**9)
    bound_key = live_key(org)
    sdk = openai.OpenAI(base_url=gateway.v1, api_key=bound_key, max_retries=0)
    bounded = sdk.chat.completions.create(model="bounded", messages=HELLO)
    assert bounded.usage.completion_tokens == 5


def test_key_info_shows_the_key_its_budgets_and_a_forecast(
    gateway: GatewayServer, org: Organization, capped: None, issue_key: IssueKey
) -> None:
    key = issue_key(org, name="ci", rpm_limit=3, allowed_models=["capped"])
    wait_for_key(gateway, key)
    sdk = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    sdk.chat.completions.create(model="capped", messages=HELLO, max_tokens=OUTPUT)
    wait_for_events(UsageEvent.objects.filter(org=org, cost_nanos__gt=0), 1)
    budget(org, 10 * ACTUAL_COST, period=Budget.Period.LIFETIME)

    def budget_listed() -> dict:
        info = key_info(gateway, key)
        return info if info["budgets"] else {}

    info = wait_until(budget_listed, what="the new budget in the key's info")
    assert info["key"]["name"] == "ci" and info["key"]["allowed_models"] == ["capped"]
    assert info["key"]["organization"] == org.slug
    (requests,) = info["rate_limits"]
    assert requests["unit"] == "requests" and requests["limit_per_minute"] == 3
    assert requests["remaining"] == 2  # one request taken (key info takes none)
    (lifetime,) = info["budgets"]
    assert lifetime["spent_usd"] == f"{ACTUAL_COST / 1e9:.9f}"  # seeded from the ledger
    assert lifetime["remaining_usd"] == f"{9 * ACTUAL_COST / 1e9:.9f}"
    assert lifetime["resets_at"] is None and lifetime["forecast"]["projected_usd"] is None
    # Another key sees nothing of this key's limits.
    assert httpx.get(f"{gateway.v1}/key/info").status_code == 401


@pytest.fixture
def plain(make_route: MakeRoute) -> None:
    make_route(model="plain")


def seconds(duration: str) -> float:
    """OpenAI's reset durations ("20ms", "1.5s", "6m0s") in seconds."""
    if duration.endswith("ms"):
        return float(duration[:-2]) / 1000
    minutes, _, rest = duration.rpartition("m")
    return float(minutes or 0) * 60 + float(rest.rstrip("s"))


def ask(client: httpx.Client, gateway: GatewayServer, key: str, **body: object) -> httpx.Response:
    return client.post(
        f"{gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "plain", "messages": HELLO, "max_tokens": 1, **body},
    )


def test_rate_limit_headers_count_down_and_a_burst_gets_429_with_retry_after(
    gateway: GatewayServer, org: Organization, plain: None, live_key: IssueKey
) -> None:
    key = live_key(org, rpm_limit=6)  # one request back every 10 s
    with httpx.Client() as client:
        remaining = []
        for _ in range(6):
            response = ask(client, gateway, key)
            assert response.status_code == 200, response.text
            assert response.headers["x-ratelimit-limit-requests"] == "6"
            remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [5, 4, 3, 2, 1, 0]
        assert 50 <= seconds(response.headers["x-ratelimit-reset-requests"]) <= 60  # 6 x 10 s
        refused = ask(client, gateway, key)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert "6 requests per minute" in error["message"]
    assert 8 <= int(refused.headers["retry-after"]) <= 10
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_retry_after_is_when_the_next_request_is_admitted(
    gateway: GatewayServer, org: Organization, plain: None, live_key: IssueKey
) -> None:
    key = live_key(org, rpm_limit=60)  # one request back every second
    with httpx.Client() as client:
        served = 0
        while (response := ask(client, gateway, key)).status_code == 200 and served < 100:
            served += 1
        assert response.status_code == 429 and served >= 60
        wait_s = int(response.headers["retry-after"])
        assert wait_s == 1
        time.sleep(wait_s)
        assert ask(client, gateway, key).status_code == 200


def test_token_limits_count_tokens_and_refuse_a_request_that_could_never_fit(
    gateway: GatewayServer, org: Organization, plain: None, live_key: IssueKey
) -> None:
    key = live_key(org, tpm_limit=600)  # 10 tokens back a second
    with httpx.Client() as client:
        first = ask(client, gateway, key, max_tokens=40)  # about 5 prompt + 40 tokens taken
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "600"
        assert 554 <= int(first.headers["x-ratelimit-remaining-tokens"]) <= 556
        too_big = ask(client, gateway, key, max_tokens=5_000)
    assert too_big.status_code == 429 and too_big.headers["x-should-retry"] == "false"
    assert too_big.json()["error"]["code"] == "tokens_per_minute_exceeded"

    def refunded() -> bool:
        # The mock used 4 + 16 tokens: the rest of the estimate is given back.
        (tokens,) = key_info(gateway, key)["rate_limits"]
        return tokens["remaining"] >= 580

    wait_until(refunded, what="the unused tokens to be given back")


def test_a_team_limit_is_shared_by_every_key_of_the_team(
    gateway: GatewayServer, org: Organization, team: Team, plain: None, live_key: IssueKey
) -> None:
    team.rpm_limit = 2
    team.save()
    first, second = live_key(org, team=team), live_key(org, team=team)
    other_team_key = live_key(org)
    with httpx.Client() as client:
        assert ask(client, gateway, first).status_code == 200
        assert ask(client, gateway, second).status_code == 200
        refused = ask(client, gateway, first)
        assert refused.status_code == 429
        assert f"team '{team.name}'" in refused.json()["error"]["message"]
        assert ask(client, gateway, other_team_key).status_code == 200


@pytest.fixture
def unreachable_counters_gateway(django_db_setup: None, mock_url: str) -> Iterator[GatewayServer]:
    """A gateway whose Redis is gone: nothing listens on its port."""
    if not settings.REDIS_URL:
        pytest.skip("needs the Redis run")
    with (
        tempfile.TemporaryDirectory(prefix="tollgate-no-redis-") as var_dir,
        gateway_server(REDIS_URL="redis://127.0.0.1:9/0", TOLLGATE_VAR_DIR=var_dir) as server,
    ):
        yield server


def test_without_its_counters_a_limited_key_is_refused_and_others_are_served(
    unreachable_counters_gateway: GatewayServer, org: Organization, plain: None,
    issue_key: IssueKey,
) -> None:  # fmt: skip
    gateway = unreachable_counters_gateway
    limited, free = issue_key(org, rpm_limit=100), issue_key(org)
    wait_for_key(gateway, free)
    with httpx.Client() as client:
        assert ask(client, gateway, free).status_code == 200
        refused = ask(client, gateway, limited)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "limits_unavailable"
    assert refused.headers["retry-after"] == "1"


# ---------------------------------------------------------------- the ledger out of reach


@production_half_only
@pytest.mark.parametrize("fail_open", [False, True], ids=["default-fail-closed", "fail-open"])
def test_budget_counters_that_cannot_be_seeded_while_postgres_is_away(
    gateway: GatewayServer, org: Organization, capped: None, issue_key: IssueKey, fail_open: bool
) -> None:
    """A budget's first request of a period seeds its counters from the ledger. With
    PostgreSQL away (the gateway reaches it through a relay, then cut) it cannot: the
    request gets 503 limits_unavailable, or is served outside the counters when failing
    open. Once PostgreSQL is back the counters are seeded, the outage's spend included,
    and requests are admitted and metered as usual. (`gateway` for its Celery worker,
    which writes this test's usage without the relay.)"""
    budget(org, 100 * MAX_COST)
    key = issue_key(org)  # a new budget: no counters in Redis yet
    chats = UsageEvent.objects.filter(org=org, endpoint="chat.completions")
    env = {"TOLLGATE_LIMITS_FAIL_OPEN": "true"} if fail_open else {}
    with (
        relay_to_test_database() as relay,
        gateway_server(DATABASE_URL=relayed_database_url(relay), **env) as relayed,
        httpx.Client(base_url=relayed.v1, headers={"authorization": f"Bearer {key}"},
                     timeout=60) as client,
    ):  # fmt: skip
        wait_for_config(relayed, key, "capped")
        relay.cut()  # PostgreSQL restarting: connections reset, new ones refused
        chat = {"model": "capped", "messages": HELLO, "max_tokens": OUTPUT}
        during = client.post("/chat/completions", json=chat)
        if fail_open:
            assert during.status_code == 200, during.text
        else:
            assert during.status_code == 503, during.text
            assert during.json()["error"]["code"] == "limits_unavailable"
            assert during.headers["retry-after"] == "1"
        report = client.get("/key/info")  # it reads the same counters
        assert report.status_code == 503, report.text
        assert report.json()["error"]["code"] == "limits_unavailable"
        (outage,) = wait_for_events(chats.all(), 1)
        assert (outage.outcome, outage.cost_nanos) == (
            ("success", ACTUAL_COST) if fail_open else ("client_error", 0)
        )

        relay.restore()
        # The pool reconnects with backoff; /v1/key/info spends nothing meanwhile.
        wait_until(
            lambda: client.get("/key/info").status_code == 200, timeout_s=60,
            what="the gateway to reach PostgreSQL again",
        )  # fmt: skip
        after = client.post("/chat/completions", json=chat)
        assert after.status_code == 200, after.text
        events = wait_for_events(chats.all(), 2)
        (counted,) = client.get("/key/info").json()["budgets"]
    spent = sum(event.cost_nanos for event in events)
    assert spent == ACTUAL_COST * (2 if fail_open else 1)
    assert Decimal(counted["spent_usd"]).scaleb(9) == spent
    assert Decimal(counted["reserved_usd"]) == 0


@needs_redis
def test_a_busy_keys_requests_are_served_from_a_lease_and_settle_exactly(
    gateway: GatewayServer, org: Organization, capped: None, live_key: IssueKey
) -> None:
    """Past a few requests a second, the gateway admits a key's requests from room it
    holds ahead in Redis (billing/budget_leases.py); the counters still equal the ledger,
    and what it held is given back once the key goes quiet."""
    limit = budget(org, 1_000 * MAX_COST)
    key = live_key(org, rpm_limit=10_000)
    sdk = openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    counters = redis.Redis.from_url(settings.REDIS_URL)
    lease_holds = []
    remaining = []
    for _ in range(30):
        raw = sdk.chat.completions.with_raw_response.create(
            model="capped", messages=HELLO, max_tokens=OUTPUT
        )
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        for holds in counters.scan_iter(match=f"tollgate:budget:{limit.id}:*:holds"):
            lease_holds += [m for m in counters.zrange(holds, 0, -1) if m.startswith(b"lease:")]
    assert lease_holds, "no request was served from a lease"
    assert 10_000 - 30 <= remaining[-1] < remaining[0] <= 10_000

    events = wait_for_events(UsageEvent.objects.filter(org=org, model="capped"), 30)
    assert sum(e.cost_nanos for e in events) == 30 * ACTUAL_COST
    # Given back within about a second of the key going quiet: nothing stays held.
    wait_until(
        lambda: Decimal(key_info(gateway, key)["budgets"][0]["reserved_usd"]) == 0,
        timeout_s=5, what="the lease to be given back",
    )  # fmt: skip
    (counted,) = key_info(gateway, key)["budgets"]
    assert Decimal(counted["spent_usd"]).scaleb(9) == 30 * ACTUAL_COST
    counters.close()
