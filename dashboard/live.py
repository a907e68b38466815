"""The overview's live request feed: a websocket per open overview page.

`/dashboard/ws/live/?org=<slug>` with the dashboard's session. Anonymous visitors
are closed with 4403, orgs the user is not in (or that do not exist) with 4404;
the handshake is accepted first so the browser sees the code and stops retrying.
A member sees only their own team's requests (none without a team), exactly
like the overview page itself.
"""

import asyncio
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from billing.live import live_group, live_serving_loop_register
from billing.overview import key_prefixes
from tenants.models import Membership

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


@database_sync_to_async
def _membership(user: Any, slug: str) -> Membership | None:
    return Membership.objects.select_related("org").filter(user=user, org__slug=slug).first()


@database_sync_to_async
def _prefixes(org_id: int, key_ids: set[int]) -> dict[int, str]:
    return key_prefixes(org_id=org_id, key_ids=key_ids)


class LiveFeedConsumer(AsyncJsonWebsocketConsumer):
    """Pushes each new request of the viewer's org (or team) as it is ingested."""

    org_id: int | None = None
    group: str | None = None
    members_only: bool = False
    team_id: int | None = None

    async def connect(self) -> None:
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        slug = parse_qs(self.scope.get("query_string", b"").decode()).get("org", [""])[0]
        membership = await _membership(user, slug) if slug else None
        if membership is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.org_id = membership.org_id
        self.members_only = membership.role == Membership.Role.MEMBER
        self.team_id = membership.team_id
        self.prefixes: dict[int, str] = {}
        live_serving_loop_register(asyncio.get_running_loop())
        self.group = live_group(membership.org_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.send_json({"type": "ready"})

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The feed is one-way: anything the browser sends is ignored."""

    async def live_usage(self, message: dict[str, Any]) -> None:
        """A batch of the org's new requests (see billing/live.py): filter, label, forward."""
        rows = message["requests"]
        if self.members_only:
            rows = [row for row in rows if self.team_id and row["team_id"] == self.team_id]
        if not rows or self.org_id is None:
            return
        unknown = {row["key_id"] for row in rows if row["key_id"] is not None} - set(self.prefixes)
        if unknown:
            self.prefixes.update(await _prefixes(self.org_id, unknown))
        await self.send_json(
            {
                "type": "requests",
                "requests": [
                    {
                        **{name: value for name, value in row.items() if name != "key_id"},
                        "key_prefix": self.prefixes.get(row["key_id"], ""),
                    }
                    for row in rows
                ],
            }
        )
