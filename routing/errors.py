"""Failures the gateway answers with an OpenAI-shaped error body.

Every failure on the proxy path is one of these; `status` is what the client
gets, so the official SDKs raise their typed exceptions. Messages are written
for the client: they never contain provider secrets or internal URLs.
"""

import orjson

# Anthropic's error types by status, for errors on the Anthropic-format endpoint.
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
}


class GatewayError(Exception):
    status = 500
    error_type = "api_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def openai_body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.error_type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    def anthropic_body(self) -> bytes:
        error_type = _ANTHROPIC_ERROR_TYPES.get(self.status, "api_error")
        return orjson.dumps(
            {"type": "error", "error": {"type": error_type, "message": self.message}}
        )


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    error_type = "permission_error"
    default_code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class UpstreamError(GatewayError):
    """The provider failed; `retryable` says whether another attempt may succeed."""

    status = 502
    error_type = "upstream_error"
    default_code = "upstream_error"
    retryable = True


class UpstreamUnreachable(UpstreamError):
    default_code = "upstream_unreachable"


class UpstreamAddressForbidden(UpstreamUnreachable):
    """The provider's address is one the operator does not let upstream calls reach."""

    default_code = "upstream_address_forbidden"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class UpstreamMalformed(UpstreamError):
    default_code = "upstream_malformed_response"


class UpstreamResponseTooLarge(UpstreamError):
    """The provider's answer (or one event of its stream) is over the configured bound."""

    default_code = "upstream_response_too_large"


class UpstreamRateLimited(UpstreamError):
    status = 429
    error_type = "rate_limit_error"
    default_code = "upstream_rate_limited"


class UpstreamRejected(UpstreamError):
    """The provider refused the request itself (4xx): retrying cannot help."""

    status = 400
    error_type = "invalid_request_error"
    default_code = "upstream_rejected_request"
    retryable = False


class LimitExceeded(GatewayError):
    """A limit Tollgate enforces stopped the request before any upstream call."""

    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class LimitsUnavailable(GatewayError):
    """The budget and rate counters cannot be reached, and the gateway fails closed."""

    status = 503
    error_type = "api_error"
    default_code = "limits_unavailable"


class NoDeploymentAvailable(GatewayError):
    status = 503
    error_type = "api_error"
    default_code = "no_deployment_available"
