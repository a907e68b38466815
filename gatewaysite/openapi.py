"""Additions to the generated OpenAPI schema for what DRF does not serve itself."""

from typing import Any

_USD = {"type": "string", "example": "12.345678", "description": "US dollars, exact decimal text."}
_INSTANT = {"type": "string", "format": "date-time", "nullable": True}

KEY_INFO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["object", "key", "rate_limits", "budgets"],
    "properties": {
        "object": {"type": "string", "enum": ["key_info"]},
        "key": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "prefix": {"type": "string", "example": "tgk_Ab12Cd34"},
                "organization": {"type": "string", "description": "The org's slug."},
                "allowed_models": {"type": "array", "items": {"type": "string"}},
                "expires_at": _INSTANT,
            },
        },
        "rate_limits": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "scope": {"type": "string", "enum": ["key", "team", "org"]},
                    "name": {"type": "string"},
                    "unit": {"type": "string", "enum": ["requests", "tokens"]},
                    "limit_per_minute": {"type": "integer"},
                    "remaining": {"type": "integer"},
                    "resets_in_seconds": {"type": "number"},
                },
            },
        },
        "budgets": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "scope": {"type": "string", "enum": ["org", "team", "key"]},
                    "name": {"type": "string"},
                    "period": {"type": "string"},
                    "enforcement": {"type": "string", "enum": ["hard", "soft"]},
                    "limit_usd": _USD,
                    "spent_usd": _USD,
                    "reserved_usd": _USD,
                    "remaining_usd": _USD,
                    "period_start": _INSTANT,
                    "resets_at": _INSTANT,
                    "forecast": {
                        "type": "object",
                        "properties": {
                            "projected_usd": {**_USD, "nullable": True},
                            "exhausted_at": _INSTANT,
                        },
                    },
                },
            },
        },
    },
}
_ERROR = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "example": "invalid_request_error"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
                "fields": {
                    "type": "object",
                    "description": "Validation errors only: every problem, by field.",
                    "additionalProperties": True,
                },
            },
        }
    },
}
# Answers any management API call may get, beside its own (see tenants/api/errors.py).
COMMON_ERRORS = {
    "400": "Invalid input: `error.param` names the first bad field, `error.fields` all of them",
    "401": "Missing, invalid, expired or revoked API token",
    "403": "The token's role may not do this",
    "404": "No such object in the token's organization",
    "429": "Too many calls: wait a minute",
}
CHANGE_ERRORS = {
    "409": "The object's state forbids the change",
    "412": "The object changed since the ETag sent in If-Match",
}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def error_responses_add(result: dict[str, Any], generator: Any, **kwargs: Any) -> dict[str, Any]:
    """Declare the shared error answers on every management API operation, so clients
    (and schemathesis) know every status code an operation can return."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path, operations in result.get("paths", {}).items():
        if not path.startswith("/api/"):
            continue
        for method, operation in operations.items():
            errors = dict(COMMON_ERRORS)
            if method in ("post", "put", "patch", "delete"):
                errors.update(CHANGE_ERRORS)
            responses = operation.setdefault("responses", {})
            for status, description in errors.items():
                responses.setdefault(status, _error_response(description))
    return result


def key_info_path_add(result: dict[str, Any], generator: Any, **kwargs: Any) -> dict[str, Any]:
    """Document `GET /v1/key/info`, served by the proxy with a virtual key, not by DRF."""
    components = result.setdefault("components", {})
    components.setdefault("securitySchemes", {})["virtualKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A virtual key (tgk_...), as for /v1/chat/completions.",
    }
    schemas = components.setdefault("schemas", {})
    schemas["KeyInfo"] = KEY_INFO_SCHEMA
    schemas["Error"] = ERROR_SCHEMA
    result.setdefault("paths", {})["/v1/key/info"] = {
        "get": {
            "operationId": "key_info",
            "summary": "The calling virtual key's limits, remaining budget and reset times",
            "description": (
                "Served by the gateway's proxy beside /v1/chat/completions. Reads the "
                "counters as they stand (spent, held by requests in flight, left) and "
                "forecasts when each budget runs out; it reserves nothing and costs nothing."
            ),
            "tags": ["key self-info"],
            "security": [{"virtualKey": []}],
            "responses": {
                "200": {
                    "description": "The key's limits and budgets",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/KeyInfo"}}
                    },
                },
                "401": _error_response("Missing, invalid, expired or revoked virtual key"),
                "503": _error_response("The budget counters are unavailable"),
            },
        }
    }
    return result
