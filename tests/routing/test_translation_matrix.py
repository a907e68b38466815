"""Every client format against every provider format, through a running Tollgate.

The mock answers each API family with the same deterministic words for the
same model and prompt, so the answer text must survive every translation.
"""

import json

import anthropic
import httpx
import openai
import pytest
from openai import OpenAI

from billing.models import UsageEvent
from routing.models import Provider
from tests.conftest import IssueKey, MakeRoute
from tests.support.gateway import GatewayServer, wait_for_events

pytestmark = pytest.mark.django_db(transaction=True)

UPSTREAMS = ["openai", "azure", "anthropic", "gemini"]
ANTHROPIC_SDK_UPSTREAMS = ["openai", "anthropic", "gemini"]
PROMPT = "Tell me about the weather"
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a place",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Weather for a place",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
}


@pytest.fixture
def upstream(org, make_route: MakeRoute, mock_url: str):
    """Route public model "m" to the mock speaking the given provider format."""
    root = mock_url.removesuffix("/v1")

    def build(kind: str, *, model: str = "m", upstream_model: str = "shared-model") -> None:
        settings = {
            "openai": {"kind": Provider.Kind.MOCK},
            "azure": {"kind": Provider.Kind.AZURE, "base_url": root, "api_version": "2024-10-21"},
            "anthropic": {"kind": Provider.Kind.ANTHROPIC, "base_url": root},
            "gemini": {"kind": Provider.Kind.GEMINI, "base_url": f"{root}/v1beta"},
        }[kind]
        make_route(model=model, upstream_model=upstream_model, **settings)

    return build


def openai_client(gateway: GatewayServer, key: str) -> OpenAI:
    return OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=15)


def anthropic_client(gateway: GatewayServer, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=15)


def ledger(org, endpoint: str) -> list[UsageEvent]:
    return wait_for_events(UsageEvent.objects.filter(org=org, endpoint=endpoint), 2)


@pytest.mark.parametrize("kind", UPSTREAMS)
def test_openai_sdk_text_is_the_same_streamed_or_not(
    gateway: GatewayServer, org, upstream, live_key: IssueKey, kind: str
) -> None:
    upstream(kind)
    client = openai_client(gateway, live_key(org))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="m", messages=messages)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content and text == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    streamed, complete = sorted(ledger(org, "chat.completions"), key=lambda e: not e.is_stream)
    assert (streamed.input_tokens, streamed.output_tokens, streamed.cost_nanos) == (
        complete.input_tokens, complete.output_tokens, complete.cost_nanos
    )  # fmt: skip
    assert complete.output_tokens == whole.usage.completion_tokens > 0
    assert complete.provider_kind == {"openai": "mock"}.get(kind, kind)


@pytest.mark.parametrize("kind", UPSTREAMS)
def test_openai_sdk_tool_calls_survive_translation(
    gateway: GatewayServer, org, upstream, live_key: IssueKey, kind: str
) -> None:
    upstream(kind)
    client = openai_client(gateway, live_key(org))
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="m", messages=messages, tools=[TOOL])
    (call,) = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"query": PROMPT}

    chunks = list(client.chat.completions.create(
        model="m", messages=messages, tools=[TOOL], stream=True
    ))  # fmt: skip
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"query": PROMPT}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    follow_up = client.chat.completions.create(
        model="m",
        tools=[TOOL],
        messages=[
            *messages,
            whole.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ],
    )
    assert follow_up.choices[0].finish_reason == "stop"
    assert follow_up.choices[0].message.content


@pytest.mark.parametrize("kind", ANTHROPIC_SDK_UPSTREAMS)
def test_anthropic_sdk_text_and_tools_through_any_provider(
    gateway: GatewayServer, org, upstream, live_key: IssueKey, kind: str
) -> None:
    upstream(kind)
    client = anthropic_client(gateway, live_key(org))
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.messages.create(model="m", max_tokens=200, system="Be brief.", messages=messages)
    with client.messages.stream(
        model="m", max_tokens=200, system="Be brief.", messages=messages
    ) as stream:
        final = stream.get_final_message()
    assert whole.content[0].text and final.content[0].text == whole.content[0].text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        whole.usage.input_tokens, whole.usage.output_tokens
    )  # fmt: skip

    tool_use = client.messages.create(
        model="m", max_tokens=200, messages=messages, tools=[ANTHROPIC_TOOL]
    )
    assert tool_use.stop_reason == "tool_use"
    (block,) = [b for b in tool_use.content if b.type == "tool_use"]
    assert (block.name, block.input) == ("get_weather", {"query": PROMPT})
    with client.messages.stream(
        model="m", max_tokens=200, messages=messages, tools=[ANTHROPIC_TOOL]
    ) as stream:
        streamed = stream.get_final_message()
    (streamed_block,) = [b for b in streamed.content if b.type == "tool_use"]
    assert streamed_block.input == block.input and streamed.stop_reason == "tool_use"


@pytest.mark.parametrize("kind", UPSTREAMS)
def test_upstream_cut_mid_stream_ends_with_an_error_event_and_is_billed(
    gateway: GatewayServer, org, upstream, live_key: IssueKey, kind: str
) -> None:
    upstream(kind, upstream_model="shared-model+fault=reset+tokens=20")
    stream = openai_client(gateway, live_key(org)).chat.completions.create(
        model="m", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert any(c.choices and c.choices[0].delta.content for c in received)
    (event,) = wait_for_events(UsageEvent.objects.filter(org=org, endpoint="chat.completions"), 1)
    assert event.outcome == UsageEvent.Outcome.UPSTREAM_ERROR
    assert event.output_tokens > 0


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
def test_parameters_a_provider_cannot_honour_are_refused_or_dropped_per_route(
    gateway: GatewayServer, org, upstream, live_key: IssueKey, kind: str
) -> None:
    from routing.models import Route

    upstream(kind)
    key = live_key(org)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "logit_bias": {"50256": -100}}  # fmt: skip
    refused = httpx.post(
        f"{gateway.v1}/chat/completions", headers={"authorization": f"Bearer {key}"}, json=body
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "logit_bias"
    assert refused.json()["error"]["code"] == "unsupported_parameter"

    Route.objects.filter(model_name="m").update(unsupported_params="drop")
    from tenants.config import config_revision_bump

    config_revision_bump()  # .update() skips signals

    def dropped() -> bool:
        return (
            httpx.post(
                f"{gateway.v1}/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json=body,
            ).status_code
            == 200
        )

    from tests.support.gateway import wait_until

    wait_until(dropped, what="the route to drop the parameter")
