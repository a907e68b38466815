"""What admins, finance and members do in the dashboard, in a real browser.

Each test signs in through the sign-in page, clicks through the pages as a person
would, and checks what they see. Traffic is sent with the official `openai` SDK to
the same server's /v1, and arrives on the overview over the live websocket.
"""

import csv
import io
import uuid
from datetime import timedelta

import httpx
import openai
import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from billing.models import UsageEvent
from billing.rollups import rollups_refresh
from tenants.models import Budget, Membership, Organization, Team
from tenants.services import budget_create, virtual_key_issue
from tests.conftest import TEST_ACTOR, MakeRoute
from tests.e2e.conftest import screenshot, sign_in
from tests.factories import OrganizationFactory, TeamFactory, UserFactory
from tests.support.gateway import GatewayServer, wait_for_key, wait_for_usage_writes_to_settle

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "a long and unguessable passphrase"
UPSTREAM_SECRET = "sk-upstream-secret-for-tests"  # what make_route stores on each provider


def person(username: str, role: str, org: Organization, team: Team | None = None) -> None:
    user = UserFactory(username=username)
    user.set_password(PASSWORD)
    user.save()
    Membership.objects.create(user=user, org=org, role=role, team=team)


def open_page(page: Page, name: str) -> None:
    """Click a page in the side navigation."""
    page.get_by_role("navigation", name="Pages").get_by_role("link", name=name, exact=True).click()


def spend_this_month(org: Organization, team: Team, cost_nanos: int, *, model: str) -> None:
    now = timezone.now()
    usage_events_write([
        UsageRecord(
            event_id=uuid.uuid4(), org_id=org.pk, team_id=team.pk, key_id=None,
            endpoint="chat.completions", model=model, outcome="success", status_code=200,
            started_at=now - timedelta(minutes=5), finished_at=now - timedelta(minutes=5),
            usage=TokenUsage(input_tokens=1200, output_tokens=300), cost_nanos=cost_nanos,
        )
    ])  # fmt: skip


def test_an_admin_issues_a_key_sends_traffic_watches_it_arrive_and_sets_a_budget(
    page: Page, site: GatewayServer, make_route: MakeRoute
) -> None:
    org = OrganizationFactory(slug="acme-robotics", name="Acme Robotics")
    TeamFactory(org=org, slug="platform", name="Platform")
    make_route(model="e2e-chat", org=org, price=("1000.00", "2000.00"))
    person("ada", "owner", org)

    sign_in(page, "ada", PASSWORD)
    expect(page.get_by_role("heading", level=1)).to_contain_text("Acme Robotics")
    screenshot(page, "01-overview-new-org")

    # Issue a key; its secret is shown once, and the copy button copies exactly it.
    open_page(page, "Keys")
    page.get_by_role("link", name="New key").click()
    page.get_by_label("Name").fill("checkout-service")
    page.get_by_label("Team").select_option(label="Platform")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key-secret").inner_text().strip()
    assert secret.startswith("tgk_")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.base_url)
    page.get_by_role("button", name="Copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    screenshot(page, "02-key-created-secret-shown-once")
    open_page(page, "Keys")
    expect(page.locator("#keys-table")).to_contain_text("checkout-service")
    assert secret not in page.content()
    screenshot(page, "03-keys")

    # Traffic through the SDK shows up on the overview without a reload.
    open_page(page, "Overview")
    expect(page.locator("#live-status")).to_have_text("Live")
    assert page.get_by_test_id("requests-today").inner_text().strip() == "0"
    wait_for_key(site, secret)
    client = openai.OpenAI(base_url=site.v1, api_key=secret, max_retries=0)
    for n in range(3):
        reply = client.chat.completions.create(
            model="e2e-chat", messages=[{"role": "user", "content": f"hello {n}"}], max_tokens=20
        )
        assert reply.choices[0].message.content
    live_rows = page.locator("#live-feed tbody tr[data-event-id]")
    expect(live_rows.filter(has_text="e2e-chat")).to_have_count(3)
    # The tile counts every request of the org today, as the ledger does (the key
    # check above, a /v1/models call, is one too).
    wait_for_usage_writes_to_settle()
    expect(page.get_by_test_id("requests-today")).to_have_text(
        str(UsageEvent.objects.filter(org=org).count())
    )
    expect(page.get_by_test_id("spend-today")).not_to_have_text("$0.00")
    screenshot(page, "04-overview-live-traffic")

    # A monthly budget for the whole org, created in the browser.
    open_page(page, "Budgets")
    page.get_by_role("link", name="New budget").click()
    page.get_by_label("Scope").select_option("org")
    page.get_by_label("Period").select_option("monthly")
    page.get_by_label("Limit (USD)").fill("250")
    page.get_by_label("Enforcement").select_option("hard")
    page.get_by_label("Alert thresholds").fill("50, 80, 100")
    page.get_by_role("button", name="Create budget").click()
    expect(page.get_by_role("status")).to_contain_text("monthly budget created")
    screenshot(page, "05-budget-detail")
    open_page(page, "Budgets")
    expect(page.locator("#budgets-table")).to_contain_text("$250.00")
    budget = Budget.objects.get(org=org)
    assert (budget.scope, budget.limit_nanos, budget.soft_thresholds) == (
        "org", 250_000_000_000, [50, 80, 100],
    )  # fmt: skip
    screenshot(page, "06-budgets")

    # The requests are in the log, each with its attempts.
    wait_for_usage_writes_to_settle()
    open_page(page, "Requests")
    expect(
        page.locator("#request-log tbody tr[data-event-id]").filter(has_text="e2e-chat")
    ).to_have_count(3)
    screenshot(page, "07-request-log")
    page.locator("#request-log tbody tr[data-event-id] a").first.click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Request")
    expect(page.locator("#attempts")).to_contain_text("e2e-chat")
    screenshot(page, "08-request-detail")

    for link, name in [
        ("Providers & routes", "09-providers-and-routes"),
        ("Deployment health", "10-deployment-health"),
        ("Cost reports", "11-cost-reports"),
        ("Statements", "12-statements"),
        ("Audit log", "13-audit-log"),
        ("Settings", "14-settings"),
    ]:
        open_page(page, link)
        expect(page.get_by_role("heading", level=1)).to_be_visible()
        assert UPSTREAM_SECRET not in page.content()
        screenshot(page, name)
    open_page(page, "Audit log")
    expect(page.locator("#audit-log")).to_contain_text("budget.create")
    expect(page.locator("#audit-log")).to_contain_text("virtual_key.issue")

    # An API token for scripts: shown once, and it works against the management API.
    open_page(page, "Settings")
    page.get_by_role("link", name="Manage API tokens").click()
    page.get_by_label("Name").fill("terraform")
    page.get_by_label("Role").select_option("admin")
    page.get_by_role("button", name="Create token").click()
    token = page.locator("#api-token-secret").inner_text().strip()
    assert token.startswith("tgm_")
    screenshot(page, "15-api-token-created")
    teams = httpx.get(
        f"{site.base_url}/api/v1/teams/", headers={"Authorization": f"Bearer {token}"}
    )
    assert [team["name"] for team in teams.json()["data"]] == ["Platform"]
    # The API documentation renders from the project's own static files.
    page.goto(f"{site.base_url}/api/docs/")
    expect(page.get_by_text("Tollgate management API").first).to_be_visible()
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    screenshot(page, "16-api-docs")


def test_finance_reads_reports_and_exports_csv_but_sees_no_secrets_and_cannot_issue_keys(
    page: Page, site: GatewayServer, make_route: MakeRoute
) -> None:
    org = OrganizationFactory(slug="globex", name="Globex")
    search = TeamFactory(org=org, slug="search", name="Search")
    make_route(model="e2e-finance-chat", org=org)
    issued = virtual_key_issue(org=org, team=search, name="search-api", actor=TEST_ACTOR)
    budget_create(org=org, scope="org", limit_nanos=500_000_000_000, actor=TEST_ACTOR)
    spend_this_month(org, search, 1_234_560_000, model="gpt-4o")
    rollups_refresh()
    person("fran", "finance", org)

    sign_in(page, "fran", PASSWORD)
    nav = page.get_by_role("navigation", name="Pages")
    expect(nav.get_by_role("link", name="Cost reports")).to_be_visible()
    expect(nav.get_by_role("link", name="Providers & routes")).to_have_count(0)
    expect(nav.get_by_role("link", name="Settings")).to_have_count(0)

    open_page(page, "Cost reports")
    expect(page.locator("main")).to_contain_text("Search")
    screenshot(page, "20-finance-cost-reports")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download this table (CSV)").click()
    rows = list(csv.reader(io.StringIO(download_info.value.path().read_text())))
    assert any("Search" in row for row in rows[1:])
    assert any("1.23456" in cell for row in rows for cell in row)

    open_page(page, "Budgets")
    expect(page.locator("#budgets-table")).to_contain_text("$500.00")
    expect(page.get_by_role("link", name="New budget")).to_have_count(0)

    open_page(page, "Keys")
    expect(page.locator("#keys-table")).to_contain_text("search-api")
    expect(page.get_by_role("link", name="New key")).to_have_count(0)
    screenshot(page, "21-finance-keys-read-only")
    for path in ("/dashboard/keys/new/", "/dashboard/providers/", "/dashboard/settings/"):
        response = page.goto(f"{path}?org=globex")
        assert response is not None and response.status == 403, path
        assert UPSTREAM_SECRET not in page.content()
    for path in ("/dashboard/", "/dashboard/keys/", "/dashboard/requests/", "/dashboard/reports/"):
        page.goto(f"{path}?org=globex")
        assert UPSTREAM_SECRET not in page.content() and issued.plaintext not in page.content()


def test_a_member_of_one_org_reaches_nothing_of_another(
    page: Page, site: GatewayServer, make_route: MakeRoute
) -> None:
    mine = OrganizationFactory(slug="initech", name="Initech")
    my_team = TeamFactory(org=mine, slug="apps", name="Apps")
    theirs = OrganizationFactory(slug="umbrella", name="Umbrella")
    their_team = TeamFactory(org=theirs, slug="labs", name="Labs")
    their_route = make_route(model="e2e-umbrella-chat", org=theirs)
    their_key = virtual_key_issue(org=theirs, team=their_team, name="labs-key", actor=TEST_ACTOR)
    their_budget = budget_create(org=theirs, scope="org", limit_nanos=10**11, actor=TEST_ACTOR)
    spend_this_month(theirs, their_team, 5_000_000, model="gpt-4o")
    wait_for_usage_writes_to_settle()
    their_event = UsageEvent.objects.filter(org=theirs).first()
    assert their_event is not None
    deployment = their_route.deployments.get()
    person("mo", "member", mine, team=my_team)

    sign_in(page, "mo", PASSWORD)
    expect(page.get_by_role("heading", level=1)).to_contain_text("Initech")
    screenshot(page, "30-member-overview")
    urls = [
        "/dashboard/?org=umbrella",
        "/dashboard/keys/?org=umbrella",
        "/dashboard/requests/?org=umbrella",
        "/dashboard/budgets/?org=umbrella",
        f"/dashboard/keys/{their_key.key.pk}/?org=initech",
        f"/dashboard/keys/{their_key.key.pk}/?org=umbrella",
        f"/dashboard/budgets/{their_budget.pk}/?org=initech",
        f"/dashboard/requests/{their_event.pk}/?org=initech",
        f"/dashboard/providers/{deployment.provider_id}/edit/?org=initech",
        f"/dashboard/routes/{their_route.pk}/edit/?org=initech",
        "/dashboard/reports/?org=umbrella",
        "/dashboard/audit/?org=umbrella",
        "/dashboard/settings/?org=umbrella",
    ]
    for url in urls:
        response = page.goto(url)
        assert response is not None and response.status in (403, 404), url
        body = page.content()
        assert "Umbrella" not in body and "labs-key" not in body, url
    # POSTs to another org's objects are refused too (the browser's own form submit).
    for action in (f"/dashboard/keys/{their_key.key.pk}/revoke/?org=initech",):
        status = page.evaluate(
            """async (url) => {
                const cookie = document.cookie.split('; ').find(c => c.startsWith('csrftoken='));
                const headers = {'X-CSRFToken': cookie ? cookie.split('=')[1] : ''};
                return (await fetch(url, {method: 'POST', headers})).status;
            }""",
            action,
        )
        assert status in (403, 404), action
    their_key.key.refresh_from_db()
    assert their_key.key.revoked_at is None
