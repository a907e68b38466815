"""Gemini-compatible endpoints: generateContent, streamGenerateContent and batchEmbedContents.

The answer is the OpenAI family's: the same words for the same model and last
user text, and the same tool-call rule, in Gemini's wire format.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import orjson
from aiohttp import web

from .content import (
    Completion,
    ToolCall,
    embedding_vector,
    last_user_text,
    plan_completion,
    plan_tool_call,
)
from .errors import Family, MockError
from .options import MAX_DIMENSIONS, MockOptions, resolve_options
from .responses import StreamPlan, answer_with_fault, json_response, send_stream, sleep_ms
from .state import STATE
from .validation import body_object, optional_int

# Gemini allows at most 8 candidates per request.
MAX_CANDIDATES: Final = 8
MAX_EMBED_REQUESTS: Final = 100
# google.rpc status names, as Gemini reports them beside the HTTP code.
_STATUS_NAMES: Final = MappingProxyType(
    {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        409: "ABORTED",
        413: "INVALID_ARGUMENT",
        429: "RESOURCE_EXHAUSTED",
        499: "CANCELLED",
        500: "INTERNAL",
        501: "UNIMPLEMENTED",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }
)
_CALLING_MODES: Final = frozenset({"AUTO", "ANY", "NONE", "VALIDATED", "MODE_UNSPECIFIED"})


def error_body(status: int, message: str) -> dict[str, object]:
    """Return a Gemini error body: the HTTP code, a message and the google.rpc status."""
    default = "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"
    status_name = _STATUS_NAMES.get(status, default)
    return {"error": {"code": status, "message": message, "status": status_name}}


def error_response(error: MockError) -> web.Response:
    """Return `error` as JSON in Gemini's shape, with its status and headers."""
    return web.Response(
        status=error.status,
        body=orjson.dumps(error_body(error.status, error.message)),
        content_type="application/json",
        headers=error.headers,
    )


def _parts(value: object, where: str) -> list[dict[str, Any]]:
    """Return a content's `parts` if a non-empty array of objects, else raise a 400."""
    parts = value.get("parts") if isinstance(value, dict) else None
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        raise MockError(400, f"{where}.parts: must be a non-empty array of objects")
    return parts


def _response_text(response: object) -> str:
    """Return a functionResponse's result as text, so its words count as prompt."""
    content = response.get("content") if isinstance(response, dict) else response
    return content if isinstance(content, str) else orjson.dumps(content).decode()


def _as_message(content: object, index: int) -> dict[str, Any]:
    """Return one Gemini content as the OpenAI-style message content.py counts.

    A user turn of only function responses reads as a `tool` message, so the last
    user text (and the words) match the OpenAI family's for the same conversation.
    """
    where = f"contents[{index}]"
    if not isinstance(content, dict):
        raise MockError(400, f"{where}: must be an object")
    role = content.get("role") or "user"
    if role not in ("user", "model"):
        raise MockError(400, f"{where}.role: must be user or model")
    texts, responses = [], []
    for part in _parts(content, where):
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("functionResponse"), dict):
            responses.append(_response_text(part["functionResponse"].get("response")))
    kind = "assistant" if role == "model" else "tool" if responses and not texts else "user"
    return {"role": kind, "content": [{"type": "text", "text": t} for t in texts + responses]}


def _answering_tool_result(contents: list[Any]) -> bool:
    """Whether the last user turn carries a functionResponse part."""
    for content in reversed(contents):
        if (content.get("role") or "user") == "user":
            return any("functionResponse" in part for part in content["parts"])
    return False


def _tool_names(body: dict[str, Any]) -> tuple[str, ...]:
    """Return the declared function names, or raise a 400 if `tools` is malformed."""
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise MockError(400, "tools: must be an array of objects")
    names = []
    for index, tool in enumerate(tools):
        declarations = tool.get("functionDeclarations") or []
        if not isinstance(declarations, list):
            raise MockError(400, f"tools[{index}].functionDeclarations: must be an array")
        for declaration in declarations:
            name = declaration.get("name") if isinstance(declaration, dict) else None
            if not isinstance(name, str) or not name:
                raise MockError(400, f"tools[{index}].functionDeclarations: each needs a name")
            names.append(name)
    return tuple(names)


def _calling_config(body: dict[str, Any]) -> tuple[str, str | None]:
    """Return the functionCallingConfig mode and the tool it forces (ANY with names)."""
    tool_config = body.get("toolConfig") or {}
    config = tool_config.get("functionCallingConfig") if isinstance(tool_config, dict) else None
    config = config or {}
    if not isinstance(config, dict):
        raise MockError(400, "toolConfig.functionCallingConfig: must be an object")
    mode = config.get("mode") or "AUTO"
    if mode not in _CALLING_MODES:
        raise MockError(400, f"toolConfig.functionCallingConfig.mode: unknown mode {mode!r}")
    allowed = config.get("allowedFunctionNames") or []
    if not isinstance(allowed, list) or not all(isinstance(name, str) for name in allowed):
        raise MockError(400, "allowedFunctionNames: must be an array of strings")
    return mode, allowed[0] if mode == "ANY" and allowed else None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """The fields of a GenerateContentRequest the mock acts on."""

    messages: list[dict[str, Any]]  # the contents as OpenAI-style messages
    system: object
    max_output_tokens: int | None
    candidates: int
    tool_names: tuple[str, ...]  # empty when none are declared or the mode is NONE
    forced_tool: str | None
    answering_tool_result: bool


def parse_generate_request(body: dict[str, Any]) -> GenerateRequest:
    """Return the validated request, or raise a 400 naming the bad field."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise MockError(400, "contents: must be a non-empty array")
    messages = [_as_message(content, index) for index, content in enumerate(contents)]
    system = body.get("systemInstruction")
    if system is not None:
        system = _parts(system, "systemInstruction")
    config = body.get("generationConfig") or {}
    if not isinstance(config, dict):
        raise MockError(400, "generationConfig: must be an object")
    mode, forced = _calling_config(body)
    names = _tool_names(body)
    return GenerateRequest(
        messages=messages,
        system=system,
        max_output_tokens=optional_int(config, "maxOutputTokens", 1, 1 << 31),
        candidates=optional_int(config, "candidateCount", 1, MAX_CANDIDATES) or 1,
        tool_names=() if mode == "NONE" else names,
        forced_tool=forced,
        answering_tool_result=_answering_tool_result(contents),
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """What the mock replies, in Gemini's shape: text, or a function call instead."""

    model: str
    completion: Completion
    call: ToolCall | None
    candidates: int
    response_id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(12))

    @property
    def finish_reason(self) -> str:
        """Return MAX_TOKENS when the text was capped, else STOP (function calls too)."""
        return "MAX_TOKENS" if self.call is None and self.completion.capped else "STOP"

    def usage_metadata(self) -> dict[str, int]:
        """Return usageMetadata: the prompt, and every candidate's output."""
        each = self.call.completion_tokens if self.call else len(self.completion.words)
        prompt, output = self.completion.prompt_tokens, each * self.candidates
        return {
            "promptTokenCount": prompt,
            "candidatesTokenCount": output,
            "totalTokenCount": prompt + output,
        }

    def response(
        self,
        parts: list[dict[str, Any]],
        *,
        finished: bool = False,
    ) -> dict[str, Any]:
        """Return a GenerateContentResponse giving every candidate `parts`."""
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
        if finished:
            candidate["finishReason"] = self.finish_reason
        response: dict[str, Any] = {
            "candidates": [{**candidate, "index": i} for i in range(self.candidates)]
        }
        if finished:
            response["usageMetadata"] = self.usage_metadata()
        response["modelVersion"] = self.model
        response["responseId"] = self.response_id
        return response

    def whole(self) -> dict[str, Any]:
        """Return the non-streamed response."""
        if self.call is not None:
            part = {"functionCall": {"name": self.call.name, "args": self.call.arguments}}
            return self.response([part], finished=True)
        return self.response([{"text": self.completion.text}], finished=True)

    def stream(self) -> list[dict[str, Any]]:
        """Return the streamed responses: one per word (or the call), then the finish."""
        if self.call is not None:
            part = {"functionCall": {"name": self.call.name, "args": self.call.arguments}}
            pieces = [self.response([part])]
        else:
            pieces = [self.response([{"text": delta}]) for delta in self.completion.deltas()]
        return [*pieces, self.response([{"text": ""}], finished=True)]


def _blocked(model: str, prompt_tokens: int) -> dict[str, Any]:
    """Return the response to a prompt the safety filters refused: no candidates."""
    return {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
        "modelVersion": model,
    }


def _sse(response: dict[str, Any]) -> bytes:
    # Gemini frames its events with CRLF line ends.
    return b"data: " + orjson.dumps(response) + b"\r\n\r\n"


def _prepare(request: web.Request) -> tuple[MockOptions, list[dict[str, Any]], dict[str, Any]]:
    """Return the options, the streamed responses and the whole response for a request."""
    parsed = parse_generate_request(body_object(request))
    model, options = resolve_options(
        request.app[STATE].defaults,
        request.match_info["model"],
        request.headers.items(),
        prompt_blocking=True,
    )
    completion = plan_completion(
        model=model,
        messages=parsed.messages,
        system=parsed.system,
        tokens=options.tokens,
        max_tokens=parsed.max_output_tokens,
    )
    if options.fault == "blocked":
        blocked = _blocked(model, completion.prompt_tokens)
        return options, [blocked], blocked
    # A function call ignores maxOutputTokens: its arguments are short and a cut call is useless.
    call = plan_tool_call(
        tool_names=parsed.tool_names,
        forced=parsed.forced_tool,
        answering_tool_result=parsed.answering_tool_result,
        prompt=last_user_text(parsed.messages),
    )
    answer = Answer(model=model, completion=completion, call=call, candidates=parsed.candidates)
    return options, answer.stream(), answer.whole()


async def generate_content(request: web.Request) -> web.StreamResponse:
    """Answer POST /v1beta/models/{model}:generateContent deterministically."""
    options, _, whole = _prepare(request)
    if options.fault is not None and options.fault != "blocked":
        return await answer_with_fault(request, options)
    await sleep_ms(options.latency_ms)
    return json_response(whole)


async def stream_generate_content(request: web.Request) -> web.StreamResponse:
    """Answer POST /v1beta/models/{model}:streamGenerateContent: SSE with alt=sse.

    Without alt=sse Gemini streams one JSON array; the mock sends it in one piece.
    """
    options, responses, _ = _prepare(request)
    if options.fault == "blocked":
        # A blocked prompt is an ordinary answer, not a transport fault.
        options = dataclasses.replace(options, fault=None)
    if request.query.get("alt") != "sse":
        if options.fault is not None:
            return await answer_with_fault(request, options)
        await sleep_ms(options.latency_ms)
        return json_response(responses)
    events = [_sse(response) for response in responses]
    plan = StreamPlan(head=events[:1], words=events[1:-1], tail=events[1:][-1:])
    # Gemini's SSE is data-only, like OpenAI's: the OpenAI malformed event fits it.
    return await send_stream(request, options, Family.OPENAI, plan)


def _embed_text(item: object, index: int, model_name: str) -> tuple[str, int | None]:
    """Return one embed request's text and outputDimensionality, or raise a 400."""
    where = f"requests[{index}]"
    if not isinstance(item, dict):
        raise MockError(400, f"{where}: must be an object")
    if item.get("model") != model_name:
        raise MockError(400, f"{where}.model: must be {model_name}, the model named in the URL")
    texts = []
    for part in _parts(item.get("content"), f"{where}.content"):
        text = part.get("text")
        if not isinstance(text, str):
            raise MockError(400, f"{where}.content.parts: the mock embeds text parts only")
        texts.append(text)
    return " ".join(texts), optional_int(item, "outputDimensionality", 1, MAX_DIMENSIONS)


async def batch_embed_contents(request: web.Request) -> web.StreamResponse:
    """Answer POST /v1beta/models/{model}:batchEmbedContents with deterministic vectors."""
    body = body_object(request)
    requests = body.get("requests")
    if not isinstance(requests, list) or not 1 <= len(requests) <= MAX_EMBED_REQUESTS:
        raise MockError(400, f"requests: must be an array of 1 to {MAX_EMBED_REQUESTS} requests")
    model_name = "models/" + request.match_info["model"]
    items = [_embed_text(item, index, model_name) for index, item in enumerate(requests)]
    _, options = resolve_options(
        request.app[STATE].defaults, request.match_info["model"], request.headers.items()
    )
    if options.fault is not None:
        return await answer_with_fault(request, options)
    await sleep_ms(options.latency_ms)
    return json_response(
        {
            "embeddings": [
                {"values": embedding_vector(text, dimensions or options.dimensions)}
                for text, dimensions in items
            ]
        }
    )
