"""Hostile input on /v1: whatever a client sends, the gateway answers it, in shape, and lives on.

Property-based (hypothesis, fixed seed) against a real gateway process and the mock
provider: mutated and arbitrary request bodies, hostile headers, and framing that
httpx refuses to send (raw sockets). Every answer is a success, an OpenAI-shaped
(Anthropic-shaped on /v1/messages) 4xx with a clear message, or one of the documented
upstream 5xx; never a crash (500), never a hang, and the process stays small.
"""

import base64
import contextlib
import copy
import json
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from billing.models import UsageEvent
from routing.cache import cache_key
from routing.errors import GatewayError
from routing.models import Provider
from routing.providers.anthropic_format import messages_body
from routing.providers.gemini_format import generate_content_body
from routing.proxy.steps import (
    MAX_JSON_DEPTH,
    MAX_MODEL_NAME,
    parse_chat_request,
    parse_embeddings_request,
    parse_messages_request,
)
from routing.tokens import (
    estimate_input_tokens,
    estimate_prompt_tokens,
    input_tokens_ceiling,
    prompt_tokens_ceiling,
)
from tenants.keys import key_prefix
from tenants.models import VirtualKey
from tenants.services import virtual_key_revoke
from tests.conftest import TEST_ACTOR, IssueKey, MakeRoute
from tests.support.gateway import (
    TEST_MAX_REQUEST_BYTES,
    GatewayServer,
    wait_for_events,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

# --- What a well-formed answer is ----------------------------------------------------

# The only 5xx the gateway may answer, each with its documented codes (routing/errors.py).
UPSTREAM_5XX_CODES = {
    502: {
        "upstream_error", "upstream_unreachable", "upstream_malformed_response",
        "upstream_response_too_large", "upstream_address_forbidden",
    },
    503: {"no_deployment_available", "limits_unavailable"},
    504: {"upstream_timeout"},
}  # fmt: skip
ANTHROPIC_ERROR_TYPES = {
    "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
    "request_too_large", "rate_limit_error", "timeout_error", "api_error", "overloaded_error",
}  # fmt: skip
# What the proxy answers when an endpoint raised something it did not expect (app.py).
CRASH_MESSAGE = "The gateway failed to handle the request."
CLIENT_TIMEOUT_S = 15.0  # a hang fails the test instead of blocking it


def assert_well_formed(response: httpx.Response, *, anthropic: bool = False) -> None:
    """A success, or an error in the endpoint's format with a clear message and the right
    status: 4xx, or 502/503/504 with an upstream code; never a crash."""
    status = response.status_code
    shown = (
        f"{response.request.method} {response.request.url.path} -> {status}: "
        + (response.text[:400])
    )
    assert status < 500 or status in UPSTREAM_5XX_CODES, shown
    if status < 400:
        return
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {shown}") from None
    if anthropic:
        assert body.get("type") == "error", shown
        error = body["error"]
        assert error["type"] in ANTHROPIC_ERROR_TYPES, shown
    else:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, shown
        assert isinstance(error["type"], str) and error["type"], shown
        if status >= 500:
            assert error["code"] in UPSTREAM_5XX_CODES[status], shown
    assert isinstance(error["message"], str) and error["message"].strip(), shown
    assert error["message"] != CRASH_MESSAGE, shown
    assert response.headers.get("content-type", "").startswith("application/json"), shown


# --- Strategies: JSON of every shape, written the way hostile clients write it -------------


class Raw(str):
    """JSON text written as is: numbers no Python value encodes to (1e400, NaN, 5000 digits)."""


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object written from (key, value) pairs: duplicate keys included."""


def encode(value: object) -> str:
    """`value` as JSON text; strings are escaped to ASCII, so lone surrogates become \\ud800."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(item) for item in value) + "]"
    return json.dumps(value)


def nested(depth: int, kind: str = "object") -> Raw:
    """A value nested `depth` levels deep, as text (no Python recursion to build it)."""
    if kind == "array":
        return Raw("[" * depth + "1" + "]" * depth)
    return Raw('{"a":' * depth + '"x"' + "}" * depth)


HOSTILE_NUMBERS = [
    "1e400", "-1e400", "1e-400", "-0", "0.0", "1e5000", "-9e400",
    "18446744073709551615", "18446744073709551616", "-9223372036854775809", "9007199254740993",
    "NaN", "Infinity", "-Infinity", "1.0e+309", "2.5", "1E2", "0x10", "01", "+1", ".5",
]  # fmt: skip
HOSTILE_STRINGS = [
    "", " ", "\x00", "\ud800", "a\udfffb", "\udc00\ud800", "\u202e\u2066", "😀" * 50,
    "\r\n\r\nx-injected: 1", "null", "{}", "[]", "user", "assistant", "text", "image_url",
    "function", "data:image/png;base64,", "data:;base64,AAAA", "data:image/png;base64,%%%",
    "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd",
]  # fmt: skip
# Built when drawn, so hypothesis' reports do not print them.
ENORMOUS_STRINGS = [("x", 100_000), ("é", 20_000), ("\U0010ffff", 1_000), ("\ud800", 1_000)]
FIELD_NAMES = [
    "model", "messages", "role", "content", "type", "text", "image_url", "url", "tools",
    "function", "name", "parameters", "arguments", "max_tokens", "stream", "input", "source",
    "tool_calls", "id", "input_schema", "tool_use_id", "data", "media_type", "system",
]  # fmt: skip

hostile_numbers = st.one_of(
    st.sampled_from(HOSTILE_NUMBERS).map(Raw),
    st.sampled_from([("1", 5000), ("-9", 400)]).map(lambda spec: Raw(spec[0] + "0" * spec[1])),
)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_numbers,
)
strings = st.one_of(
    st.text(max_size=40),
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(ENORMOUS_STRINGS).map(lambda spec: spec[0] * spec[1]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)), children,
                        max_size=4),
    ),
    max_leaves=12,
)  # fmt: skip
deep_values = st.builds(
    nested, st.sampled_from([64, 254, 255, 256, 300, 600, 1000, 1023, 1024, 5000, 100_000]),
    st.sampled_from(["object", "array"]),
)  # fmt: skip
any_value = st.one_of(json_values, deep_values)

text_parts = st.fixed_dictionaries({"type": st.just("text"), "text": strings})
content_parts = st.one_of(
    text_parts,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "input_audio", "file", "refusal",
                                  "image", "tool_use", "tool_result", "thinking", "bogus"])},
        optional={
            "text": any_value, "refusal": any_value, "input_audio": any_value,
            "file": any_value, "source": any_value, "input": any_value, "content": any_value,
            "image_url": st.one_of(
                any_value, st.fixed_dictionaries({"url": strings}, optional={"detail": strings})
            ),
        },
    ),
    any_value,
)  # fmt: skip
tool_calls = st.fixed_dictionaries(
    {"id": st.one_of(strings, any_value), "type": st.just("function"),
     "function": st.fixed_dictionaries(
         {"name": st.one_of(strings, any_value),
          "arguments": st.one_of(
              st.sampled_from(["{}", '{"q": 1}', "not json", "[1]", "", " ", "null", "1e400",
                               "[" * 2000]), any_value)})},
)  # fmt: skip
chat_roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])
chat_messages = st.fixed_dictionaries(
    {"role": st.one_of(chat_roles, chat_roles, chat_roles, any_value)},
    optional={
        "content": st.one_of(strings, st.lists(content_parts, max_size=4), any_value),
        "tool_calls": st.one_of(st.lists(tool_calls, max_size=3), any_value),
        "tool_call_id": st.one_of(strings, any_value), "name": st.one_of(strings, any_value),
    },
)  # fmt: skip
schemas = st.one_of(
    any_value,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["object", "string", "array", "bogus"])},
        optional={"properties": any_value, "required": any_value, "$ref": strings,
                  "additionalProperties": any_value, "items": any_value},
    ),
)  # fmt: skip
openai_tools = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "bogus", "web_search"]),
     "function": st.fixed_dictionaries(
         {"name": st.one_of(strings, any_value)},
         optional={"parameters": schemas, "description": st.one_of(strings, any_value),
                   "strict": any_value})},
)  # fmt: skip
anthropic_tools = st.fixed_dictionaries(
    {"name": st.one_of(strings, any_value)},
    optional={"input_schema": schemas, "description": st.one_of(strings, any_value),
              "type": strings},
)  # fmt: skip
anthropic_blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking",
                              "redacted_thinking", "document", "bogus"])},
    optional={
        "text": any_value, "id": any_value, "name": any_value, "input": any_value,
        "tool_use_id": any_value, "content": st.one_of(strings, st.lists(any_value), any_value),
        "source": st.one_of(any_value, st.fixed_dictionaries(
            {"type": st.sampled_from(["base64", "url", "file"])},
            optional={"media_type": strings, "data": strings, "url": strings})),
    },
)  # fmt: skip
anthropic_roles = st.sampled_from(["user", "assistant"])
anthropic_turns = st.fixed_dictionaries(
    {"role": st.one_of(anthropic_roles, anthropic_roles, anthropic_roles, any_value)},
    optional={"content": st.one_of(strings, st.lists(anthropic_blocks, max_size=4), any_value)},
)  # fmt: skip

# Field values to try for each field: its plausible wrong shapes, then anything at all.
CHAT_FIELDS: dict[str, Any] = {
    "model": st.one_of(strings, st.sampled_from(["chat-model", "claude-model", "gemini-model",
                                                 "forbidden-model", "embed-model"])),
    "messages": st.one_of(st.lists(chat_messages, max_size=4), any_value),
    "max_tokens": numbers, "max_completion_tokens": numbers, "n": numbers, "seed": numbers,
    "temperature": numbers, "top_p": numbers, "presence_penalty": numbers,
    "frequency_penalty": numbers, "logit_bias": any_value, "logprobs": any_value,
    "top_logprobs": numbers,
    "stream": st.one_of(st.booleans(), any_value),
    "stream_options": st.one_of(
        st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), any_value)}), any_value),
    "stop": st.one_of(strings, st.lists(strings, max_size=5), any_value),
    "tools": st.one_of(st.lists(openai_tools, max_size=3), any_value),
    "tool_choice": st.one_of(
        st.sampled_from(["auto", "none", "required", "bogus"]),
        st.fixed_dictionaries({"type": st.just("function"),
                               "function": st.fixed_dictionaries({"name": any_value})}),
        any_value),
    "parallel_tool_calls": any_value,
    "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["json_object", "json_schema", "text",
                                                        "bogus"])},
                              optional={"json_schema": schemas}),
        any_value),
    "user": st.one_of(strings, any_value), "metadata": any_value, "store": any_value,
    "reasoning_effort": any_value, "modalities": any_value, "prediction": any_value,
}  # fmt: skip
MESSAGES_FIELDS: dict[str, Any] = {
    "model": CHAT_FIELDS["model"],
    "max_tokens": numbers,
    "messages": st.one_of(st.lists(anthropic_turns, max_size=4), any_value),
    "system": st.one_of(strings, st.lists(anthropic_blocks, max_size=2), any_value),
    "temperature": numbers, "top_p": numbers, "top_k": numbers,
    "stop_sequences": st.one_of(st.lists(strings, max_size=3), any_value),
    "tools": st.one_of(st.lists(anthropic_tools, max_size=3), any_value),
    "tool_choice": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none", "x"])},
                              optional={"name": any_value,
                                        "disable_parallel_tool_use": any_value}),
        any_value),
    "metadata": st.one_of(st.fixed_dictionaries({"user_id": st.one_of(strings, any_value)}),
                          any_value),
    "stream": st.one_of(st.booleans(), any_value),
    "thinking": any_value, "service_tier": any_value,
}  # fmt: skip
EMBEDDINGS_FIELDS: dict[str, Any] = {
    "model": st.one_of(strings, st.sampled_from(["embed-model", "gemini-embed", "chat-model",
                                                 "claude-model"])),
    "input": st.one_of(
        strings, st.lists(strings, max_size=4), st.lists(numbers, max_size=4),
        st.lists(st.lists(numbers, max_size=3), max_size=3), any_value),
    "dimensions": numbers,
    "encoding_format": st.one_of(st.sampled_from(["float", "base64", "bogus"]), any_value),
    "user": st.one_of(strings, any_value),
}  # fmt: skip

VALID_CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 8}  # fmt: skip
VALID_MESSAGES = {"model": "chat-model", "max_tokens": 8,
                  "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
VALID_EMBEDDINGS = {"model": "embed-model", "input": "Hi"}
INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf",
                b"\x80", b"\xf4\x90\x80\x80"]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any], fields: dict[str, Any]) -> bytes:
    """A valid request with a few fields replaced, removed or duplicated, then perhaps
    damaged as bytes (truncated, invalid UTF-8, a byte-order mark)."""
    body: dict[str, Any] = copy.deepcopy(valid)
    body["model"] = draw(st.sampled_from(["chat-model", "claude-model", "gemini-model"]))
    if valid is VALID_EMBEDDINGS:
        body["model"] = draw(st.sampled_from(["embed-model", "gemini-embed"]))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        name = draw(st.sampled_from(sorted(fields)))
        if draw(st.integers(0, 9)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(fields[name])
    value: object = body
    if draw(st.integers(0, 9)) == 0:  # a key twice: the last one counts
        name = draw(st.sampled_from(sorted(fields)))
        value = Pairs([*body.items(), (name, draw(fields[name]))])
    raw = encode(value).encode()
    damage = draw(st.integers(0, 14))
    if damage == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == 1:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(INVALID_UTF8)) + raw[at:]
    elif damage == 2:
        raw = b"\xef\xbb\xbf" + raw
    elif damage == 3:
        raw = b" \t\r\n" + raw + b"\n\n"
    return raw


@st.composite
def shaped(draw: st.DrawFn, valid: dict[str, Any], structure: dict[str, Any]) -> bytes:
    """A request of the right shape at the top, hostile inside: messages, content parts,
    tools and schemas of any kind (most get past parsing, to the translations)."""
    body: dict[str, Any] = copy.deepcopy(valid)
    body["model"] = draw(st.sampled_from(["chat-model", "claude-model", "gemini-model"]))
    for name, strategy in structure.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    return encode(body).encode()


SHAPED_CHAT = {
    "messages": st.lists(chat_messages, min_size=1, max_size=4),
    "tools": st.lists(openai_tools, max_size=3),
    "tool_choice": CHAT_FIELDS["tool_choice"],
    "response_format": CHAT_FIELDS["response_format"],
    "stream": st.booleans(),
    "stop": st.one_of(strings, st.lists(strings, max_size=3)),
    "n": st.integers(1, 3),
    "parallel_tool_calls": st.booleans(),
}
SHAPED_MESSAGES = {
    "messages": st.lists(anthropic_turns, min_size=1, max_size=4),
    "system": MESSAGES_FIELDS["system"],
    "tools": st.lists(anthropic_tools, max_size=3),
    "tool_choice": MESSAGES_FIELDS["tool_choice"],
    "stream": st.booleans(),
    "stop_sequences": st.lists(strings, max_size=3),
}
chat_bodies = st.one_of(mutated(VALID_CHAT, CHAT_FIELDS), shaped(VALID_CHAT, SHAPED_CHAT))
messages_bodies = st.one_of(
    mutated(VALID_MESSAGES, MESSAGES_FIELDS), shaped(VALID_MESSAGES, SHAPED_MESSAGES)
)
embeddings_bodies = mutated(VALID_EMBEDDINGS, EMBEDDINGS_FIELDS)

any_json_text = st.one_of(
    json_values.map(lambda value: encode(value).encode()),
    deep_values.map(lambda value: str(value).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"}", b"null", b"[]", b"{}", b'{"model": null}', b"\x00" * 10,
                     b'{"model":"chat-model"}' * 3, b'"' + b"\\" * 1001 + b'"']),
)  # fmt: skip

# --- In process: the pure pipeline steps, fast enough for many examples ------------------


def _translate_everywhere(payload: dict[str, Any], model: str, stream: bool) -> None:
    """What the endpoints do with a parsed chat payload before the upstream call: estimate,
    bound, cache-key, translate for each provider format and serialise the body sent."""
    estimate_prompt_tokens(payload)
    prompt_tokens_ceiling(payload)
    cache_key(org_id=1, model=model, payload=payload)
    orjson.dumps({**payload, "model": "upstream"})
    for translate in (
        lambda: messages_body(payload, model="upstream", stream=stream),
        lambda: generate_content_body(payload),
    ):
        try:
            body = translate()
        except GatewayError as exc:
            assert exc.status == 400, exc
            event("translation refused")
            continue
        event("translated")
        orjson.dumps(body)


# Fixed seed and bounded examples in the suite; for a longer hunt, locally:
# TOLLGATE_FUZZ_SCALE=20 TOLLGATE_FUZZ_RANDOM=1 pytest tests/routing/test_hostile_input.py
SCALE = float(os.environ.get("TOLLGATE_FUZZ_SCALE", "1"))
RANDOM = bool(os.environ.get("TOLLGATE_FUZZ_RANDOM"))
FAST = settings(
    derandomize=not RANDOM, max_examples=int(400 * SCALE), deadline=2000, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)  # fmt: skip


@pytest.mark.django_db(transaction=False)
@pytest.mark.parametrize(
    ("parse", "bodies"),
    [(parse_chat_request, chat_bodies), (parse_messages_request, messages_bodies)],
    ids=["chat", "messages"],
)
@FAST
@given(data=st.data())
def test_parsing_and_translation_only_ever_refuse_with_400(
    parse: Callable[[bytes], Any], bodies: st.SearchStrategy[bytes], data: st.DataObject
) -> None:
    body = data.draw(st.one_of(bodies, any_json_text), label="body")
    try:
        chat = parse(body)
    except GatewayError as exc:
        assert exc.status == 400 and exc.message, exc
        event("refused")
        return
    event("parsed")
    _translate_everywhere(chat.payload, chat.model, chat.stream)


@pytest.mark.django_db(transaction=False)
@FAST
@given(body=st.one_of(embeddings_bodies, any_json_text))
def test_embeddings_parsing_only_ever_refuses_with_400(body: bytes) -> None:
    try:
        request = parse_embeddings_request(body)
    except GatewayError as exc:
        assert exc.status == 400 and exc.message, exc
        return
    estimate_input_tokens(request.payload["input"])
    input_tokens_ceiling(request.payload["input"])
    orjson.dumps({**request.payload, "model": "upstream"})


# --- Against a running gateway -------------------------------------------------------------

ROUTED_MODELS = ["chat-model", "claude-model", "gemini-model", "embed-model", "gemini-embed"]


@dataclass(frozen=True)
class Target:
    gateway: GatewayServer
    key: str  # may call every model
    limited_key: str  # a hard budget, rate limits, and every model but forbidden-model

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {key or self.key}"}


@pytest.fixture
def target(gateway: GatewayServer, org, make_route: MakeRoute, mock_url: str,
           live_key: IssueKey) -> Target:  # fmt: skip
    """Routes to the mock in each provider format, a key for all of them, a limited key."""
    root = mock_url.removesuffix("/v1")
    make_route(model="chat-model")
    make_route(model="forbidden-model")
    make_route(model="embed-model")
    make_route(model="claude-model", kind=Provider.Kind.ANTHROPIC, base_url=root)
    make_route(model="gemini-model", kind=Provider.Kind.GEMINI, base_url=f"{root}/v1beta")
    make_route(model="gemini-embed", kind=Provider.Kind.GEMINI, base_url=f"{root}/v1beta")
    return Target(
        gateway=gateway,
        key=live_key(org),
        limited_key=live_key(
            org, name="limited", allowed_models=ROUTED_MODELS, rpm_limit=1_000_000,
            tpm_limit=2_000_000_000, monthly_budget_nanos=10**15,
        ),
    )  # fmt: skip


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        yield client


def assert_serves_normally(target: Target, http: httpx.Client) -> None:
    """The gateway still answers an ordinary request, on each inbound format."""
    chat = http.post(f"{target.gateway.v1}/chat/completions", json=VALID_CHAT,
                     headers=target.auth())  # fmt: skip
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    message = http.post(f"{target.gateway.v1}/messages", json=VALID_MESSAGES,
                        headers=target.auth())  # fmt: skip
    assert message.status_code == 200, message.text
    assert message.json()["content"][0]["text"]


def _gateway_pid(gateway: GatewayServer) -> int:
    """The uvicorn process serving `gateway` (found by its --port argument)."""
    port = str(urlsplit(gateway.base_url).port)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if (
                b"uvicorn" in b" ".join(args)
                and b"--port" in args
                and args[args.index(b"--port") + 1].decode() == port
            ):
                return int(entry.name)
    raise AssertionError(f"no uvicorn process listening on port {port}")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


HTTP_FUZZ = settings(
    derandomize=not RANDOM, max_examples=int(120 * SCALE), deadline=CLIENT_TIMEOUT_S * 1000,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)  # fmt: skip
keys = st.sampled_from(["key", "limited_key"])


@HTTP_FUZZ
@given(body=st.one_of(chat_bodies, any_json_text), which_key=keys)
def test_chat_completions_answer_hostile_bodies_in_shape(
    target: Target, http: httpx.Client, body: bytes, which_key: str
) -> None:
    response = http.post(f"{target.gateway.v1}/chat/completions", content=body,
                         headers=target.auth(getattr(target, which_key)))  # fmt: skip
    assert_well_formed(response)


@HTTP_FUZZ
@given(body=st.one_of(messages_bodies, any_json_text), which_key=keys)
def test_messages_answer_hostile_bodies_in_anthropic_shape(
    target: Target, http: httpx.Client, body: bytes, which_key: str
) -> None:
    response = http.post(
        f"{target.gateway.v1}/messages", content=body,
        headers={"x-api-key": getattr(target, which_key), "anthropic-version": "2023-06-01"},
    )  # fmt: skip
    assert_well_formed(response, anthropic=True)


@settings(HTTP_FUZZ, max_examples=int(60 * SCALE))
@given(body=st.one_of(embeddings_bodies, any_json_text), which_key=keys)
def test_embeddings_answer_hostile_bodies_in_shape(
    target: Target, http: httpx.Client, body: bytes, which_key: str
) -> None:
    response = http.post(f"{target.gateway.v1}/embeddings", content=body,
                         headers=target.auth(getattr(target, which_key)))  # fmt: skip
    assert_well_formed(response)


PATHS = ["/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/models",
         "/v1/models/chat-model", "/v1/key/info", "/v1/completions", "/v1/chat/completions/",
         "/v1/models/%00", "/v1/models/" + "x" * 2000, "/v1//chat/completions",
         "/v1/chat/completions/../embeddings", "/v1/%2e%2e/admin/"]  # fmt: skip
HEADER_NAMES = [
    "authorization", "x-api-key", "anthropic-version", "anthropic-beta", "content-type",
    "x-tollgate-tags", "x-tollgate-user", "x-tollgate-cache", "x-request-id", "traceparent",
    "tracestate", "x-forwarded-for", "x-real-ip", "openai-organization", "x-mock-fault",
    "x-mock-latency-ms", "accept", "accept-encoding", "expect", "connection", "host",
]  # fmt: skip
# What h11 lets a client send in a header value: visible ASCII, spaces and tabs inside,
# and bytes 0x80-0xFF (not Latin-1 text once decoded as UTF-8).
header_bytes = st.binary(max_size=64).map(
    lambda raw: bytes(b for b in raw if b == 0x09 or 0x20 <= b != 0x7F).strip(b" \t")
)


@st.composite
def hostile_headers(draw: st.DrawFn, key: str) -> list[tuple[bytes, bytes]]:
    """Credentials in every spelling, then any of the headers the gateway reads, many
    headers, long ones, and bytes outside ASCII."""
    credentials = draw(st.sampled_from([
        f"Bearer {key}", f"bearer   {key}  ", f"BEARER {key}", f"Bearer {key}x", "Bearer",
        "Bearer ", f"Basic {base64.b64encode(f'{key}:'.encode()).decode()}", key,
        f"Bearer {key[:-1]}", f"Bearer {key} {key}", f"Token {key}", "Bearer \x80\xff",
        "Bearer " + "k" * 6000, "",
    ]))  # fmt: skip
    headers: list[tuple[bytes, bytes]] = []
    # (h11 sends no value with spaces around it; servers strip them anyway.)
    if draw(st.booleans()):
        headers.append((b"authorization", credentials.strip().encode("latin-1")))
    else:
        api_key = credentials.removeprefix("Bearer ").strip()
        headers.append((b"x-api-key", api_key.encode("latin-1")))
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.one_of(st.sampled_from(HEADER_NAMES),
                              st.from_regex(rb"\Ax-[a-z0-9-]{1,20}\Z")))  # fmt: skip
        name = name.encode() if isinstance(name, str) else name
        value = draw(st.one_of(
            header_bytes,
            st.sampled_from([b"application/json", b"text/plain", b"multipart/form-data; b=x",
                             b"application/x-www-form-urlencoded", b"application/json; charset=x",
                             b"bypass", b"a,b,c", b",,,", b"\xc3\xa9t\xc3\xa9", b"\xff\xfe",
                             b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01", b"2023-06-01",
                             b"1", b"500", b"100-continue", b"x" * 7000]),
        ))  # fmt: skip
        if name in (b"host", b"connection", b"content-length", b"transfer-encoding"):
            continue  # framing: the raw-socket tests below send those
        headers.append((name, value))
    if draw(st.integers(0, 9)) == 0:  # many headers
        headers.extend((f"x-filler-{index}".encode(), b"v" * 50) for index in range(150))
    return headers


@HTTP_FUZZ
@given(data=st.data(), path=st.sampled_from(PATHS), which_key=keys)
def test_every_endpoint_answers_hostile_headers_in_shape(
    target: Target, http: httpx.Client, data: st.DataObject, path: str, which_key: str
) -> None:
    headers = data.draw(hostile_headers(getattr(target, which_key)))
    body = VALID_MESSAGES if path.startswith("/v1/messages") else VALID_CHAT
    method = "GET" if "/models" in path or "/key/" in path else "POST"
    response = http.request(
        method, target.gateway.base_url + path, headers=headers,
        content=encode(body).encode() if method == "POST" else None,
    )  # fmt: skip
    if response.status_code in (400, 431) and not response.headers.get(
        "content-type", ""
    ).startswith("application/json"):
        # Refused by the HTTP server before the gateway saw it (headers too large).
        assert (
            response.status_code == 431
            or len(headers) > 100
            or any(len(value) > 4000 for _, value in headers)
        ), response.text
        return
    assert_well_formed(response, anthropic=path.startswith("/v1/messages"))
    # Client headers never reach the provider: the mock's fault header is not obeyed.
    assert response.status_code != 502, response.text
    # The request id is the gateway's own, never the client's.
    request_id = response.headers.get("x-request-id")
    if request_id is not None:
        assert len(request_id) == 32 and request_id.isalnum(), request_id


# --- Raw sockets: what httpx will not send ---------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _connect(gateway: GatewayServer) -> socket.socket:
    address = urlsplit(gateway.base_url)
    sock = socket.create_connection((address.hostname, address.port), timeout=CLIENT_TIMEOUT_S)
    return sock


def _read_response(sock: socket.socket) -> RawResponse | None:
    """One HTTP/1.1 response from `sock`; None if the server closed without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None if not data else _parse(data, complete=True)
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = _parse(head + b"\r\n\r\n", complete=False).headers.get(b"content-length")
    while length is not None and len(body) < int(length):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return _parse(head + b"\r\n\r\n" + body, complete=True)


def _parse(data: bytes, *, complete: bool) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(status=int(status_line.split()[1]), headers=headers, body=body)


def raw_exchange(gateway: GatewayServer, request: bytes) -> RawResponse | None:
    """Send `request` as is and read the answer (None: the server closed the connection)."""
    with _connect(gateway) as sock:
        sock.sendall(request)
        return _read_response(sock)


def http_request(target: Target, path: str, body: bytes, *extra: bytes,
                 length: int | None = None) -> bytes:  # fmt: skip
    """A POST as bytes, with a Content-Length (the body's own unless `length` says)."""
    lines = [
        f"POST {path} HTTP/1.1".encode(), b"host: 127.0.0.1",
        f"authorization: Bearer {target.key}".encode(), b"content-type: application/json",
        f"content-length: {len(body) if length is None else length}".encode(), *extra,
    ]  # fmt: skip
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def assert_raw_error(response: RawResponse | None, status: int, *, anthropic: bool = False,
                     code: str | None = None) -> dict[str, Any]:  # fmt: skip
    assert response is not None, "the gateway closed the connection without an answer"
    assert response.status == status, (response.status, response.body[:300])
    body = response.json()
    error = body["error"]
    assert error["message"]
    if anthropic:
        assert body["type"] == "error"
    else:
        assert set(error) == {"message", "type", "param", "code"}
        if code is not None:
            assert error["code"] == code, error
    return error


def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    target: Target, http: httpx.Client
) -> None:
    # A gigabyte announced, ten bytes sent: the 413 comes without waiting for the rest.
    for path, anthropic in (("/v1/chat/completions", False), ("/v1/messages", True)):
        started = time.monotonic()
        request = http_request(target, path, b'{"model":', length=10**9)
        response = raw_exchange(target.gateway, request)
        assert_raw_error(response, 413, anthropic=anthropic)
        assert time.monotonic() - started < 5
    assert_serves_normally(target, http)


def test_request_without_a_valid_key_is_refused_before_its_body_is_read(
    target: Target, http: httpx.Client, org, live_key: IssueKey
) -> None:
    # Headers announcing a body within the limit, and no body: a caller with a valid key
    # would be waited for, a stranger gets the 401 at once, so it cannot make the gateway
    # buffer the limit's worth of body per connection.
    revoked = live_key(org, name="revoked")
    virtual_key_revoke(key=VirtualKey.objects.get(prefix=key_prefix(revoked)), actor=TEST_ACTOR)
    wait_until(
        lambda: (
            http.get(f"{target.gateway.v1}/models", headers=target.auth(revoked)).status_code == 401
        ),
        what="the revoked key to stop working",
    )
    wrong = target.key[:-1] + ("A" if target.key[-1] != "A" else "B")
    cases = [
        ("/v1/chat/completions", f"authorization: Bearer {wrong}", "invalid_api_key"),
        ("/v1/chat/completions", "x-tollgate-user: no key at all", "missing_api_key"),
        ("/v1/chat/completions", f"authorization: Bearer {revoked}", "invalid_api_key"),
        ("/v1/messages", f"x-api-key: {wrong}", None),
    ]
    for path, auth, code in cases:
        head = b"\r\n".join([
            f"POST {path} HTTP/1.1".encode(), b"host: 127.0.0.1", auth.encode(),
            b"content-type: application/json",
            f"content-length: {TEST_MAX_REQUEST_BYTES}".encode(),
        ])  # fmt: skip
        with _connect(target.gateway) as sock:
            sock.settimeout(5.0)  # waiting for a body that never comes would time out
            sock.sendall(head + b"\r\n\r\n")
            response = _read_response(sock)
        error = assert_raw_error(response, 401, anthropic=code is None, code=code)
        assert response is not None and response.headers[b"x-request-id"], (path, auth)
        if code is None:
            assert error["type"] == "authentication_error"
    # A client that sends its body anyway (an SDK with a wrong key) keeps its connection:
    # the unread body is skipped and the next request on it is served.
    padded = {**VALID_CHAT, "metadata": {"pad": "x" * (TEST_MAX_REQUEST_BYTES // 2)}}
    with httpx.Client(timeout=CLIENT_TIMEOUT_S, limits=httpx.Limits(max_connections=1)) as one:
        chat_url = f"{target.gateway.v1}/chat/completions"
        refused = one.post(chat_url, json=padded, headers=target.auth(wrong))
        assert refused.status_code == 401, refused.text
        served = one.post(chat_url, json=VALID_CHAT, headers=target.auth())
        assert served.status_code == 200, served.text
    assert_serves_normally(target, http)


def test_chunked_body_over_the_limit_is_refused_while_it_is_still_being_sent(
    target: Target, http: httpx.Client
) -> None:
    chunk = b"x" * (16 * 1024)
    total = 16 * TEST_MAX_REQUEST_BYTES  # what the client would send if nobody stopped it
    with _connect(target.gateway) as sock:
        head = http_request(target, "/v1/chat/completions", b"").split(b"content-length")[0]
        sock.sendall(head + b"transfer-encoding: chunked\r\n\r\n")
        sent = 0
        answered = False
        while sent < total:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            readable, _, _ = select.select([sock], [], [], 0.005)
            if readable:
                answered = True
                break
        response = _read_response(sock)
    assert answered or sent < total, "the gateway read the whole oversized body"
    assert sent < 4 * TEST_MAX_REQUEST_BYTES, f"{sent} bytes sent before the 413"
    assert_raw_error(response, 413, code="request_too_large")
    assert_serves_normally(target, http)


def test_body_shorter_than_its_declared_length_is_not_a_crash(
    target: Target, http: httpx.Client
) -> None:
    # The client promises 100 bytes, sends 10 and stops sending: the gateway waits (like
    # any HTTP server; a front proxy's body timeout bounds slow clients), and when the
    # client gives up nothing is answered, logged as a crash, or left behind.
    with _connect(target.gateway) as sock:
        sock.sendall(http_request(target, "/v1/chat/completions", b'{"model":"', length=100))
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # still waiting for the rest
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(CLIENT_TIMEOUT_S)
        response = _read_response(sock)
    assert response is None or response.status < 500, response
    # Longer than declared: the body is what the length says, cut short (the gateway's 400),
    # and the rest a next request that is not HTTP (the server's plain 400, which may
    # overtake the first answer before it closes the connection).
    body = encode(VALID_CHAT).encode()
    response = raw_exchange(
        target.gateway, http_request(target, "/v1/chat/completions", body, length=len(body) - 5)
    )
    assert response is not None and response.status == 400, response
    if response.headers[b"content-type"].startswith(b"application/json"):
        assert response.json()["error"]["code"] == "invalid_json"
    assert_serves_normally(target, http)


MALFORMED_FRAMING = [
    b"content-length: -1\r\n", b"content-length: 1e3\r\n",
    b"content-length: 10\r\ncontent-length: 20\r\n",
    b"content-length: 10\r\ntransfer-encoding: chunked\r\n",  # request smuggling
    b"transfer-encoding: gzip, chunked\r\n",
    b"x-tollgate-user: a\rb\r\n", b"x-request-id: a\nx-injected: 1\r\n",
    b"x-tollgate-user: a\x00b\r\n", b"x-tollgate-user : a\r\n", b" x-folded: continued\r\n",
    b"x-long: " + b"v" * 70_000 + b"\r\n",
]  # fmt: skip


def test_malformed_framing_is_refused_without_harm(target: Target, http: httpx.Client) -> None:
    """Framing errors are the HTTP server's to refuse (a plain 400 from uvicorn, before
    the gateway sees the request); nothing injected comes back, and the gateway lives."""
    body = encode(VALID_CHAT).encode()
    for framing in MALFORMED_FRAMING:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            + f"authorization: Bearer {target.key}\r\n".encode()
            + framing
        )
        if b"content-length" not in framing and b"transfer-encoding" not in framing:
            head += f"content-length: {len(body)}\r\n".encode()
        response = raw_exchange(target.gateway, head + b"\r\n" + body)
        if response is not None:
            assert response.status < 500, (framing[:80], response)
            assert b"x-injected" not in response.headers, framing
            assert response.headers.get(b"x-request-id", b"a" * 32) != b"a", framing
    assert_serves_normally(target, http)


# --- Explicit cases and the policies they pin ------------------------------------------------


def _post_chat(
    target: Target,
    http: httpx.Client,
    body: bytes | str,
    *,
    key: str | None = None,
    content_type: str = "application/json",
) -> httpx.Response:
    return http.post(
        f"{target.gateway.v1}/chat/completions",
        content=body.encode() if isinstance(body, str) else body,
        headers={**target.auth(key), "content-type": content_type},
    )


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert_well_formed(response)
    return response.json()["error"]


def chat_with(**fields: str) -> str:
    """VALID_CHAT's JSON text with `fields` given as raw JSON text (last wins on repeats)."""
    text = encode(VALID_CHAT)[:-1]
    return text + "".join(f',"{name}":{value}' for name, value in fields.items()) + "}"


def test_deeply_nested_json_is_a_400(target: Target, http: httpx.Client) -> None:
    # As a whole body, and as a tool schema inside a valid request: either way the
    # gateway refuses before anything recursive (or orjson's writer, 254 levels) meets it.
    error = _error(_post_chat(target, http, "[" * 100_000), 400)
    assert error["code"] == "invalid_json" and "JSON" in error["message"]
    for depth in (129, 300, 1023):
        error = _error(_post_chat(target, http, "[" * depth + "]" * depth), 400)
        assert error["code"] == "invalid_json", depth
        tool = {"type": "function", "function": {"name": "f", "parameters": nested(depth)}}
        error = _error(_post_chat(target, http, chat_with(tools=encode([tool]))), 400)
        assert error["code"] == "invalid_json", depth
        assert "deep" in error["message"] or "depth" in error["message"], error
        tools = [{"name": "f", "input_schema": nested(depth)}]
        anthropic = http.post(f"{target.gateway.v1}/messages", headers=target.auth(),
                              content=encode({**VALID_MESSAGES, "tools": tools}))  # fmt: skip
        assert anthropic.status_code == 400, anthropic.text
        assert_well_formed(anthropic, anthropic=True)


@pytest.mark.django_db(transaction=False)
def test_nesting_is_limited_to_128_levels_exactly() -> None:
    for kind in ("object", "array"):
        inner = nested(MAX_JSON_DEPTH - 1, kind)
        accepted = parse_chat_request(chat_with(deep=inner).encode())
        assert accepted.payload["deep"]
        with pytest.raises(GatewayError) as refused:
            parse_chat_request(chat_with(deep=nested(MAX_JSON_DEPTH, kind)).encode())
        assert refused.value.status == 400 and refused.value.code == "invalid_json"


def test_nesting_real_tool_schemas_use_is_accepted(target: Target, http: httpx.Client) -> None:
    # The deepest body accepted (128 levels, 124 of them in the schema) still translates
    # and serialises for every provider format.
    deepest = nested(MAX_JSON_DEPTH - 4)
    tool = {"type": "function", "function": {"name": "f", "parameters": deepest}}
    for model in ("chat-model", "claude-model", "gemini-model"):
        body = {**VALID_CHAT, "model": model, "tools": [tool]}
        response = _post_chat(target, http, encode(body))
        assert response.status_code == 200, (model, response.text)


def test_huge_and_non_finite_numbers_are_a_400(target: Target, http: httpx.Client) -> None:
    for field, value in [
        ("max_tokens", "1e400"), ("max_tokens", "1" + "0" * 5000), ("max_tokens", "-1"),
        ("max_tokens", "1.5"), ("max_tokens", "18446744073709551616"), ("n", "NaN"),
        ("temperature", "1e400"), ("temperature", "-Infinity"), ("temperature", "2.0000001"),
        ("top_p", "9" * 400), ("seed", "1" + "0" * 5000),
    ]:  # fmt: skip
        error = _error(_post_chat(target, http, chat_with(**{field: value})), 400)
        assert error["code"] == "invalid_json" or error["param"] == field, (field, error)


def test_enormous_but_in_range_token_limits_cannot_crash_admission(
    target: Target, http: httpx.Client
) -> None:
    # 2**64-1 parses as an integer; with a hard budget it reserves an absurd cost (429),
    # without one the provider refuses it (400): neither is a crash.
    for key in (target.key, target.limited_key):
        for name in ("max_tokens", "max_completion_tokens"):
            response = _post_chat(target, http, chat_with(**{name: "18446744073709551615"}),
                                  key=key)  # fmt: skip
            assert response.status_code in (400, 429), response.text
            assert_well_formed(response)
    assert_serves_normally(target, http)


def test_invalid_utf8_and_lone_surrogates_are_a_400(target: Target, http: httpx.Client) -> None:
    for damage in [*(b'"%s"' % raw for raw in INVALID_UTF8), b'"\\ud800"', b'"\\udfff\\ud800"']:
        body = (b'{"model":"chat-model","messages":[{"role":"user","content":' + damage
                + b'}],"max_tokens":8}')  # fmt: skip
        error = _error(_post_chat(target, http, body), 400)
        assert error["code"] == "invalid_json", damage
        assert "UTF-8" in error["message"] or "surrogate" in error["message"], error


def test_duplicate_keys_last_one_wins_for_validation_and_routing(
    target: Target, http: httpx.Client
) -> None:
    # The policy (as OpenAI's API and most JSON parsers): the last occurrence of a key
    # counts. The gateway validates, routes and forwards that one parsed object, so an
    # earlier copy can neither pass validation for a later one nor pick the route.
    text = encode(VALID_CHAT)[:-1]
    forbidden_last = text + ',"model":"forbidden-model"}'
    error = _error(_post_chat(target, http, forbidden_last, key=target.limited_key), 403)
    assert "forbidden-model" in error["message"]
    allowed_last = '{"model":"forbidden-model",' + text[1:] + "}"
    served = _post_chat(target, http, allowed_last, key=target.limited_key)
    assert served.status_code == 200, served.text
    assert served.headers["x-tollgate-deployment"] == "chat-model-deployment"
    invalid_last = text + ',"max_tokens":-1}'
    assert _error(_post_chat(target, http, invalid_last), 400)["param"] == "max_tokens"
    valid_last = '{"max_tokens":-1,' + text[1:] + "}"
    assert _post_chat(target, http, valid_last).status_code == 200


def test_content_type_is_not_checked_only_the_body_is(target: Target, http: httpx.Client) -> None:
    # As OpenAI's API: a JSON body is read whatever its content type says (curl -d sends
    # application/x-www-form-urlencoded), and a body that is not JSON is a 400 saying so.
    body = encode(VALID_CHAT)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "", "image/png"):
        response = _post_chat(target, http, body, content_type=content_type)
        assert response.status_code == 200, (content_type, response.text)
    for content_type, form in (
        ("application/x-www-form-urlencoded", "model=chat-model&messages=hi"),
        ("multipart/form-data; boundary=b", '--b\r\ncontent-disposition: form-data; name="m"'
                                            "\r\n\r\nchat-model\r\n--b--\r\n"),
    ):  # fmt: skip
        error = _error(_post_chat(target, http, form, content_type=content_type), 400)
        assert error["code"] == "invalid_json" and "JSON" in error["message"]


def test_client_headers_are_not_forwarded_upstream_nor_echoed(
    target: Target, http: httpx.Client
) -> None:
    # The mock obeys x-mock-* headers: were client headers forwarded, this would be a 502.
    response = http.post(
        f"{target.gateway.v1}/chat/completions", json=VALID_CHAT,
        headers={**target.auth(), "x-mock-fault": "500", "x-request-id": "client-chosen",
                 "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] != "client-chosen"
    assert "client-chosen" not in response.text


def test_requests_the_provider_refuses_do_not_open_the_circuit_for_others(
    target: Target, http: httpx.Client
) -> None:
    # A max_tokens the gateway accepts and the mock refuses (over 2**31; a 400): the
    # client's fault, so however often it comes, the deployment stays available to all.
    for _ in range(3 * 3):  # three times the test gateway's breaker threshold
        response = _post_chat(target, http, chat_with(max_tokens=str(2**31 + 1)))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "upstream_rejected_request"
    assert_serves_normally(target, http)


def test_memory_stays_bounded_under_hostile_traffic(target: Target, http: httpx.Client) -> None:
    """Bodies near the size limit, refused ones over it, deep and wide JSON: the gateway
    keeps none of it (RSS of the uvicorn process, read from /proc)."""
    pid = _gateway_pid(target.gateway)
    near_limit = encode({**VALID_CHAT, "messages": [
        {"role": "user", "content": "x" * (TEST_MAX_REQUEST_BYTES - 200)}]})  # fmt: skip
    wide = "[" + ",".join(["{}"] * 40_000) + "]"
    batch = [
        near_limit, "x" * (TEST_MAX_REQUEST_BYTES + 1), "[" * 1000, chat_with(tools=wide),
        chat_with(stop=encode(["s"] * 20_000)), chat_with(max_tokens="1" + "0" * 5000),
    ]  # fmt: skip
    for item in batch:  # warm up: first-use allocations are not growth
        _post_chat(target, http, item)
    before = _rss_mib(pid)
    for _ in range(15):
        for item in batch:
            response = _post_chat(target, http, item)
            assert_well_formed(response)
    after = _rss_mib(pid)
    # ~36 MB of bodies went through; growth of a few MiB is allocator noise.
    assert after - before < 48, f"RSS grew from {before:.0f} MiB to {after:.0f} MiB"
    assert after < 1024, f"RSS is {after:.0f} MiB"
    assert_serves_normally(target, http)


def test_hostile_model_names_are_refused_and_still_metered(
    target: Target, http: httpx.Client, org
) -> None:
    # Too long for the ledger's column, or with control characters PostgreSQL will not
    # store (NUL): refused up front, and the refusal's usage event is still written.
    names = ["m" * (MAX_MODEL_NAME + 1), "a\x00b", "line\nbreak", "tab\there", "\ufffe"]
    for name in names:
        chat = http.post(f"{target.gateway.v1}/chat/completions", headers=target.auth(),
                         json={**VALID_CHAT, "model": name})  # fmt: skip
        assert _error(chat, 400)["param"] == "model"
        message = http.post(f"{target.gateway.v1}/messages", headers=target.auth(),
                            json={**VALID_MESSAGES, "model": name})  # fmt: skip
        assert message.status_code == 400, message.text
        assert_well_formed(message, anthropic=True)
    for path in ("/v1/models/%00", "/v1/models/" + "w" * 2000):
        assert _error(http.get(target.gateway.base_url + path, headers=target.auth()), 404)
    refused = UsageEvent.objects.filter(org=org, status_code__in=(400, 404))
    expected = 2 * len(names) + 2
    events = wait_for_events(refused, expected)
    assert len(events) == expected
    assert all(event.model == "" for event in events)
