"""The overview page: scoped to the viewer's organizations, money shown in dollars."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from tenants.models import Membership
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


def spend(org, cost_nanos: int, *, model: str = "gpt-4o-mini", when: datetime | None = None):
    when = when or timezone.now()
    usage_events_write([
        UsageRecord(
            event_id=uuid.uuid4(), org_id=org.pk, team_id=None, key_id=None,
            endpoint="chat.completions", model=model, outcome="success", status_code=200,
            started_at=when, finished_at=when, usage=TokenUsage(input_tokens=10, output_tokens=5),
            cost_nanos=cost_nanos,
        )
    ])  # fmt: skip


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_anonymous_visitors_are_sent_to_sign_in() -> None:
    response = Client().get(reverse("dashboard:overview"))
    assert response.status_code == 302
    assert "/admin/login/" in response["location"]


def test_member_sees_their_orgs_spend_in_dollars(django_assert_max_num_queries) -> None:
    org = OrganizationFactory(name="Initech")
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=Membership.Role.FINANCE)
    spend(org, 1_234_567_890)  # $1.23456789
    spend(org, 5_000_000, model="gpt-4o")
    client = signed_in(user)
    with django_assert_max_num_queries(10):
        response = client.get(reverse("dashboard:overview"))
    assert response.status_code == 200
    page = response.content.decode()
    assert "Initech" in page
    assert "$1.24" in page  # today's spend, rounded only on screen
    assert "gpt-4o-mini" in page and "gpt-4o" in page


def test_other_orgs_are_invisible_and_unreachable() -> None:
    mine, theirs = OrganizationFactory(name="Mine"), OrganizationFactory(name="Theirs")
    user = UserFactory()
    Membership.objects.create(user=user, org=mine, role=Membership.Role.MEMBER)
    spend(theirs, 9_990_000_000, model="their-secret-model")
    client = signed_in(user)

    page = client.get(reverse("dashboard:overview")).content.decode()
    assert "Theirs" not in page and "their-secret-model" not in page
    assert client.get(reverse("dashboard:overview"), {"org": theirs.slug}).status_code == 404


def test_user_without_an_org_gets_guidance() -> None:
    response = signed_in(UserFactory()).get(reverse("dashboard:overview"))
    assert response.status_code == 200
    assert "not a member of any organization" in response.content.decode()


def test_today_follows_the_orgs_time_zone() -> None:
    org = OrganizationFactory(time_zone="Pacific/Auckland")
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=Membership.Role.OWNER)
    local_midnight = (
        timezone.now().astimezone(org_zone(org)).replace(hour=0, minute=0, second=0, microsecond=0)
    )
    spend(org, 2_000_000_000, when=(local_midnight - timedelta(minutes=1)).astimezone(UTC))
    spend(org, 3_000_000_000, when=(local_midnight + timedelta(minutes=1)).astimezone(UTC))
    response = signed_in(user).get(reverse("dashboard:overview"))
    assert response.context["today"].cost_nanos == 3_000_000_000


def org_zone(org):
    from zoneinfo import ZoneInfo

    return ZoneInfo(org.time_zone)
