"""API token authentication (kept apart from the views: DRF's settings import it)."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from tenants.api_tokens import API_TOKEN_SCHEME, api_token_authenticate
from tenants.keys import KEY_SCHEME
from tenants.models import APIToken


class TokenPrincipal:
    """request.user for a call made with an API token (it acts for no user)."""

    is_authenticated = True
    is_anonymous = False
    is_superuser = False
    pk = None

    def __init__(self, token: APIToken) -> None:
        self.token = token

    def __str__(self) -> str:
        return f"API token {self.token.name} ({self.token.prefix})"


class APITokenAuthentication(BaseAuthentication):
    """`Authorization: Bearer tgm_...`; anything else is left to session authentication."""

    def authenticate(self, request: Request) -> tuple[TokenPrincipal, APIToken] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != b"bearer":
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Send the header as “Authorization: Bearer <token>”."
            )
        presented = parts[1].decode("latin-1")
        if presented.startswith(KEY_SCHEME + "_"):
            raise exceptions.AuthenticationFailed(
                "That is a virtual key, for /v1 calls. The management API takes an API "
                f"token ({API_TOKEN_SCHEME}_...), created under Settings in the dashboard."
            )
        token = api_token_authenticate(presented)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked API token.")
        return TokenPrincipal(token), token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="tollgate-management-api"'


class APITokenScheme(OpenApiAuthenticationExtension):
    target_class = APITokenAuthentication
    name = "apiToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": f"An API token ({API_TOKEN_SCHEME}_...) from Settings in the dashboard.",
        }
