"""Site-wide views that belong to no app."""

from django.http import HttpRequest, HttpResponse, JsonResponse

# A blocked client waits out the limiter's window (limits are per minute).
_RETRY_AFTER_S = 60


def rate_limited(request: HttpRequest, exception: Exception) -> HttpResponse:
    """429 for a client over a django-ratelimit limit (RATELIMIT_VIEW), e.g. sign-in attempts."""
    message = "Too many attempts. Wait a minute, then try again."
    response: HttpResponse
    if request.path.startswith("/api/"):
        response = JsonResponse(
            {"error": {"message": message, "type": "rate_limit_error", "code": "rate_limited"}},
            status=429,
        )
    else:
        response = HttpResponse(message, status=429, content_type="text/plain; charset=utf-8")
    response["Retry-After"] = str(_RETRY_AFTER_S)
    return response
