"""End to end: the official openai SDK against a running Tollgate and the mock provider."""

import base64
import struct
from datetime import timedelta

import httpx
import openai
import pytest
from django.db.models import QuerySet
from django.utils import timezone
from openai import OpenAI

from billing.models import UsageEvent
from routing.models import Deployment
from tenants.models import VirtualKey
from tenants.services import virtual_key_revoke
from tests.conftest import TEST_ACTOR, IssueKey, MakeRoute
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.gateway import (
    TEST_MAX_REQUEST_BYTES,
    GatewayServer,
    wait_for_events,
    wait_for_usage_writes_to_settle,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello there, gateway"}]


def calls(org) -> QuerySet[UsageEvent]:
    """The org's usage events, less the /v1/models polls made while waiting for keys."""
    return UsageEvent.objects.filter(org=org).exclude(endpoint="models")


def client(gateway: GatewayServer, key: str) -> OpenAI:
    return OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=15)


@pytest.fixture
def chat_setup(org, team, make_route: MakeRoute, live_key: IssueKey):
    """An org with a chat and an embeddings route, and a key of one of its teams."""
    make_route(model="chat-model", price=("1.00", "2.00"))
    make_route(model="embed-model", price=("0.10", "0"))
    return org, team, live_key(org, team=team)


def test_chat_completion_returns_the_upstream_answer_and_meters_it(
    gateway: GatewayServer, chat_setup
) -> None:
    org, team, key = chat_setup
    reply = client(gateway, key).chat.completions.create(model="chat-model", messages=HELLO)

    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 16

    (event,) = wait_for_events(calls(org), 1)
    assert event.outcome == UsageEvent.Outcome.SUCCESS
    assert event.status_code == 200
    assert (event.model, event.endpoint, event.is_stream) == (
        "chat-model",
        "chat.completions",
        False,
    )
    assert event.team_id == team.pk
    assert event.input_tokens == reply.usage.prompt_tokens
    assert event.output_tokens == 16
    # $1 per million input tokens and $2 per million output tokens, in nano-USD.
    assert event.cost_nanos == reply.usage.prompt_tokens * 1_000 + 16 * 2_000
    assert event.priced and event.price_id is not None
    assert event.latency_ms is not None
    key_row = VirtualKey.objects.get(org=org)
    wait_until(lambda: VirtualKey.objects.get(pk=key_row.pk).last_used_at, what="last_used_at")


def test_streamed_chat_matches_the_non_streamed_answer(gateway: GatewayServer, chat_setup) -> None:
    org, _, key = chat_setup
    sdk = client(gateway, key)
    whole = sdk.chat.completions.create(model="chat-model", messages=HELLO)
    chunks = list(sdk.chat.completions.create(model="chat-model", messages=HELLO, stream=True))

    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The client did not ask for usage, so it gets no usage chunk...
    assert all(chunk.usage is None for chunk in chunks)
    # ...but the gateway still metered the stream exactly.
    events = wait_for_events(calls(org).filter(is_stream=True), 1)
    assert events[0].output_tokens == whole.usage.completion_tokens
    assert events[0].input_tokens == whole.usage.prompt_tokens
    assert events[0].usage_estimated is False
    assert events[0].ttft_ms is not None


def test_stream_with_include_usage_ends_with_a_usage_chunk(
    gateway: GatewayServer, chat_setup
) -> None:
    _, _, key = chat_setup
    chunks = list(
        client(gateway, key).chat.completions.create(
            model="chat-model",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_embeddings_in_float_and_base64(gateway: GatewayServer, chat_setup) -> None:
    org, _, key = chat_setup
    sdk = client(gateway, key)
    as_floats = sdk.embeddings.create(
        model="embed-model", input=["a b", "c"], encoding_format="float"
    )
    # The SDK asks for base64 by default and decodes it itself.
    default = sdk.embeddings.create(model="embed-model", input=["a b", "c"])

    assert len(as_floats.data) == 2
    for decoded, plain in zip(default.data, as_floats.data, strict=True):
        assert decoded.embedding == pytest.approx(plain.embedding, abs=1e-6)
    raw = httpx.post(
        f"{gateway.v1}/embeddings",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "embed-model", "input": "a b", "encoding_format": "base64"},
    ).json()
    decoded = base64.b64decode(raw["data"][0]["embedding"])
    assert len(struct.unpack(f"<{len(decoded) // 4}f", decoded)) == len(as_floats.data[0].embedding)
    events = wait_for_events(calls(org).filter(endpoint="embeddings"), 3)
    assert all(event.outcome == UsageEvent.Outcome.SUCCESS for event in events)
    assert all(event.input_tokens > 0 for event in events)


def test_models_lists_only_what_the_key_may_use(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    other_org = OrganizationFactory()
    make_route(model="global-model")
    make_route(model="own-model", org=org)
    make_route(model="other-orgs-model", org=other_org)
    everything = client(gateway, live_key(org))
    restricted = client(gateway, live_key(org, allowed_models=["own-model"]))

    wait_until(
        lambda: {m.id for m in everything.models.list()} == {"global-model", "own-model"},
        what="the key's models",
    )
    assert [m.id for m in restricted.models.list()] == ["own-model"]
    assert everything.models.retrieve("own-model").id == "own-model"
    with pytest.raises(openai.NotFoundError):
        everything.models.retrieve("other-orgs-model")
    with pytest.raises(openai.NotFoundError):
        everything.chat.completions.create(model="other-orgs-model", messages=HELLO)


def test_wrong_missing_revoked_and_expired_keys_get_401(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    make_route(model="chat-model")
    key = live_key(org)
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(gateway, key[:-1] + ("A" if key[-1] != "A" else "B")).models.list()
    assert wrong.value.body["code"] == "invalid_api_key"

    missing = httpx.get(f"{gateway.v1}/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"

    expiring = live_key(org, expires_at=timezone.now() + timedelta(seconds=1))
    wait_until(
        lambda: (
            httpx.get(
                f"{gateway.v1}/models", headers={"authorization": f"Bearer {expiring}"}
            ).status_code
            == 401
        ),
        what="the key to expire",
    )
    with pytest.raises(openai.AuthenticationError) as expired:
        client(gateway, expiring).models.list()
    assert expired.value.body["code"] == "api_key_expired"

    virtual_key_revoke(key=VirtualKey.objects.get(org=org, expires_at=None), actor=TEST_ACTOR)
    wait_until(
        lambda: httpx.get(f"{gateway.v1}/models", headers={"x-api-key": key}).status_code == 401,
        what="the revoked key to stop working",
    )


def test_model_not_allowed_is_403_and_unknown_model_is_404(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    make_route(model="chat-model")
    make_route(model="premium-model")
    sdk = client(gateway, live_key(org, allowed_models=["chat-model"]))

    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk.chat.completions.create(model="premium-model", messages=HELLO)
    assert denied.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.chat.completions.create(model="no-such-model", messages=HELLO)
    assert unknown.value.body["code"] == "model_not_found"

    events = wait_for_events(calls(org), 2)
    assert sorted(event.status_code for event in events) == [403, 404]
    assert all(event.outcome == UsageEvent.Outcome.CLIENT_ERROR for event in events)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": 5, "messages": []}', "model"),
        (b'{"model": "chat-model"}', "messages"),
        (b'{"model": "chat-model", "messages": [{"role": "wizard", "content": "x"}]}',
         "messages[0].role"),
        (b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], '
         b'"max_tokens": "ten"}', "max_tokens"),
        (b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], '
         b'"temperature": 7}', "temperature"),
        (b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], '
         b'"stream": "yes"}', "stream"),
        (b"\xff\xfe\x00garbage", None),
        (b'{"model": "chat-model", "messages": [{"role": "user", "content": "x"}], '
         b'"n": 123456789012345678901234567890}', "n"),
    ],
)  # fmt: skip
def test_malformed_requests_get_an_openai_shaped_400(
    gateway: GatewayServer, chat_setup, body: bytes, param: str | None
) -> None:
    _, _, key = chat_setup
    response = httpx.post(
        f"{gateway.v1}/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert error["param"] == param
    assert response.headers["x-request-id"]


def test_sdk_raises_bad_request_for_wrong_field_types(gateway: GatewayServer, chat_setup) -> None:
    _, _, key = chat_setup
    with pytest.raises(openai.BadRequestError):
        client(gateway, key).chat.completions.create(
            model="chat-model", messages=HELLO, max_tokens=-3
        )


def test_oversized_body_gets_413_before_it_is_read(gateway: GatewayServer, chat_setup) -> None:
    _, _, key = chat_setup
    huge = "x" * (TEST_MAX_REQUEST_BYTES + 1)
    response = httpx.post(
        f"{gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "chat-model", "messages": [{"role": "user", "content": huge}]},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unknown_endpoint_and_wrong_method_are_openai_shaped(gateway: GatewayServer) -> None:
    missing = httpx.post(f"{gateway.v1}/completions-of-the-future", json={})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"
    wrong_method = httpx.get(f"{gateway.v1}/chat/completions")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("directive", "status", "exception"),
    [
        ("fault=500", 502, openai.InternalServerError),
        ("fault=503", 502, openai.InternalServerError),
        ("fault=401", 502, openai.InternalServerError),
        ("fault=malformed", 502, openai.InternalServerError),
        ("fault=reset", 502, openai.InternalServerError),
        ("fault=hang", 504, openai.InternalServerError),
        ("fault=400", 400, openai.BadRequestError),
    ],
)
def test_upstream_failures_map_to_gateway_errors(
    gateway: GatewayServer,
    org,
    make_route: MakeRoute,
    live_key: IssueKey,
    directive: str,
    status: int,
    exception: type[openai.APIStatusError],
) -> None:
    make_route(
        model="flaky", upstream_model=f"flaky+{directive}", ttft_timeout_ms=500,
        total_timeout_ms=1_000,
    )  # fmt: skip
    with pytest.raises(exception) as raised:
        client(gateway, live_key(org)).chat.completions.create(model="flaky", messages=HELLO)
    assert raised.value.status_code == status
    assert "sk-upstream-secret-for-tests" not in raised.value.response.text
    assert "127.0.0.1" not in raised.value.response.text
    (event,) = wait_for_events(calls(org), 1)
    assert event.status_code == status
    expected = (
        UsageEvent.Outcome.CLIENT_ERROR if status == 400 else UsageEvent.Outcome.UPSTREAM_ERROR
    )
    assert event.outcome == expected


def test_upstream_rate_limit_passes_retry_after(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    route = make_route(model="busy", upstream_model="busy+fault=429+retry_after=7")
    # One attempt: a lone deployment would be retried after the 7 s it asks for.
    route.max_attempts = 1
    route.save(update_fields=["max_attempts"])
    with pytest.raises(openai.RateLimitError) as raised:
        client(gateway, live_key(org)).chat.completions.create(model="busy", messages=HELLO)
    assert raised.value.response.headers["retry-after"] == "7"


def test_unreachable_upstream_is_502(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    from tests.support.processes import free_port

    make_route(model="gone", base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(openai.InternalServerError) as raised:
        client(gateway, live_key(org)).chat.completions.create(model="gone", messages=HELLO)
    assert raised.value.status_code == 502
    assert raised.value.body["code"] == "upstream_unreachable"


def test_stream_cut_mid_way_ends_with_an_error_event_and_bills_what_was_produced(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    make_route(model="cut", upstream_model="cut+fault=reset+tokens=20")
    stream = client(gateway, live_key(org)).chat.completions.create(
        model="cut", messages=HELLO, stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            received.append(chunk)
    assert "lost" in str(raised.value.message)
    assert received, "the chunks produced before the cut reach the client"
    (event,) = wait_for_events(calls(org), 1)
    assert event.outcome == UsageEvent.Outcome.UPSTREAM_ERROR
    assert event.output_tokens == 10  # half of the 20 words arrived
    assert event.usage_estimated


def test_client_disconnect_mid_stream_is_still_metered(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    make_route(model="slow", upstream_model="slow+tokens=50+chunk_delay_ms=40")
    key = live_key(org)
    with httpx.stream(
        "POST",
        f"{gateway.v1}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "slow", "messages": HELLO, "stream": True},
        timeout=10,
    ) as response:
        lines = response.iter_lines()
        first_data = next(line for line in lines if line.startswith("data: "))
        assert first_data
    (event,) = wait_for_events(calls(org), 1)
    assert event.status_code == 499
    assert event.error_class == "client_disconnected"
    assert 0 <= event.output_tokens < 50


def test_a_client_that_hangs_up_on_done_got_a_successful_answer(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    """The SDKs close the connection as soon as `[DONE]` arrives; a provider may end its
    body a moment later. The client had the whole answer: a success, not a disconnect."""
    make_route(model="lingering", upstream_model="lingering+tokens=5+end_delay_ms=1000")
    stream = client(gateway, live_key(org)).chat.completions.create(
        model="lingering", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)  # the SDK closes the response on [DONE]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    (event,) = wait_for_events(calls(org), 1)
    assert (event.outcome, event.status_code) == (UsageEvent.Outcome.SUCCESS, 200)
    assert event.output_tokens == 5 and not event.usage_estimated


def test_one_orgs_key_cannot_use_another_orgs_provider(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    other_org = OrganizationFactory()
    # A route of `org` wired to a provider that belongs to `other_org` is unusable.
    make_route(model="borrowed", org=org, provider_org=other_org)
    with pytest.raises(openai.APIStatusError) as raised:
        client(gateway, live_key(org)).chat.completions.create(model="borrowed", messages=HELLO)
    assert raised.value.status_code == 503
    assert Deployment.objects.filter(provider__org=other_org).exists()


def test_team_of_another_org_cannot_be_attached_to_a_key(org) -> None:
    from django.core.exceptions import ValidationError

    from tenants.services import virtual_key_issue

    with pytest.raises(ValidationError):
        virtual_key_issue(org=org, team=TeamFactory(), name="x", actor=TEST_ACTOR)


def test_model_listing_is_metered_too(gateway: GatewayServer, chat_setup) -> None:
    org, _, key = chat_setup
    wait_for_usage_writes_to_settle()  # the polls made while waiting for the key
    before = UsageEvent.objects.filter(org=org, endpoint="models").count()
    client(gateway, key).models.list()
    wait_until(
        lambda: UsageEvent.objects.filter(org=org, endpoint="models").count() == before + 1,
        what="the models.list() usage event",
    )


def test_stream_failing_before_its_first_event_gets_a_real_status(
    gateway: GatewayServer, org, make_route: MakeRoute, live_key: IssueKey
) -> None:
    make_route(model="sleepy", upstream_model="sleepy+ttft_ms=3000", ttft_timeout_ms=300)
    with pytest.raises(openai.InternalServerError) as raised:
        client(gateway, live_key(org)).chat.completions.create(
            model="sleepy", messages=HELLO, stream=True
        )
    assert raised.value.status_code == 504
    assert raised.value.body["code"] == "upstream_timeout"
    (event,) = wait_for_events(calls(org), 1)
    assert (event.status_code, event.outcome) == (504, UsageEvent.Outcome.UPSTREAM_ERROR)
    assert event.is_stream
