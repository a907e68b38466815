"""The request log pages: who sees which requests, filters, paging, detail and bodies."""

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from billing.contracts import LoggedBodies, TokenUsage, UpstreamAttempt, UsageRecord
from billing.ingest import usage_events_write
from billing.models import ModelPrice
from tenants.models import Organization, Team, VirtualKey
from tenants.services import virtual_key_issue
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.dashboard import signed_in_as

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
LIST = reverse("dashboard:requests")


def detail_url(event_id: uuid.UUID) -> str:
    return reverse("dashboard:requests_detail", args=[event_id])


def issue(org: Organization, name: str, team: Team | None = None) -> VirtualKey:
    return virtual_key_issue(org=org, name=name, team=team, actor=TEST_ACTOR).key


def log(key: VirtualKey, when: datetime = T0, **fields: Any) -> uuid.UUID:
    """Write one request of `key` into the ledger; returns its event id."""
    values: dict[str, Any] = {
        "event_id": uuid.uuid4(), "org_id": key.org_id, "team_id": key.team_id,
        "key_id": key.pk, "endpoint": "chat.completions", "model": "gpt-4o-mini",
        "outcome": "success", "status_code": 200, "started_at": when,
        "finished_at": when + timedelta(milliseconds=900), "deployment_name": "primary",
        "provider_kind": "openai", "upstream_model": "gpt-4o-mini",
        "usage": TokenUsage(input_tokens=12, output_tokens=34), "cost_nanos": 1234,
        "latency_ms": 900, "ttft_ms": 120,
    }  # fmt: skip
    values.update(fields)
    record = UsageRecord(**values)
    usage_events_write([record])
    return record.event_id


def row_ids(html: str) -> list[str]:
    return re.findall(r'data-event-id="([0-9a-f-]+)"', html)


@pytest.fixture
def org() -> Organization:
    return OrganizationFactory(time_zone="Europe/Paris")


@pytest.fixture
def team(org: Organization) -> Team:
    return TeamFactory(org=org, name="Search")


@pytest.fixture
def key(org: Organization, team: Team) -> VirtualKey:
    return issue(org, "search-app", team)


def get(client: Client, url: str, org: Organization, **query: object):
    return client.get(url, {"org": org.slug, **query})


# ------------------------------------------------------------------ list


def test_the_log_lists_requests_newest_first_with_their_facts(org, key) -> None:
    older = log(key, T0, tags=("feature:search",), is_stream=True)
    newer = log(key, T0 + timedelta(minutes=1), cache_hit=True, attempts=2)
    response = get(signed_in_as("admin", org), LIST, org)
    assert response.status_code == 200
    html = response.content.decode()
    assert row_ids(html) == [str(newer), str(older)]
    assert 'id="request-log"' in html
    assert key.prefix in html and "search-app" in html
    assert "gpt-4o-mini → primary" in html
    assert "$0.000001" in html  # 1234 nanos at 6 places
    assert "12 / 34" in html and "900 ms" in html and "120 ms" in html
    assert "feature:search" in html and "cache hit" in html and "stream" in html
    # Shown in the org's time zone: 12:00 UTC is 13:00 in Paris in March.
    assert "2026-03-10 13:00:00" in html


@pytest.mark.parametrize("role", ["owner", "admin", "finance"])
def test_org_wide_roles_see_every_teams_requests(org, key, role) -> None:
    other_team_key = issue(org, "other", TeamFactory(org=org))
    org_key = issue(org, "org-wide")
    ids = {str(log(k)) for k in (key, other_team_key, org_key)}
    assert set(row_ids(get(signed_in_as(role, org), LIST, org).content.decode())) == ids


def test_a_member_sees_only_their_teams_requests(org, team, key) -> None:
    mine = log(key)
    log(issue(org, "other", TeamFactory(org=org)))
    log(issue(org, "org-wide"))
    response = get(signed_in_as("member", org, team=team), LIST, org)
    assert row_ids(response.content.decode()) == [str(mine)]
    assert 'id="id_team"' not in response.content.decode()  # no team filter for members


def test_a_member_without_a_team_sees_no_requests(org, key) -> None:
    log(key)
    response = get(signed_in_as("member", org), LIST, org)
    assert response.status_code == 200
    assert row_ids(response.content.decode()) == []
    assert "You are not in a team yet" in response.content.decode()


def test_another_orgs_requests_never_show(org, key) -> None:
    other_org = OrganizationFactory()
    log(issue(other_org, "theirs"))
    mine = log(key)
    assert row_ids(get(signed_in_as("owner", org), LIST, org).content.decode()) == [str(mine)]


def test_an_org_the_viewer_is_not_in_is_a_404(org) -> None:
    outsider_org = OrganizationFactory()
    assert get(signed_in_as("owner", org), LIST, outsider_org).status_code == 404


def test_signed_out_visitors_are_sent_to_sign_in(org) -> None:
    assert Client().get(LIST, {"org": org.slug}).status_code == 302


def test_the_filter_form_has_the_labels_the_browser_tests_use(org, key) -> None:
    log(key)
    html = get(signed_in_as("admin", org), LIST, org).content.decode()
    for field_id, label in [
        ("id_key", "Key"), ("id_team", "Team"), ("id_model", "Model"), ("id_status", "Status"),
        ("id_tag", "Tag"), ("id_since", "From"), ("id_until", "To"), ("id_user", "End user"),
    ]:  # fmt: skip
        assert f'<label for="{field_id}">{label}</label>' in html
    assert '<button type="submit">Filter</button>' in html


def test_filters_narrow_the_log(org, team, key) -> None:
    other_key = issue(org, "batch", TeamFactory(org=org))
    plain = log(key)
    by_other_key = log(other_key, T0 + timedelta(seconds=1))
    other_model = log(key, T0 + timedelta(seconds=2), model="claude-haiku")
    upstream_failure = log(
        key, T0 + timedelta(seconds=3), outcome="upstream_error", status_code=502
    )
    blocked = log(key, T0 + timedelta(seconds=4), outcome="blocked", status_code=429)
    tagged = log(key, T0 + timedelta(seconds=5), tags=("feature:search", "beta"))
    prefix_tagged = log(key, T0 + timedelta(seconds=6), tags=("feature:search-v2",))
    end_user = log(key, T0 + timedelta(seconds=7), end_user="customer-42")
    late = log(key, T0 + timedelta(hours=3))
    client = signed_in_as("admin", org)

    def shown(**query: object) -> set[str]:
        response = get(client, LIST, org, **query)
        assert response.status_code == 200
        return set(row_ids(response.content.decode()))

    everything = {plain, by_other_key, other_model, upstream_failure, blocked, tagged,
                  prefix_tagged, end_user, late}  # fmt: skip
    assert shown() == {str(e) for e in everything}
    assert shown(key=other_key.pk) == {str(by_other_key)}
    assert shown(team=team.pk) == {str(e) for e in everything - {by_other_key}}
    assert shown(model="claude-haiku") == {str(other_model)}
    assert shown(status="upstream_error") == {str(upstream_failure)}
    assert shown(status="429") == {str(blocked)}
    assert shown(status="blocked") == {str(blocked)}
    # Exact tags: "feature:search" does not match "feature:search-v2".
    assert shown(tag="feature:search") == {str(tagged)}
    assert shown(tag="beta") == {str(tagged)}
    assert shown(user="customer-42") == {str(end_user)}
    # From/to are in the org's time zone (Paris, UTC+1): 14:00 there is 13:00 UTC.
    assert shown(since="2026-03-10T14:00") == {str(late)}
    assert str(late) not in shown(until="2026-03-10T14:00")
    assert shown(since="2026-03-10T13:00", until="2026-03-10T13:00:05") == {
        str(plain),
        str(by_other_key),
        str(other_model),
        str(upstream_failure),
        str(blocked),
    }


def test_bad_filters_say_what_to_fix_and_list_nothing(org, key) -> None:
    log(key)
    client = signed_in_as("admin", org)
    response = get(client, LIST, org, tag="no spaces allowed")
    assert response.status_code == 200
    html = response.content.decode()
    assert row_ids(html) == []
    assert "Tags are 1-64 letters" in html
    response = get(client, LIST, org, since="2026-03-10T14:00", until="2026-03-10T13:00")
    assert "Give a time after" in response.content.decode()
    # A key of another org is not a choice.
    foreign = issue(OrganizationFactory(), "theirs")
    assert row_ids(get(client, LIST, org, key=foreign.pk).content.decode()) == []


def test_pages_are_keyset_paged_without_gaps_or_repeats(org, key) -> None:
    # 120 requests, in pairs sharing a start time, so ties are broken by id.
    ids = [log(key, T0 + timedelta(seconds=i // 2)) for i in range(120)]
    client = signed_in_as("admin", org)
    seen: list[str] = []
    url, query = LIST, {"org": org.slug, "model": "gpt-4o-mini"}
    pages = 0
    while url:
        response = client.get(url, query)
        html = response.content.decode()
        seen += row_ids(html)
        pages += 1
        match = re.search(r'<a href="([^"]+)" rel="next">Older requests</a>', html)
        url, query = (match.group(1).replace("&amp;", "&"), {}) if match else ("", {})
        if match:
            assert "model=gpt-4o-mini" in url  # filters carry over
    assert pages == 3
    assert len(seen) == 120 and set(seen) == {str(i) for i in ids}
    # Newest first throughout.
    assert seen[:2] == sorted(seen[:2], reverse=True)


def test_a_malformed_cursor_shows_the_newest_page(org, key) -> None:
    newest = log(key)
    response = get(signed_in_as("admin", org), LIST, org, before="yesterday|nope")
    assert row_ids(response.content.decode()) == [str(newest)]


def test_no_requests_yet_tells_how_to_send_one(org) -> None:
    html = get(signed_in_as("owner", org), LIST, org).content.decode()
    assert 'id="requests-empty"' in html
    assert "from openai import OpenAI" in html
    assert 'base_url="http://testserver/v1"' in html
    assert reverse("dashboard:keys") in html


def test_the_log_page_runs_a_fixed_number_of_queries(
    org, key, django_assert_max_num_queries
) -> None:
    for i in range(30):
        log(issue(org, f"k{i}", TeamFactory(org=org)), T0 + timedelta(seconds=i), tags=("a",))
    client = signed_in_as("admin", org)
    get(client, LIST, org)  # warm the session
    # session, user, membership, keys, teams, models, the page of events.
    with django_assert_max_num_queries(7):
        response = get(client, LIST, org, tag="a")
    assert len(row_ids(response.content.decode())) == 30


# ------------------------------------------------------------------ detail

ATTEMPTS = (
    UpstreamAttempt(
        deployment_id=7, deployment_name="primary", provider_kind="openai",
        outcome="upstream_error", status_code=502, error_class="upstream_error",
        started_ms=5, duration_ms=300,
    ),
    UpstreamAttempt(
        deployment_id=8, deployment_name="backup", provider_kind="anthropic", outcome="success",
        status_code=200, started_ms=420, duration_ms=470, ttfb_ms=110,
    ),
)  # fmt: skip
SCRIPT_MESSAGE = '{"role": "user", "content": "<script>x</script>"}'
BODIES = LoggedBodies(
    request=f'{{"model": "gpt-4o-mini", "messages": [{SCRIPT_MESSAGE}]}}',
    response="data: {}\n\ndata: [DONE]\n\n",
    response_truncated=True,
)


@pytest.fixture
def full_event(org, key) -> uuid.UUID:
    price = ModelPrice.objects.create(
        provider_kind="anthropic", model="claude-haiku", input_usd_per_mtok=Decimal("0.80"),
        output_usd_per_mtok=Decimal("4.00"), effective_from=datetime(2020, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    return log(
        key, attempts=2, attempt_log=ATTEMPTS, bodies=BODIES, price_id=price.pk,
        deployment_name="backup", provider_kind="anthropic", upstream_model="claude-haiku",
        tags=("beta",), end_user="customer-42",
    )  # fmt: skip


def test_the_detail_shows_attempts_latency_and_the_price_used(org, full_event) -> None:
    response = get(signed_in_as("admin", org), detail_url(full_event), org)
    assert response.status_code == 200
    html = response.content.decode()
    assert "<h1>Request</h1>" in html and str(full_event) in html
    attempts = html.split('id="attempts"')[1].split("</table>")[0]
    assert attempts.index("primary") < attempts.index("backup")
    assert "502 Upstream failure" in attempts and "200 Success" in attempts
    assert "300 ms" in attempts and "470 ms" in attempts and "110 ms" in attempts
    latency = html.split('id="latency"')[1].split("</dl>")[0]
    assert "In failed attempts</dt><dd>300 ms" in latency
    assert "In the attempt that answered</dt><dd>470 ms" in latency
    assert "In the gateway and between attempts</dt><dd>130 ms" in latency  # 900 - 300 - 470
    assert "$0.800000 per million tokens" in html and "$4.000000 per million tokens" in html
    assert "customer-42" in html and "beta" in html


@pytest.mark.parametrize("role", ["owner", "admin"])
def test_admins_see_bodies_pretty_printed_and_escaped(org, full_event, role) -> None:
    html = get(signed_in_as(role, org), detail_url(full_event), org).content.decode()
    request_body = html.split('id="request-body"')[1].split("</pre>")[0]
    assert "{\n  &quot;model&quot;: &quot;gpt-4o-mini&quot;,\n" in request_body  # pretty JSON
    assert "&lt;script&gt;x&lt;/script&gt;" in request_body and "<script>x" not in html
    assert "data: [DONE]" in html.split('id="response-body"')[1]
    assert "Cut at 32 KiB." in html  # the response was truncated


def test_a_member_sees_bodies_of_their_own_teams_requests(org, team, full_event) -> None:
    html = get(signed_in_as("member", org, team=team), detail_url(full_event), org)
    assert 'id="request-body"' in html.content.decode()


def test_finance_sees_metadata_but_never_bodies(org, full_event) -> None:
    response = get(signed_in_as("finance", org), detail_url(full_event), org)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="attempts"' in html and "$0.000001" in html
    assert 'id="request-body"' not in html and "&lt;script&gt;" not in html
    assert "Bodies are shown only to owners, admins and the request's own team." in html


def test_a_member_of_another_team_gets_a_404(org, full_event) -> None:
    other_team = TeamFactory(org=org)
    assert (
        get(signed_in_as("member", org, team=other_team), detail_url(full_event), org).status_code
        == 404
    )
    assert get(signed_in_as("member", org), detail_url(full_event), org).status_code == 404


def test_another_orgs_request_is_a_404(org, full_event) -> None:
    other_org = OrganizationFactory()
    their_event = log(issue(other_org, "theirs"))
    client = signed_in_as("owner", org)
    assert get(client, detail_url(their_event), org).status_code == 404
    assert get(client, detail_url(uuid.uuid4()), org).status_code == 404
    # Asking for the event under its own org, which the viewer is not in, is a 404 too.
    assert get(client, detail_url(their_event), other_org).status_code == 404


def test_without_bodies_the_page_says_whether_body_logging_is_off(org, key) -> None:
    event = log(key)
    client = signed_in_as("admin", org)
    html = get(client, detail_url(event), org).content.decode()
    assert 'id="body-logging-off"' in html
    org.log_request_bodies = True
    org.save()
    html = get(client, detail_url(event), org).content.decode()
    assert 'id="body-logging-off"' not in html
    assert "No bodies are stored for this request" in html


def test_a_request_refused_before_any_upstream_call_says_so(org, key) -> None:
    event = log(
        key, outcome="blocked", status_code=429, attempts=0, error_class="budget_exceeded",
        deployment_name="", usage=TokenUsage(), cost_nanos=0,
    )  # fmt: skip
    html = get(signed_in_as("admin", org), detail_url(event), org).content.decode()
    assert 'id="attempts-none"' in html and "refused before reaching a provider" in html
    assert "429 Blocked" in html and "budget_exceeded" in html


def test_the_detail_page_runs_a_fixed_number_of_queries(
    org, full_event, django_assert_max_num_queries
) -> None:
    client = signed_in_as("admin", org)
    get(client, detail_url(full_event), org)
    # session, user, membership, the event (with key, team, price), its bodies.
    with django_assert_max_num_queries(5):
        get(client, detail_url(full_event), org)
