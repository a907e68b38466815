"""The live request feed: a websocket per overview page, fed by usage ingestion.

The consumer is reached through the real ASGI application (gatewaysite/asgi.py) with
the dashboard's session cookie, by asgiref's communicator (channels.testing needs
daphne, which Tollgate does not install). Usage is written from a plain worker thread, as the
embedded default's database thread and the Celery ingestion worker do, so the
message has to cross from that thread to the loop serving the sockets. In the
PostgreSQL half the channel layer is Redis (pub/sub), in the embedded half in memory.
"""

import asyncio
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.db import connections
from django.test import Client
from django.utils import timezone

from billing import live
from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from gatewaysite.asgi import application
from tenants.models import Membership, Organization, Team
from tenants.services import Actor, virtual_key_issue
from tests.factories import OrganizationFactory, TeamFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://localhost")
WAIT_S = 5


class Socket(ApplicationCommunicator):
    """A browser's websocket, at the ASGI level."""

    def __init__(self, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        route, _, query = path.partition("?")
        scope = {
            "type": "websocket", "path": route, "query_string": query.encode(),
            "headers": headers, "subprotocols": [], "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        super().__init__(application, scope)

    async def connect(self) -> tuple[bool, int | None]:
        await self.send_input({"type": "websocket.connect"})
        answer = await self.receive_output(WAIT_S)
        if answer["type"] == "websocket.accept":
            return True, None
        return False, answer.get("code")

    async def receive_json_from(self) -> Any:
        message = await self.receive_output(WAIT_S)
        assert message["type"] == "websocket.send", message
        return json.loads(message["text"])

    async def disconnect(self) -> None:
        await self.send_input({"type": "websocket.disconnect", "code": 1000})
        await self.wait(WAIT_S)


def record(org: Organization, *, team: Team | None = None, key_id: int | None = None,
           cost_nanos: int = 1_500_000, model: str = "gpt-4o-mini") -> UsageRecord:  # fmt: skip
    now = timezone.now()
    return UsageRecord(
        event_id=uuid.uuid4(), org_id=org.pk, team_id=team.pk if team else None, key_id=key_id,
        endpoint="chat.completions", model=model, outcome="success", status_code=200,
        started_at=now - timedelta(seconds=1), finished_at=now, latency_ms=420,
        usage=TokenUsage(input_tokens=12, output_tokens=34), cost_nanos=cost_nanos,
    )  # fmt: skip


def session_cookie(role: str, org: Organization, team: Team | None = None) -> bytes:
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=role, team=team)
    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return f"{name}={client.cookies[name].value}".encode()


async def open_feed(org_slug: str, cookie: bytes | None) -> Socket:
    headers = [ORIGIN] + ([(b"cookie", cookie)] if cookie else [])
    socket = Socket(f"/dashboard/ws/live/?org={org_slug}", headers)
    connected, _ = await socket.connect()
    assert connected
    return socket


async def ready_feed(org_slug: str, cookie: bytes) -> Socket:
    socket = await open_feed(org_slug, cookie)
    assert await socket.receive_json_from() == {"type": "ready"}
    return socket


async def write_from_worker_thread(records: list[UsageRecord]) -> None:
    """As the ingestion does: a thread asgiref knows nothing about, not sync_to_async."""

    def write() -> None:
        try:
            usage_events_write(records)
        finally:
            connections.close_all()

    await asyncio.get_running_loop().run_in_executor(None, write)


async def requests_pushed(socket: Socket) -> list[dict[str, Any]]:
    message = await socket.receive_json_from()
    assert message["type"] == "requests"
    return message["requests"]


async def closed_with(socket: Socket) -> int:
    output = await socket.receive_output(timeout=WAIT_S)
    assert output["type"] == "websocket.close"
    return output["code"]


async def test_a_new_request_arrives_on_the_feed_after_it_is_written() -> None:
    org = await sync_to_async(OrganizationFactory)()
    team = await sync_to_async(TeamFactory)(org=org)
    issued = await sync_to_async(virtual_key_issue)(
        org=org, team=team, name="checkout", actor=Actor.system("tests")
    )
    cookie = await sync_to_async(session_cookie)("admin", org)
    socket = await ready_feed(org.slug, cookie)

    sent = record(org, team=team, key_id=issued.key.pk)
    await write_from_worker_thread([sent])

    (row,) = await requests_pushed(socket)
    assert row["id"] == str(sent.event_id)
    assert row["key_prefix"] == issued.key.prefix and "key_id" not in row
    assert (row["model"], row["status_code"], row["outcome"]) == ("gpt-4o-mini", 200, "success")
    assert (row["input_tokens"], row["output_tokens"], row["cost_nanos"]) == (12, 34, 1_500_000)
    assert row["latency_ms"] == 420 and row["team_id"] == team.pk
    assert issued.plaintext not in str(row)
    await socket.disconnect()


async def test_one_batch_is_one_message_per_org_and_other_orgs_never_see_it() -> None:
    mine, theirs = await sync_to_async(OrganizationFactory.create_batch)(2)
    cookie = await sync_to_async(session_cookie)("finance", mine)
    socket = await ready_feed(mine.slug, cookie)

    batch = [record(theirs, model="their-model"), record(mine), record(mine, model="gpt-4o")]
    await write_from_worker_thread(batch)

    rows = await requests_pushed(socket)
    assert [row["model"] for row in rows] == ["gpt-4o-mini", "gpt-4o"]
    assert await socket.receive_nothing(timeout=0.3)
    await socket.disconnect()


async def test_a_member_sees_only_their_own_teams_requests() -> None:
    org = await sync_to_async(OrganizationFactory)()
    mine, other = await sync_to_async(TeamFactory.create_batch)(2, org=org)
    cookie = await sync_to_async(session_cookie)("member", org, mine)
    socket = await ready_feed(org.slug, cookie)

    await write_from_worker_thread([record(org, team=other, model="other-team-model")])
    assert await socket.receive_nothing(timeout=0.5)
    await write_from_worker_thread([record(org, team=other), record(org, team=mine, model="ours")])
    rows = await requests_pushed(socket)
    assert [row["model"] for row in rows] == ["ours"]
    await socket.disconnect()


async def test_a_member_without_a_team_sees_no_requests() -> None:
    org = await sync_to_async(OrganizationFactory)()
    cookie = await sync_to_async(session_cookie)("member", org)
    socket = await ready_feed(org.slug, cookie)
    await write_from_worker_thread([record(org), record(org, team=None)])
    assert await socket.receive_nothing(timeout=0.5)
    await socket.disconnect()


async def test_anonymous_visitors_are_closed_with_4403() -> None:
    org = await sync_to_async(OrganizationFactory)()
    socket = await open_feed(org.slug, None)
    assert await closed_with(socket) == 4403


async def test_an_org_the_user_is_not_in_is_closed_with_4404() -> None:
    mine, theirs = await sync_to_async(OrganizationFactory.create_batch)(2)
    cookie = await sync_to_async(session_cookie)("owner", mine)
    for slug in (theirs.slug, "no-such-org", ""):
        socket = await open_feed(slug, cookie)
        assert await closed_with(socket) == 4404
    # And nothing of theirs reaches a socket that was refused.
    await write_from_worker_thread([record(theirs)])


async def test_sockets_from_other_sites_are_refused() -> None:
    org = await sync_to_async(OrganizationFactory)()
    cookie = await sync_to_async(session_cookie)("owner", org)
    headers = [(b"origin", b"http://evil.example"), (b"cookie", cookie)]
    socket = Socket(f"/dashboard/ws/live/?org={org.slug}", headers)
    connected, _ = await socket.connect()
    assert not connected


async def test_other_websocket_paths_are_refused() -> None:
    socket = Socket("/ws/anything/", [ORIGIN])
    connected, code = await socket.connect()
    assert not connected and code == 1008


@pytest.mark.skipif(not settings.REDIS_URL, reason="a separate worker process needs Redis")
async def test_a_worker_process_without_sockets_publishes_through_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    org = await sync_to_async(OrganizationFactory)()
    cookie = await sync_to_async(session_cookie)("owner", org)
    socket = await ready_feed(org.slug, cookie)
    # The Celery ingestion worker has no consumer, so no serving loop of its own.
    monkeypatch.setattr(live._ServingLoop, "loop", None)
    sent = record(org)
    await write_from_worker_thread([sent])
    (row,) = await requests_pushed(socket)
    assert row["id"] == str(sent.event_id)
    await socket.disconnect()
