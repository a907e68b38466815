"""The response cache through a running gateway: hits skip the provider, orgs never share."""

import anthropic
import httpx
import pytest
from openai import OpenAI

from billing.contracts import TokenUsage
from billing.models import UsageEvent
from routing.cache import CachedReply, InProcessCache, cache_key
from routing.models import Route
from tests.conftest import IssueKey, MakeRoute
from tests.factories import OrganizationFactory
from tests.support.gateway import GatewayServer, wait_for_events

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def upstream_calls(mock_url: str, upstream_model: str) -> int:
    """How often the mock was asked QUESTION for `upstream_model` (warm-ups not counted)."""
    root = mock_url.removesuffix("/v1")
    requests = httpx.get(f"{root}/_mock/requests", params={"limit": 200}).json()
    return sum(
        1
        for r in requests
        if (r.get("json") or {}).get("model") == upstream_model
        and r["json"].get("messages") == QUESTION
    )


@pytest.fixture
def cached_route(make_route: MakeRoute):
    def build(upstream_model: str, **route_fields) -> Route:
        route = make_route(model="cached", upstream_model=upstream_model, price=("1.00", "2.00"))
        Route.objects.filter(pk=route.pk).update(cache_ttl_seconds=60, **route_fields)
        from tenants.config import config_revision_bump

        config_revision_bump()  # .update() skips the signals
        return route

    return build


def wait_for_caching(gateway: GatewayServer, key: str) -> None:
    """Wait until the gateway's snapshot has the route's cache setting (one poll)."""
    from tests.support.gateway import wait_until

    def cache_on() -> bool:
        response = httpx.post(
            f"{gateway.v1}/chat/completions",
            headers={"authorization": f"Bearer {key}", "x-tollgate-cache": "bypass"},
            json={"model": "cached", "messages": [{"role": "user", "content": "warm-up"}]},
        )
        return "x-tollgate-cache" in response.headers

    wait_until(cache_on, what="the route's cache setting")


def test_a_repeat_is_served_from_cache_without_an_upstream_call(
    gateway: GatewayServer, org, cached_route, live_key: IssueKey, mock_url: str
) -> None:
    cached_route("cache-a")
    key = live_key(org)
    wait_for_caching(gateway, key)
    client = OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)
    first = client.chat.completions.with_raw_response.create(model="cached", messages=QUESTION)
    second = client.chat.completions.with_raw_response.create(model="cached", messages=QUESTION)
    assert first.headers["x-tollgate-cache"] == "miss"
    assert second.headers["x-tollgate-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    before = upstream_calls(mock_url, "cache-a")

    # A streamed repeat comes from the cache too, as a stream.
    stream = client.chat.completions.create(
        model="cached", messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.parse().choices[0].message.content
    assert chunks[-1].usage.completion_tokens == first.parse().usage.completion_tokens
    assert upstream_calls(mock_url, "cache-a") == before

    events = wait_for_events(UsageEvent.objects.filter(org=org, model="cached", cache_hit=True), 2)
    assert all(event.cost_nanos == 0 for event in events)  # hits are free by default
    assert all(event.output_tokens == first.parse().usage.completion_tokens for event in events)


def test_another_orgs_identical_request_is_not_served_from_the_cache(
    gateway: GatewayServer, org, cached_route, live_key: IssueKey, mock_url: str
) -> None:
    cached_route("cache-b")
    mine, theirs = live_key(org), live_key(OrganizationFactory())
    wait_for_caching(gateway, mine)
    request = {"model": "cached", "messages": QUESTION}
    assert httpx.post(f"{gateway.v1}/chat/completions", json=request,
                      headers={"authorization": f"Bearer {mine}"}).status_code == 200  # fmt: skip
    other = httpx.post(
        f"{gateway.v1}/chat/completions",
        json=request,
        headers={"authorization": f"Bearer {theirs}"},
    )
    assert other.headers["x-tollgate-cache"] == "miss"
    assert upstream_calls(mock_url, "cache-b") == 2


def test_bypass_header_and_billed_hits(
    gateway: GatewayServer, org, cached_route, live_key: IssueKey, mock_url: str
) -> None:
    cached_route("cache-c", cache_hit_billing="full")
    key = live_key(org)
    wait_for_caching(gateway, key)
    headers = {"authorization": f"Bearer {key}"}
    request = {"model": "cached", "messages": QUESTION}
    httpx.post(f"{gateway.v1}/chat/completions", json=request, headers=headers)
    bypass = httpx.post(
        f"{gateway.v1}/chat/completions", json=request,
        headers={**headers, "x-tollgate-cache": "bypass"},
    )  # fmt: skip
    assert bypass.headers["x-tollgate-cache"] == "bypass"
    assert upstream_calls(mock_url, "cache-c") == 2
    hit = httpx.post(f"{gateway.v1}/chat/completions", json=request, headers=headers)
    assert hit.headers["x-tollgate-cache"] == "hit"
    (billed,) = wait_for_events(UsageEvent.objects.filter(org=org, cache_hit=True), 1)
    (paid,) = UsageEvent.objects.filter(org=org, model="cached", cache_hit=False)[:1]
    assert billed.cost_nanos == paid.cost_nanos > 0


def test_anthropic_clients_get_cache_hits_in_their_format(
    gateway: GatewayServer, org, cached_route, live_key: IssueKey, mock_url: str
) -> None:
    cached_route("cache-d")
    key = live_key(org)
    wait_for_caching(gateway, key)
    client = anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0)
    first = client.messages.create(model="cached", max_tokens=50, messages=QUESTION)
    second = client.messages.create(model="cached", max_tokens=50, messages=QUESTION)
    with client.messages.stream(model="cached", max_tokens=50, messages=QUESTION) as stream:
        third = stream.get_final_message()
    assert first.content[0].text == second.content[0].text == third.content[0].text
    assert third.usage.output_tokens == first.usage.output_tokens
    assert upstream_calls(mock_url, "cache-d") == 1


def test_cache_keys_ignore_delivery_and_attribution_but_not_the_question() -> None:
    base = {"model": "m", "messages": QUESTION, "temperature": 0}
    same = cache_key(org_id=1, model="m", payload=base)
    assert same == cache_key(
        org_id=1, model="m",
        payload={"temperature": 0, "messages": QUESTION, "model": "m", "stream": True,
                 "user": "someone"},
    )  # fmt: skip
    assert same != cache_key(org_id=2, model="m", payload=base)
    assert same != cache_key(org_id=1, model="m", payload={**base, "temperature": 1})


@pytest.mark.asyncio
async def test_in_process_cache_expires_and_stays_bounded() -> None:
    cache = InProcessCache(max_entries=2)
    reply = CachedReply(body=b"{}", usage=TokenUsage(input_tokens=1), deployment_name="d",
                        provider_kind="mock", upstream_model="m")  # fmt: skip
    await cache.set("a", reply, ttl_s=60)
    await cache.set("b", reply, ttl_s=60)
    await cache.set("c", reply, ttl_s=60)
    assert await cache.get("a") is None  # the oldest went first
    assert await cache.get("c") == reply
    await cache.set("gone", reply, ttl_s=0)
    assert await cache.get("gone") is None
