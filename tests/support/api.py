"""Management API callers for tests: a real token, sent as a real header."""

from rest_framework.test import APIClient

from tenants.api_tokens import api_token_create
from tenants.models import Organization
from tenants.services import Actor


def token_client(org: Organization, role: str = "admin") -> APIClient:
    """An API client holding a fresh `role` token of `org` (admin, finance or read_only)."""
    issued = api_token_create(org=org, name=f"{role} token", role=role, actor=Actor.system("tests"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.plaintext}")
    return client
