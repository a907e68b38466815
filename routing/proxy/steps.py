"""The proxy pipeline's steps: small functions that take and return contracts
and raise a GatewayError on failure. None of them does I/O."""

import math
import re
from typing import Any, NamedTuple

import orjson

from routing.contracts import ChatRequest, EmbeddingsRequest, RoutePlan
from routing.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from routing.formats.anthropic_messages import chat_payload_from_messages
from routing.providers.base import ProviderAdapter
from routing.proxy.http import ProxyRequest
from routing.snapshot import ConfigSnapshot
from tenants.contracts import KeyContext
from tenants.keys import key_matches, key_prefix

_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Route.model_name and UsageEvent.model hold 200 characters: a longer name could match
# no route, and its usage event would not fit the ledger (PostgreSQL refuses it).
MAX_MODEL_NAME = 200
# Levels of arrays and objects a request body may nest: far more than real tool schemas
# need, and far less than the 254 orjson writes (translations add a few levels).
MAX_JSON_DEPTH = 128
_ORJSON_MAX_DEPTH = 254  # the most levels orjson.dumps writes
TAGS_HEADER = "x-tollgate-tags"
END_USER_HEADER = "x-tollgate-user"
MAX_TAGS = 10
MAX_END_USER_LENGTH = 256
# 1-64 characters; ':' allows key:value tags such as feature:search.
_TAG = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
# Printable text: the end user id is shown in reports and exported to CSV.
_END_USER = re.compile(rf"[^\x00-\x1f\x7f]{{1,{MAX_END_USER_LENGTH}}}")


def presented_key(request: ProxyRequest) -> str | None:
    """The API key from `Authorization: Bearer …` or `x-api-key`."""
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key", "").strip() or None


def authenticate(request: ProxyRequest, snapshot: ConfigSnapshot) -> KeyContext:
    """The active key the request presents; 401 otherwise, without saying why it is unknown,
    and 403 when the key's IP allowlist does not hold the client's address."""
    presented = presented_key(request)
    if presented is None:
        raise AuthenticationFailed(
            "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    prefix = key_prefix(presented)
    key = snapshot.keys_by_prefix.get(prefix) if prefix else None
    if key is None or not key_matches(presented, key.secret_hash):
        raise AuthenticationFailed("Incorrect API key provided.")
    if key.is_expired(request.started_at):
        raise AuthenticationFailed("This API key has expired.", code="api_key_expired")
    # Keys without an allowlist (most) pay one attribute read.
    if key.ip_allowlist is not None and not key.ip_allowlist.permits(request.client_host):
        raise PermissionDenied(
            "This API key may not be used from your IP address.", code="ip_not_allowed"
        )
    return key


class Attribution(NamedTuple):
    tags: tuple[str, ...]
    end_user: str


def parse_attribution(request: ProxyRequest) -> Attribution:
    """Tags (`x-tollgate-tags`, comma-separated) and end user (`x-tollgate-user`) from
    the headers, deduplicated in order; 400 naming the header if either is malformed."""
    tags: dict[str, None] = {}
    raw_tags = request.headers.get(TAGS_HEADER, "")
    for raw in raw_tags.split(",") if raw_tags.strip() else ():
        tag = raw.strip()
        if not _TAG.fullmatch(tag):
            shown = tag if len(tag) <= 80 else tag[:80] + "…"
            raise InvalidRequest(
                f"Invalid tag {shown!r} in the {TAGS_HEADER} header: each tag must be 1 to 64 "
                "characters of letters, digits and _ . : / -, tags separated by commas.",
                param=TAGS_HEADER,
                code="invalid_tags",
            )
        tags[tag] = None
    if len(tags) > MAX_TAGS:
        raise InvalidRequest(
            f"Too many tags in the {TAGS_HEADER} header: {len(tags)} given, at most "
            f"{MAX_TAGS} allowed.",
            param=TAGS_HEADER,
            code="invalid_tags",
        )
    end_user = _header_text(request.headers.get(END_USER_HEADER, "")).strip()
    if end_user:
        _check_end_user(end_user, END_USER_HEADER, f"the {END_USER_HEADER} header")
    return Attribution(tags=tuple(tags), end_user=end_user)


def _header_text(value: str) -> str:
    """A header read as Latin-1 (as ASGI gives it), as the UTF-8 text clients send."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _check_end_user(value: str, param: str, where: str) -> None:
    if not _END_USER.fullmatch(value):
        raise InvalidRequest(
            f"The end user id in {where} must be 1 to {MAX_END_USER_LENGTH} printable characters.",
            param=param,
            code="invalid_user",
        )


def end_user_of(payload: dict[str, Any], header_end_user: str) -> str:
    """The request's end user: the body's `user` field (Anthropic: metadata.user_id)
    if it has one, else the `x-tollgate-user` header's. Parsing checked the field."""
    user = payload.get("user")
    return user if isinstance(user, str) and user else header_end_user


def _check_user_field(data: dict[str, Any], param: str = "user") -> None:
    user = data.get("user")
    _check_optional(data, "user", isinstance(user, str), "a string")
    if isinstance(user, str) and user:
        _check_end_user(user, param, f"'{param}'")


def _nested_too_deep(data: object) -> bool:
    """Whether arrays and objects in `data` nest more than MAX_JSON_DEPTH levels deep.

    orjson's writer does the counting (in C, no recursion in Python): it refuses more
    than _ORJSON_MAX_DEPTH levels, so `data` under the difference in wrapping lists
    fails exactly when it is deeper than MAX_JSON_DEPTH.
    """
    wrapped = data
    for _ in range(_ORJSON_MAX_DEPTH - MAX_JSON_DEPTH):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return True
    return False


def _json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson's reason says what and where (invalid UTF-8, a lone surrogate, a number
        # too large, nesting too deep), never more than the client's own body.
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc.msg} (line {exc.lineno}, "
            f"column {exc.colno}). Send a JSON object encoded as UTF-8.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # Deeper bodies would fail later as a 500: orjson writes at most 254 levels upstream,
    # and Python's recursion limit is near 1,000. A body cannot nest deeper than it has
    # brackets; counting them (in C, ~0.6 µs for 1 KB) spares most requests the check.
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH and _nested_too_deep(data):
        raise InvalidRequest(
            f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} levels "
            "deep; the gateway does not accept deeper JSON.",
            code="invalid_json",
        )
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    if not model_name_storable(model):
        raise InvalidRequest(
            f"'model' must be at most {MAX_MODEL_NAME} printable characters.", param="model"
        )
    return model


def model_name_storable(model: str) -> bool:
    """Whether `model` fits the usage ledger: short, and no control characters (NUL)."""
    return len(model) <= MAX_MODEL_NAME and model.isprintable()


def _check_optional(data: dict[str, Any], name: str, valid: bool, expectation: str) -> None:
    if name in data and data[name] is not None and not valid:
        raise InvalidRequest(f"'{name}' must be {expectation}.", param=name)


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in _MESSAGE_ROLES:  # a list is unhashable
            raise InvalidRequest(
                f"'{where}.role' must be one of {', '.join(sorted(_MESSAGE_ROLES))}.",
                param=f"{where}.role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"'{where}.content' must be a string or an array of content parts.",
                param=f"{where}.content",
            )


def parse_chat_request(body: bytes) -> ChatRequest:
    """A validated chat-completions request; 400 naming the first bad field."""
    data = _json_object(body)
    model = _model(data)
    _check_messages(data.get("messages"))
    get = data.get
    _check_optional(data, "stream", isinstance(get("stream"), bool), "a boolean")
    _check_optional(data, "stream_options", isinstance(get("stream_options"), dict), "an object")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        _check_optional(data, name, _is_int(get(name)) and get(name) >= 1, "a positive integer")
    _check_optional(data, "seed", _is_int(get("seed")), "an integer")
    _check_optional(
        data, "temperature", _is_number(get("temperature")) and 0 <= get("temperature") <= 2,
        "a number from 0 to 2",
    )  # fmt: skip
    _check_optional(
        data, "top_p", _is_number(get("top_p")) and 0 <= get("top_p") <= 1, "a number from 0 to 1"
    )
    for name in ("presence_penalty", "frequency_penalty"):
        _check_optional(
            data, name, _is_number(get(name)) and -2 <= get(name) <= 2, "a number from -2 to 2"
        )
    stop = get("stop")
    _check_optional(
        data, "stop",
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop)),
        "a string or an array of strings",
    )  # fmt: skip
    _check_optional(data, "tools", isinstance(get("tools"), list), "an array")
    _check_optional(
        data, "tool_choice", isinstance(get("tool_choice"), str | dict), "a string or an object"
    )
    _check_optional(data, "response_format", isinstance(get("response_format"), dict), "an object")
    _check_user_field(data)
    stream = bool(get("stream"))
    options = get("stream_options") or {}
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise InvalidRequest(
            "'stream_options.include_usage' must be a boolean.",
            param="stream_options.include_usage",
        )
    return ChatRequest(
        model=model, payload=data, stream=stream, include_usage=stream and bool(include_usage)
    )


def parse_messages_request(body: bytes) -> ChatRequest:
    """An Anthropic Messages request, as the OpenAI chat request the pipeline serves."""
    payload = chat_payload_from_messages(_json_object(body))
    _model(payload)
    _check_user_field(payload, "metadata.user_id")
    return ChatRequest(
        model=payload["model"],
        payload=payload,
        stream=bool(payload.get("stream")),
        include_usage=False,  # Anthropic streams report usage in their own closing events
    )


def apply_param_policy(chat: ChatRequest, adapter: ProviderAdapter, plan: RoutePlan) -> ChatRequest:
    """The request without parameters the provider cannot honour, or 400 naming one.

    Which of the two is the route's choice (`unsupported_params`).
    """
    supported = adapter.chat_params
    if supported is None:
        return chat
    unsupported = sorted(name for name in chat.payload if name not in supported)
    if not unsupported:
        return chat
    if plan.unsupported_params == "drop":
        payload = {name: value for name, value in chat.payload.items() if name in supported}
        return ChatRequest(
            model=chat.model, payload=payload, stream=chat.stream, include_usage=chat.include_usage
        )
    name = unsupported[0]
    raise InvalidRequest(
        f"The parameter '{name}' is not supported by the provider serving '{chat.model}'.",
        param=name,
        code="unsupported_parameter",
    )


def _valid_embedding_input(value: object) -> bool:
    if isinstance(value, str):
        return bool(value)
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(item, str) for item in value):
        return True
    if all(_is_int(item) for item in value):
        return True
    return all(
        isinstance(item, list) and item and all(_is_int(token) for token in item) for item in value
    )


def parse_embeddings_request(body: bytes) -> EmbeddingsRequest:
    """A validated embeddings request; 400 naming the first bad field."""
    data = _json_object(body)
    model = _model(data)
    if not _valid_embedding_input(data.get("input")):
        raise InvalidRequest(
            "'input' must be a non-empty string, array of strings, or array of token arrays.",
            param="input",
        )
    _check_optional(
        data, "encoding_format", data.get("encoding_format") in ("float", "base64"),
        "'float' or 'base64'",
    )  # fmt: skip
    dimensions = data.get("dimensions")
    _check_optional(
        data, "dimensions", _is_int(dimensions) and dimensions >= 1, "a positive integer"
    )
    _check_user_field(data)
    return EmbeddingsRequest(model=model, payload=data)


def resolve_route(snapshot: ConfigSnapshot, key: KeyContext, model: str) -> RoutePlan:
    """The route serving `model` for this key's org: 404 if none, 403 if the key may not use it."""
    plan = snapshot.route_for(org_id=key.org_id, model=model)
    if plan is None:
        raise NotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    if not key.may_use(model):
        raise PermissionDenied(
            f"This API key is not allowed to use the model '{model}'.", param="model"
        )
    return plan
