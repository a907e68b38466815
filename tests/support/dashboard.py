"""Signed-in dashboard visitors for page tests."""

from django.test import Client

from tenants.models import Membership, Organization, Team
from tests.factories import UserFactory


def signed_in_as(
    role: str, org: Organization, *, team: Team | None = None, username: str | None = None
) -> Client:
    """A client signed in as a new user holding `role` in `org` (members: in `team`)."""
    user = UserFactory(**({"username": username} if username else {}))
    Membership.objects.create(user=user, org=org, role=role, team=team)
    client = Client()
    client.force_login(user)
    return client
