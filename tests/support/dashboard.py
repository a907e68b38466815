"""Signed-in dashboard visitors and a posted health board, for page tests."""

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import redis
import redis.asyncio
from django.conf import settings
from django.test import Client

from routing.health import DeploymentStatus
from routing.health_board import BOARD_KEY, _local_board, post_local, post_shared
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


@contextmanager
def health_board_reporting(statuses: Iterable[DeploymentStatus]) -> Iterator[None]:
    """The shared health board (Redis, or the in-process one) holding `statuses` as one
    live replica's post, for the block."""
    if not settings.REDIS_URL:
        post_local(statuses)
        try:
            yield
        finally:
            _local_board.clear()
        return

    async def post() -> None:
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        await post_shared(client, statuses)
        await client.aclose()

    asyncio.run(post())
    try:
        yield
    finally:
        with redis.Redis.from_url(settings.REDIS_URL) as client:
            client.delete(BOARD_KEY)
