"""HTTP to HTTPS redirect for the pages Django serves (dashboard, admin, management API).

Django's own SECURE_SSL_REDIRECT redirects every plain-HTTP request. Tollgate's
(`TOLLGATE_SSL_REDIRECT`, env `SECURE_SSL_REDIRECT`, on with DEBUG off) leaves alone
the requests that never leave the machine: from a loopback client address (a local
tool, the test suite's live servers, `make stack` on 127.0.0.1) or to a loopback host
name (`http://localhost:8000` through a container's published port). Those cannot be
read on the network, and redirecting them would break local use with no TLS listener.
Everything else arriving over plain HTTP gets a 301 to the same URL on https.

Whether a request is secure is uvicorn's call: it trusts `X-Forwarded-Proto` from the
proxies in FORWARDED_ALLOW_IPS, so a TLS-terminating nginx must be listed there (or
requests loop between http and https). /v1, /healthz, /readyz and /metrics are served
before Django (gatewaysite/asgi.py) and are never redirected.
"""

import ipaddress
import re
from collections.abc import Awaitable, Callable
from functools import lru_cache

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase, HttpResponsePermanentRedirect
from django.http.request import split_domain_port
from django.utils.decorators import sync_and_async_middleware

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


@lru_cache(maxsize=8)
def _exempt_paths(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(pattern) for pattern in patterns)


def _is_loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _redirect_to_https(request: HttpRequest) -> HttpResponseBase | None:
    """The 301 to https for a plain-HTTP request that leaves the machine, else None."""
    if not settings.TOLLGATE_SSL_REDIRECT or request.is_secure():
        return None
    if _is_loopback_address(request.META.get("REMOTE_ADDR", "")):
        return None
    host = request.get_host()  # validated against ALLOWED_HOSTS (400 otherwise)
    name = split_domain_port(host)[0]
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return None
    path = request.path.lstrip("/")
    if any(
        pattern.search(path) for pattern in _exempt_paths(tuple(settings.SECURE_REDIRECT_EXEMPT))
    ):
        return None
    return HttpResponsePermanentRedirect(
        f"https://{settings.SECURE_SSL_HOST or host}{request.get_full_path()}"
    )


@sync_and_async_middleware
def https_redirect_middleware(
    get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]],
) -> Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]:
    """Redirect plain-HTTP requests from other machines to https (no thread hop)."""
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            redirect = _redirect_to_https(request)
            if redirect is not None:
                return redirect
            return await get_response(request)  # type: ignore[misc]

        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        redirect = _redirect_to_https(request)
        if redirect is not None:
            return redirect
        return get_response(request)  # type: ignore[return-value]

    return middleware
