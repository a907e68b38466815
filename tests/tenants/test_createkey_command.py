"""`manage.py createkey`: issue a key from the command line, print only the key."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from tenants.keys import key_matches, key_prefix
from tenants.models import AuditLog, Organization, Team, VirtualKey

pytestmark = pytest.mark.django_db


def createkey(*args: str) -> str:
    """Run the command and return what it printed."""
    out = StringIO()
    call_command("createkey", *args, stdout=out)
    return out.getvalue()


def test_prints_exactly_one_line_the_key_that_authenticates(org: Organization) -> None:
    output = createkey("--org", org.slug, "--name", "ci")

    (plaintext,) = output.splitlines()
    assert output == plaintext + "\n"
    key = VirtualKey.objects.get(prefix=key_prefix(plaintext))
    assert key_matches(plaintext, key.secret_hash)
    assert (key.org, key.name, key.team, key.allowed_models) == (org, "ci", None, [])
    assert key.expires_at is None and key.is_active
    assert AuditLog.objects.get(action="virtual_key.issue").actor_label == "cli"


def test_team_option_issues_the_key_for_that_team(org: Organization, team: Team) -> None:
    plaintext = createkey("--org", org.slug, "--name", "ci", "--team", team.slug).strip()

    assert VirtualKey.objects.get(prefix=key_prefix(plaintext)).team == team


def test_models_option_is_stored_sorted_without_duplicates(org: Organization) -> None:
    plaintext = createkey("--org", org.slug, "--name", "ci", "--models", "b, a,b,,c").strip()

    assert VirtualKey.objects.get(prefix=key_prefix(plaintext)).allowed_models == ["a", "b", "c"]


def test_expires_days_sets_expiry_that_many_days_ahead(org: Organization) -> None:
    before = timezone.now()
    plaintext = createkey("--org", org.slug, "--name", "ci", "--expires-days", "30").strip()
    after = timezone.now()

    expires_at = VirtualKey.objects.get(prefix=key_prefix(plaintext)).expires_at
    assert expires_at is not None
    assert before + timedelta(days=30) <= expires_at <= after + timedelta(days=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("--org", "no-such-org"), "No organization with slug 'no-such-org'", id="org"),
        pytest.param(("--team", "no-such-team"), "No team 'no-such-team'", id="team"),
        pytest.param(("--expires-days", "0"), "--expires-days must be a positive", id="days-0"),
        pytest.param(("--expires-days", "-3"), "--expires-days must be a positive", id="days-neg"),
    ],
)
def test_bad_options_raise_a_clear_error_and_create_nothing(
    org: Organization, team: Team, args: tuple[str, ...], message: str
) -> None:
    options = {"--org": org.slug, "--name": "ci", **dict(zip(args[::2], args[1::2], strict=True))}
    argv = [part for pair in options.items() for part in pair]

    with pytest.raises(CommandError, match=message):
        createkey(*argv)

    assert not VirtualKey.objects.exists()
    assert not AuditLog.objects.exists()


def test_team_of_another_org_is_not_found(org: Organization) -> None:
    other_team = Team.objects.create(
        org=Organization.objects.create(slug="other", name="Other"), slug="ops", name="Ops"
    )

    with pytest.raises(CommandError, match=f"No team 'ops' in {org.slug}"):
        createkey("--org", org.slug, "--name", "ci", "--team", other_team.slug)

    assert not VirtualKey.objects.exists()
