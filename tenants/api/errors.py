"""One error body for the whole management API, shaped like OpenAI's:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "name",
               "code": "required", "fields": {"name": ["This field is required."]}}}

`fields` (validation errors only) lists every problem; `message` and `param` name the first.
"""

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler, set_rollback

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    406: "invalid_request_error",
    409: "conflict_error",
    412: "precondition_failed_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def _first_problem(detail: Any, path: str = "") -> tuple[str, str, str]:
    """(param, message, code) of the first error in a nested DRF error detail."""
    if isinstance(detail, dict):
        for name, inner in detail.items():
            param = name if name != "non_field_errors" else ""
            return _first_problem(inner, f"{path}.{param}" if path and param else path or param)
    if isinstance(detail, list) and detail:
        return _first_problem(detail[0], path)
    code = getattr(detail, "code", None) or "invalid"
    return path, str(detail), str(code)


def _as_plain(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {name: _as_plain(inner) for name, inner in detail.items()}
    if isinstance(detail, list):
        return [_as_plain(inner) for inner in detail]
    return str(detail)


def error_body(
    message: str, *, status: int, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "api_error"),
            "param": param or None,
            "code": code,
        }
    }


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, OverflowError | DataError):
        # A number beyond what the database stores (an id of 10**30 in a filter): SQLite
        # raises OverflowError, PostgreSQL DataError. The caller's input, not our fault.
        logger.info("Management API input out of range: %s", exc)
        exc = exceptions.ValidationError(
            {"non_field_errors": ["A value in the request is out of range."]}
        )
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(
            exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        )
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    response = exception_handler(exc, context)
    if response is None:
        # Unexpected: logged with its traceback, answered without one.
        logger.exception("Management API error", exc_info=exc)
        set_rollback()
        return Response(
            error_body(
                "The server failed to handle this request.", status=500, code="server_error"
            ),
            status=500,
        )
    if isinstance(exc, exceptions.ValidationError):
        param, message, code = _first_problem(exc.detail)
        body = error_body(
            f"{param}: {message}" if param else message, status=400, code=code, param=param
        )
        body["error"]["fields"] = _as_plain(
            exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        )
    else:
        detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
        code = exc.get_codes() if isinstance(exc, exceptions.APIException) else None
        body = error_body(
            str(detail), status=response.status_code, code=code if isinstance(code, str) else None
        )
    response.data = body
    return response
