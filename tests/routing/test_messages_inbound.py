"""The Anthropic SDK against Tollgate's /v1/messages, served by an OpenAI-format upstream."""

import anthropic
import httpx
import pytest

from billing.models import UsageEvent
from tests.conftest import IssueKey, MakeRoute
from tests.support.gateway import GatewayServer, wait_for_events

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello there, gateway"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
}


def sdk(gateway: GatewayServer, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=15)


@pytest.fixture
def setup(org, make_route: MakeRoute, live_key: IssueKey):
    make_route(model="claude-ish", upstream_model="gpt-4o-mini", price=("3.00", "15.00"))
    return org, live_key(org)


def events(org) -> list[UsageEvent]:
    return list(UsageEvent.objects.filter(org=org, endpoint="messages"))


def test_message_has_the_upstream_text_and_usage(gateway: GatewayServer, setup) -> None:
    org, key = setup
    message = sdk(gateway, key).messages.create(
        model="claude-ish", max_tokens=100, system="Be brief.", messages=HELLO
    )
    assert message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 16
    (event,) = wait_for_events(UsageEvent.objects.filter(org=org, endpoint="messages"), 1)
    assert (event.input_tokens, event.output_tokens) == (message.usage.input_tokens, 16)
    assert event.cost_nanos == message.usage.input_tokens * 3_000 + 16 * 15_000


def test_streamed_message_equals_the_complete_one(gateway: GatewayServer, setup) -> None:
    org, key = setup
    client = sdk(gateway, key)
    whole = client.messages.create(model="claude-ish", max_tokens=100, messages=HELLO)
    with client.messages.stream(model="claude-ish", max_tokens=100, messages=HELLO) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == whole.content[0].text == final.content[0].text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.stop_reason == "end_turn"
    recorded = wait_for_events(UsageEvent.objects.filter(org=org, endpoint="messages"), 2)
    streamed = next(event for event in recorded if event.is_stream)
    complete = next(event for event in recorded if not event.is_stream)
    assert (streamed.input_tokens, streamed.output_tokens, streamed.cost_nanos) == (
        complete.input_tokens, complete.output_tokens, complete.cost_nanos
    )  # fmt: skip


def test_max_tokens_caps_the_answer(gateway: GatewayServer, setup) -> None:
    _, key = setup
    message = sdk(gateway, key).messages.create(model="claude-ish", max_tokens=3, messages=HELLO)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


def test_errors_are_anthropic_shaped(gateway: GatewayServer, setup) -> None:
    _, key = setup
    client = sdk(gateway, key)
    with pytest.raises(anthropic.AuthenticationError) as wrong_key:
        sdk(gateway, "tgk_nope").messages.create(model="claude-ish", max_tokens=5, messages=HELLO)
    assert wrong_key.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=5, messages=HELLO)
    raw = httpx.post(
        f"{gateway.base_url}/v1/messages",
        headers={"x-api-key": key},
        json={"model": "claude-ish", "messages": HELLO},
    )
    assert raw.status_code == 400
    assert raw.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "'max_tokens' is required and must be a positive integer.",
        },
    }
    bad_json = httpx.post(
        f"{gateway.base_url}/v1/messages", headers={"x-api-key": key}, content=b"{oops"
    )
    assert bad_json.status_code == 400 and bad_json.json()["type"] == "error"


def test_tool_use_round_trip(gateway: GatewayServer, setup) -> None:
    _, key = setup
    client = sdk(gateway, key)
    first = client.messages.create(
        model="claude-ish", max_tokens=100, messages=HELLO, tools=[WEATHER_TOOL]
    )
    assert first.stop_reason == "tool_use"
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert call.name == "get_weather"
    assert call.input == {"query": "Hello there, gateway"}

    with client.messages.stream(
        model="claude-ish", max_tokens=100, messages=HELLO, tools=[WEATHER_TOOL]
    ) as stream:
        streamed = stream.get_final_message()
    (streamed_call,) = [block for block in streamed.content if block.type == "tool_use"]
    assert (streamed_call.id, streamed_call.input) == (call.id, call.input)

    answer = client.messages.create(
        model="claude-ish",
        max_tokens=100,
        tools=[WEATHER_TOOL],
        messages=[
            *HELLO,
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}
            ]},
        ],
    )  # fmt: skip
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].type == "text"
