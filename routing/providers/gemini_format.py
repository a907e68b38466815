"""Pure translation between OpenAI chat completions and Gemini generateContent (no I/O).

The gateway speaks OpenAI internally: requests become a GenerateContentRequest,
and answers (complete or streamed) come back in OpenAI's shapes. Anything that
cannot be said faithfully in Gemini's format is a 400 naming the field.
"""

import hashlib
import secrets
import time
from types import MappingProxyType
from typing import Any, Final

import orjson

from billing.contracts import TokenUsage
from routing.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
)
from routing.providers.openai_payload import (
    chunk_choice,
    chunk_event,
    completion_choice,
    completion_object,
    data_url,
    image_url,
    invalid,
    max_tokens,
    openai_usage,
    stop_sequences,
    text_of,
    tool_call,
)
from routing.providers.upstream import mid_stream_error, translate_events
from routing.tokens import estimate_text_tokens

_FINISH_REASONS: Final = MappingProxyType(
    {
        "STOP": "stop",
        "MAX_TOKENS": "length",
        "SAFETY": "content_filter",
        "RECITATION": "content_filter",
        "BLOCKLIST": "content_filter",
        "PROHIBITED_CONTENT": "content_filter",
        "SPII": "content_filter",
        "IMAGE_SAFETY": "content_filter",
    }
)
_TOOL_MODES: Final = MappingProxyType({"auto": "AUTO", "none": "NONE", "required": "ANY"})
_AUDIO_TYPES: Final = MappingProxyType({"wav": "audio/wav", "mp3": "audio/mp3"})
# Gemini 3 rejects replayed function calls without the signature it issued; OpenAI's
# format cannot carry one, so send the documented sentinel that skips the check.
SKIP_THOUGHT_SIGNATURE: Final = "skip_thought_signature_validator"


def _inline_data(url: object, where: str) -> dict[str, Any]:
    """An inlineData part for a base64 data URL; Gemini cannot fetch arbitrary URLs."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise invalid(
            f"'{where}' must be a base64 data URL (data:<type>;base64,...) for Gemini models.",
            where,
        )
    mime_type, data = data_url(url, where, param=where)
    return {"inlineData": {"mimeType": mime_type, "data": data}}


def _user_parts(content: object, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list):
        raise invalid(f"'{where}' must be a string or an array of content parts.", where)
    parts = []
    for index, part in enumerate(content):
        part_where = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append(_inline_data(image_url(part), f"{part_where}.image_url.url"))
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
            audio, audio_format = part["input_audio"], part["input_audio"].get("format")
            mime_type = _AUDIO_TYPES.get(audio_format) if isinstance(audio_format, str) else None
            if mime_type is None or not isinstance(audio.get("data"), str):
                raise invalid(
                    f"'{part_where}.input_audio' needs base64 wav or mp3 data.", part_where
                )
            parts.append({"inlineData": {"mimeType": mime_type, "data": audio["data"]}})
        elif kind == "file" and isinstance(part.get("file"), dict):
            parts.append(_inline_data(part["file"].get("file_data"), f"{part_where}.file"))
        else:
            raise invalid(
                f"'{part_where}': Gemini models accept text, image, audio and file parts only.",
                part_where,
            )
    return parts


def _function_call_part(call: object, where: str) -> tuple[str, str, dict[str, Any]]:
    """(id, name, functionCall part) for one OpenAI `tool_calls[]` entry."""
    call_id, name, args = tool_call(call, where)
    part = {
        "functionCall": {"name": name, "args": args},
        "thoughtSignature": SKIP_THOUGHT_SIGNATURE,
    }
    return call_id, name, part


def _function_response_part(name: str, content: object, where: str) -> dict[str, Any]:
    text = text_of(content, where)
    try:
        result: object = orjson.loads(text)
    except orjson.JSONDecodeError:
        result = text
    return {"functionResponse": {"name": name, "response": {"content": result}}}


def _conversation(messages: object) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(systemInstruction parts, contents) for OpenAI `messages`."""
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array.", "messages")
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names_by_call_id: dict[str, str] = {}

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return  # Gemini rejects a turn without parts
        # Gemini wants turns to alternate; adjacent same-role messages are one turn.
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.append({"text": text_of(message.get("content"), f"{where}.content")})
        elif role == "user":
            add("user", _user_parts(message.get("content"), f"{where}.content"))
        elif role == "assistant":
            text = text_of(message.get("content"), f"{where}.content")
            parts: list[dict[str, Any]] = [{"text": text}] if text else []
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise invalid(f"'{where}.tool_calls' must be an array.", f"{where}.tool_calls")
            for call_index, call in enumerate(calls):
                call_id, name, part = _function_call_part(call, f"{where}.tool_calls[{call_index}]")
                names_by_call_id[call_id] = name
                parts.append(part)
            add("model", parts)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            name = names_by_call_id.get(call_id) if isinstance(call_id, str) else None
            if name is None:
                raise invalid(
                    f"'{where}.tool_call_id' does not match a tool call of an earlier message.",
                    f"{where}.tool_call_id",
                )
            add("user", [_function_response_part(name, message.get("content"), where)])
        elif role == "function" and isinstance(message.get("name"), str):
            add("user", [_function_response_part(message["name"], message.get("content"), where)])
        else:
            raise invalid(f"'{where}.role' cannot be sent to a Gemini model.", f"{where}.role")
    return system, contents


def _response_format(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema" and isinstance(value, dict):
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        config: dict[str, Any] = {"responseMimeType": "application/json"}
        if isinstance(schema, dict):
            # responseJsonSchema takes JSON Schema as OpenAI clients write it; the older
            # responseSchema is an OpenAPI subset that rejects e.g. additionalProperties.
            config["responseJsonSchema"] = schema
        return config
    raise invalid(
        "'response_format.type' must be text, json_object or json_schema.", "response_format"
    )


def _generation_config(payload: dict[str, Any]) -> dict[str, Any]:
    get = payload.get
    config: dict[str, Any] = {}
    for openai_name, gemini_name in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("n", "candidateCount"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if get(openai_name) is not None:
            config[gemini_name] = get(openai_name)
    limit = max_tokens(payload)
    if limit is not None:
        config["maxOutputTokens"] = limit
    stops = stop_sequences(payload)
    if stops is not None:
        config["stopSequences"] = stops
    config.update(_response_format(get("response_format")))
    return config


def _function_declarations(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array.", "tools")
    declarations = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise invalid(f"'tools[{index}]': Gemini models take function tools only.", "tools")
        if not isinstance(function.get("name"), str):
            raise invalid(f"'tools[{index}].function.name' must be a string.", "tools")
        declaration: dict[str, Any] = {"name": function["name"]}
        if isinstance(function.get("description"), str):
            declaration["description"] = function["description"]
        if isinstance(function.get("parameters"), dict):
            # parametersJsonSchema accepts full JSON Schema, as OpenAI tools declare it.
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    return declarations


def _function_calling_config(choice: object) -> dict[str, Any]:
    if isinstance(choice, str) and choice in _TOOL_MODES:
        return {"mode": _TOOL_MODES[choice]}
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str):
        return {"mode": "ANY", "allowedFunctionNames": [name]}
    raise invalid(
        "'tool_choice' must be auto, none, required or a function to call.", "tool_choice"
    )


def generate_content_body(payload: dict[str, Any]) -> dict[str, Any]:
    """The GenerateContentRequest for an OpenAI chat payload; 400 naming what cannot map."""
    system, contents = _conversation(payload.get("messages"))
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    config = _generation_config(payload)
    if config:
        body["generationConfig"] = config
    if payload.get("tools"):
        body["tools"] = [{"functionDeclarations": _function_declarations(payload["tools"])}]
        if payload.get("tool_choice") is not None:
            body["toolConfig"] = {
                "functionCallingConfig": _function_calling_config(payload["tool_choice"])
            }
    return body


def usage_from_gemini(metadata: object) -> TokenUsage | None:
    """Token counts from Gemini `usageMetadata` (zero counts are omitted there), or None."""
    if not isinstance(metadata, dict):
        return None

    def count(name: str) -> int:
        value = metadata.get(name)
        return value if isinstance(value, int) and value > 0 else 0

    thoughts = count("thoughtsTokenCount")
    return TokenUsage(
        # Tool-use prompts (e.g. grounding) are input the provider bills too.
        input_tokens=count("promptTokenCount") + count("toolUsePromptTokenCount"),
        cached_input_tokens=count("cachedContentTokenCount"),
        # Gemini counts thinking apart from candidates; OpenAI's completion includes it.
        output_tokens=count("candidatesTokenCount") + thoughts,
        reasoning_tokens=thoughts,
    )


def _usage_object(usage: TokenUsage) -> dict[str, Any]:
    """The OpenAI `usage` object for `usage`, with reasoning tokens (Gemini counts thoughts)."""
    return {
        **openai_usage(usage),
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def tool_call_id(name: str, args: object) -> str:
    """A stable id for a Gemini function call (Gemini sends none): same call, same id."""
    digest = hashlib.sha256(
        name.encode() + b"\x00" + orjson.dumps(args, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    return f"call_{digest[:24]}"


def finish_reason(reason: object, *, called_tools: bool) -> str:
    """OpenAI's finish_reason for a Gemini finishReason (unknown ones read as stop)."""
    mapped = _FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"
    return "tool_calls" if called_tools and mapped == "stop" else mapped


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    name = str(call.get("name", ""))
    args = call.get("args") if isinstance(call.get("args"), dict) else {}
    return {
        "id": tool_call_id(name, args),
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(args).decode()},
    }


def _candidate_parts(candidate: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """(texts, OpenAI tool calls) of a candidate; thought summaries are not the answer."""
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in parts if isinstance(parts, list) else []:
        if not isinstance(part, dict) or part.get("thought") is True:
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            calls.append(_tool_call(part["functionCall"]))
    return texts, calls


def _candidates(response: dict[str, Any]) -> list[dict[str, Any]]:
    candidates = response.get("candidates")
    return [c for c in candidates if isinstance(c, dict)] if isinstance(candidates, list) else []


def blocked_prompt_error(response: dict[str, Any]) -> InvalidRequest | None:
    """The 400 for a prompt Gemini refused to answer (no candidates), or None."""
    feedback = response.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if not isinstance(reason, str) or _candidates(response):
        return None
    return InvalidRequest(
        f"The provider's safety filters blocked the prompt (reason: {reason[:100]}).",
        code="content_filter",
    )


def _completion_id(response: dict[str, Any]) -> str:
    response_id = response.get("responseId")
    if isinstance(response_id, str) and response_id:
        return f"chatcmpl-{response_id}"
    return f"chatcmpl-{secrets.token_hex(12)}"


def chat_completion(
    response: object, *, model: str, created: int
) -> tuple[dict[str, Any], TokenUsage]:
    """An OpenAI chat.completion object and its usage for a GenerateContentResponse."""
    if not isinstance(response, dict):
        raise UpstreamMalformed("The upstream provider sent a response that is not an object.")
    blocked = blocked_prompt_error(response)
    if blocked is not None:
        raise blocked
    candidates = _candidates(response)
    if not candidates:
        raise UpstreamMalformed("The upstream provider sent a response without candidates.")
    choices = []
    for position, candidate in enumerate(candidates):
        texts, calls = _candidate_parts(candidate)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts or not calls else None,
        }
        if calls:
            message["tool_calls"] = calls
        index = candidate.get("index", position)
        reason = finish_reason(candidate.get("finishReason"), called_tools=bool(calls))
        choices.append(
            completion_choice(index if isinstance(index, int) else position, message, reason)
        )
    usage = usage_from_gemini(response.get("usageMetadata")) or TokenUsage(estimated=True)
    version = response.get("modelVersion")
    body = completion_object(
        completion_id=_completion_id(response),
        created=created,
        model=version if isinstance(version, str) and version else model,
        choices=sorted(choices, key=lambda choice: choice["index"]),
        usage=_usage_object(usage),
    )
    return body, usage


def stream_error(data: dict[str, Any]) -> UpstreamError | None:
    """The UpstreamError for an `error` object sent inside a stream, or None."""
    error = data.get("error")
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    error_class: type[UpstreamError] = UpstreamError
    if code == 429:
        error_class = UpstreamRateLimited
    elif isinstance(code, int) and 400 <= code < 500:
        error_class = UpstreamRejected
    return mid_stream_error(error_class, error.get("message"))


class ChunkTranslator:
    """Turns a Gemini streamGenerateContent (alt=sse) stream into OpenAI chunk SSE."""

    def __init__(self, *, model: str, choices: int) -> None:
        self._model = model
        self._choices = max(choices, 1)
        self._created = int(time.time())
        self._id = ""
        self._metadata: object = None
        self._called_tools: dict[int, int] = {}  # choice index -> tool calls so far
        self._finished: set[int] = set()
        self._relayed_tokens = 0  # estimated, for a stream cut short
        self._started = False

    @property
    def finished(self) -> bool:
        """Whether Gemini sent a finishReason: the answer is complete."""
        return bool(self._finished)

    @property
    def usage(self) -> TokenUsage:
        """The provider's figures once the answer finished, else an estimate so far."""
        reported = usage_from_gemini(self._metadata)
        if reported is not None and self.finished:
            return reported
        reported = reported or TokenUsage()
        return TokenUsage(
            input_tokens=reported.input_tokens,
            cached_input_tokens=reported.cached_input_tokens,
            output_tokens=max(reported.output_tokens, self._relayed_tokens),
            reasoning_tokens=reported.reasoning_tokens,
            estimated=True,
        )

    def _event(self, **fields: object) -> bytes:
        return chunk_event(chunk_id=self._id, created=self._created, model=self._model, **fields)

    def _chunk(self, index: int, delta: dict[str, Any], reason: str | None = None) -> bytes:
        return self._event(choices=[chunk_choice(index, delta, reason)])

    def _start(self, response: dict[str, Any]) -> list[bytes]:
        self._started = True
        self._id = _completion_id(response)
        version = response.get("modelVersion")
        if isinstance(version, str) and version:
            self._model = version
        return [
            self._chunk(index, {"role": "assistant", "content": ""})
            for index in range(self._choices)
        ]

    def _candidate(self, position: int, candidate: dict[str, Any]) -> list[bytes]:
        index = candidate.get("index", position)
        index = index if isinstance(index, int) else position
        if index in self._finished:
            return []
        out = []
        texts, calls = _candidate_parts(candidate)
        text = "".join(texts)
        if text:
            self._relayed_tokens += estimate_text_tokens(text)
            out.append(self._chunk(index, {"content": text}))
        if calls:
            first = self._called_tools.get(index, 0)
            self._called_tools[index] = first + len(calls)
            self._relayed_tokens += sum(
                estimate_text_tokens(call["function"]["arguments"]) for call in calls
            )
            deltas = [{"index": first + offset, **call} for offset, call in enumerate(calls)]
            out.append(self._chunk(index, {"tool_calls": deltas}))
        reason = candidate.get("finishReason")
        if isinstance(reason, str) and reason != "FINISH_REASON_UNSPECIFIED":
            self._finished.add(index)
            called = index in self._called_tools
            out.append(self._chunk(index, {}, finish_reason(reason, called_tools=called)))
        return out

    def translate(self, response: dict[str, Any]) -> list[bytes]:
        """The OpenAI SSE events for one GenerateContentResponse; raises on errors and blocks."""
        error = stream_error(response)
        if error is not None:
            raise error
        if isinstance(response.get("usageMetadata"), dict):
            self._metadata = response["usageMetadata"]
        blocked = blocked_prompt_error(response)
        if blocked is not None:
            if not self._started:
                raise blocked
            # Blocked after text went out: end every open choice as filtered.
            still_open = [index for index in range(self._choices) if index not in self._finished]
            self._finished.update(still_open)
            return [self._chunk(index, {}, "content_filter") for index in still_open]
        out = [] if self._started else self._start(response)
        for position, candidate in enumerate(_candidates(response)):
            out.extend(self._candidate(position, candidate))
        return out

    def translate_batch(self, events: list[bytes]) -> bytes:
        """The OpenAI SSE bytes for a batch of raw Gemini SSE events."""
        return translate_events(events, self.translate)

    def closing(self, *, include_usage: bool) -> bytes:
        """The end of the OpenAI stream: open choices closed, usage if asked, [DONE]."""
        if not self.finished:
            raise UpstreamMalformed("The upstream provider ended the stream before finishing.")
        out = [
            self._chunk(index, {}, "stop")
            for index in range(self._choices)
            if index not in self._finished
        ]
        if include_usage:
            out.append(self._event(choices=[], usage=_usage_object(self.usage)))
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)
