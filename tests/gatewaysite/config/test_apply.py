"""`manage.py config apply`: a YAML file made true, idempotently, through the services."""

import re
from decimal import Decimal
from pathlib import Path

import pytest

from billing.models import ModelPrice
from routing.models import Deployment, Provider, Route
from tenants.config import config_revision_get
from tenants.models import AuditLog, Budget, Organization, Team
from tenants.services import Actor, team_create, virtual_key_issue
from tests.gatewaysite.config.conftest import (
    ACME,
    DOCS,
    SECRETS,
    database_snapshot,
    run_config,
    run_config_failing,
    write,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("config_env")]

NANOS = 10**9


def test_a_realistic_file_creates_every_object_it_describes(
    django_capture_on_commit_callbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        output = run_config("apply", str(ACME))

    assert "Plan: 21 to create, 0 to update, 0 to remove, 0 unchanged." in output.out
    assert "Applied 21 change(s)." in output.out
    org = Organization.objects.get(slug="acme")
    assert (org.name, org.time_zone, org.rpm_limit, org.tpm_limit) == (
        "Acme Corp", "Europe/Berlin", 6000, 2_000_000,
    )  # fmt: skip
    assert not org.log_request_bodies
    assert {t.slug: (t.name, t.rpm_limit, t.tpm_limit) for t in org.teams.all()} == {
        "search": ("Search", 600, 200_000),
        "support": ("Customer Support", None, None),
    }
    budgets = {
        (b.scope, b.team.slug if b.team else None, b.period): (
            b.enforcement, b.limit_nanos, b.soft_thresholds,
        )
        for b in Budget.objects.filter(org=org)
    }  # fmt: skip
    assert budgets == {
        ("org", None, "monthly"): ("hard", 5000 * NANOS, [50, 80, 100]),
        ("team", "search", "daily"): ("soft", 150_250_000_000, [80]),
        ("team", "support", "monthly"): ("hard", 750 * NANOS, [50, 80, 100]),
    }

    providers = {p.name: p for p in Provider.objects.filter(org=org)}
    assert set(providers) == {"openai", "azure-westeurope", "anthropic", "local-vllm"}
    assert (providers["openai"].kind, providers["openai"].base_url) == ("openai", "")
    assert providers["openai"].api_key() == SECRETS["OPENAI_API_KEY"]
    azure = providers["azure-westeurope"]
    assert (azure.kind, azure.base_url, azure.api_version) == (
        "azure", "https://acme-weu.openai.azure.com", "2024-10-21",
    )  # fmt: skip
    assert azure.api_key() == SECRETS["AZURE_WESTEUROPE_API_KEY"]
    assert providers["anthropic"].api_key() == SECRETS["ANTHROPIC_API_KEY"]
    assert not providers["local-vllm"].has_api_key

    mini = Deployment.objects.get(provider=providers["openai"], name="gpt-4o-mini")
    assert (mini.upstream_model, mini.rpm_limit, mini.tpm_limit, mini.context_window_tokens) == (
        "gpt-4o-mini", 5000, 4_000_000, 128_000,
    )  # fmt: skip
    weu = Deployment.objects.get(provider=azure, name="gpt-4o-mini-weu")
    assert (weu.upstream_model, weu.weight, weu.priority, weu.total_timeout_ms) == (
        "gpt-4o-mini-prod", 3, 1, 90_000,
    )  # fmt: skip
    assert weu.ttft_timeout_ms == 60_000  # left out: the model's default
    assert not Deployment.objects.get(name="llama-3-8b").enabled

    route = Route.objects.get(org=org, model_name="gpt-4o-mini")
    assert {d.name for d in route.deployments.all()} == {"gpt-4o-mini", "gpt-4o-mini-weu"}
    assert (route.strategy, route.fallback_models, route.max_attempts, route.deadline_ms) == (
        "weighted", ["claude-haiku"], 4, 60_000,
    )  # fmt: skip
    assert (route.max_output_tokens, route.cache_ttl_seconds, route.cache_hit_billing) == (
        2048, 300, "full",
    )  # fmt: skip
    assert route.unsupported_params == "drop"
    assert route.shadow_deployment is not None
    assert (route.shadow_deployment.name, route.shadow_percent) == ("claude-haiku", 5)
    assert not Route.objects.get(org=org, model_name="llama-3-8b").enabled

    price = ModelPrice.objects.get(org=org, provider_kind="openai", model="gpt-4o-mini")
    assert price.source == ModelPrice.Source.OVERRIDE and price.effective_until is None
    # Unquoted 0.48 is read exactly, never through a float.
    assert (
        price.input_usd_per_mtok, price.output_usd_per_mtok, price.cached_input_usd_per_mtok,
    ) == (Decimal("0.12"), Decimal("0.48"), Decimal("0.06"))  # fmt: skip
    assert price.reasoning_usd_per_mtok is None

    # Written through the services: each change audited under the tool's name.
    entries = AuditLog.objects.filter(org=org)
    assert set(entries.values_list("actor_label", flat=True)) == {"config apply"}
    assert {"organization.create", "team.create", "provider.create", "deployment.create",
            "route.create", "budget.create", "price_override.set"} <= set(
        entries.values_list("action", flat=True)
    )  # fmt: skip
    assert config_revision_get()  # every proxy reloads


def test_applying_the_same_file_twice_changes_nothing_the_second_time(
    django_capture_on_commit_callbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        run_config("apply", str(ACME))
    before = database_snapshot()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        output = run_config("apply", str(ACME), "-v", "2")

    assert "No changes: the configuration matches the file (21 objects unchanged)." in output.out
    assert "= unchanged route acme/gpt-4o-mini" in output.out
    assert "Applied" not in output.out
    assert callbacks == []  # no configuration revision bump, no price ensured
    assert database_snapshot() == before  # no row touched, no audit entry


def test_dry_run_prints_the_plan_and_writes_nothing(django_capture_on_commit_callbacks) -> None:
    before = database_snapshot()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        output = run_config("apply", str(ACME), "--dry-run")

    assert "+ create route acme/gpt-4o-mini  (organizations[0].routes[0])" in output.out
    assert '    strategy: "weighted"' in output.out
    assert "Dry run: nothing was written." in output.out
    assert callbacks == []
    assert database_snapshot() == before
    assert not Organization.objects.exists() and not AuditLog.objects.exists()


def test_a_changed_file_updates_only_what_changed_and_shows_old_and_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        run_config("apply", str(ACME))
    audited = AuditLog.objects.count()
    text = ACME.read_text()
    for old, new in [
        ("rpm_limit: 600\n", "rpm_limit: 900\n"),
        ("strategy: weighted", "strategy: least_latency"),
        ('input_usd_per_mtok: "0.12"', "input_usd_per_mtok: 0.10"),
        ('limit_usd: "5000.00"', 'limit_usd: "6000"'),
    ]:
        assert text.count(old) == 1
        text = text.replace(old, new)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-rotated-9d8c7b6a5f4e")

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        output = run_config("apply", write(tmp_path, text))

    assert "~ update team acme/search  (organizations[0].teams[0])\n    rpm_limit: 600 → 900" in (
        output.out
    )
    assert 'strategy: "weighted" → "least_latency"' in output.out
    assert "input_usd_per_mtok: 0.12 → 0.1" in output.out
    assert "limit_usd: 5000 → 6000" in output.out
    assert "credentials: (stored) → changed, from $OPENAI_API_KEY" in output.out
    assert "Plan: 0 to create, 5 to update, 0 to remove, 16 unchanged." in output.out
    assert callbacks  # the proxies reload
    new_entries = AuditLog.objects.order_by("pk")[audited:]
    assert sorted(entry.action for entry in new_entries) == [
        "budget.update", "price_override.set", "provider.update", "route.update", "team.update",
    ]  # fmt: skip
    assert Team.objects.get(slug="search").rpm_limit == 900
    assert Provider.objects.get(name="openai").api_key() == "sk-openai-rotated-9d8c7b6a5f4e"
    # A price change closes the old row (usage keeps what it was billed at) and opens one.
    old, new = ModelPrice.objects.filter(
        org__slug="acme", provider_kind="openai", model="gpt-4o-mini"
    ).order_by("effective_from")
    assert old.effective_until == new.effective_from and new.effective_until is None
    assert (new.input_usd_per_mtok, new.cached_input_usd_per_mtok) == (
        Decimal("0.10"), Decimal("0.06"),
    )  # fmt: skip


def test_fields_left_out_keep_their_values_and_lists_left_out_are_not_managed(
    tmp_path: Path,
) -> None:
    run_config("apply", str(ACME))
    partial = write(
        tmp_path,
        "organizations:\n"
        "  - slug: acme\n"
        "    teams:\n"
        "      - slug: search\n"
        "        tpm_limit: null\n",
    )

    output = run_config("apply", partial, "--prune")

    assert "tpm_limit: 200000 → null" in output.out
    assert "Plan: 0 to create, 1 to update, 2 to remove" in output.out
    assert "- delete team acme/support  (not in the file)" in output.out
    team = Team.objects.get(slug="search")
    assert (team.name, team.rpm_limit, team.tpm_limit) == ("Search", 600, None)
    # Teams are listed, so the one left out goes (its budget first, audited); routes,
    # providers, budgets and prices are not listed: the file does not manage them here.
    assert not Team.objects.filter(slug="support").exists()
    assert Route.objects.filter(enabled=True).count() == 3
    assert Budget.objects.count() == 2
    assert AuditLog.objects.filter(action="budget.delete").count() == 1


def test_budgets_are_matched_by_team_period_and_enforcement(tmp_path: Path) -> None:
    run_config("apply", str(ACME))
    budgets = write(
        tmp_path,
        """\
organizations:
  - slug: acme
    budgets:
      - {team: support, period: weekly, enforcement: soft, limit_usd: 100}
      - {team: support, period: monthly, limit_usd: 800}
      - {team: search, period: weekly, limit_usd: "150.25", soft_thresholds: [80]}
""",
    )

    output = run_config("apply", budgets)

    assert "+ create budget acme: team support, weekly, soft" in output.out
    assert "limit_usd: 750 → 800" in output.out
    # The search team's only budget is edited in place: daily soft becomes weekly hard.
    assert 'period: "daily" → "weekly"' in output.out
    assert 'enforcement: "soft" → "hard"' in output.out
    assert "Plan: 1 to create, 2 to update, 0 to remove, 1 unchanged." in output.out
    support = Budget.objects.filter(team__slug="support").order_by("period")
    assert [(b.period, b.enforcement, b.limit_nanos) for b in support] == [
        ("monthly", "hard", 800 * NANOS), ("weekly", "soft", 100 * NANOS),
    ]  # fmt: skip
    assert "No changes" in run_config("apply", budgets).out


def test_an_invalid_file_reports_every_problem_with_its_path_and_writes_nothing(
    tmp_path: Path,
) -> None:
    bad = write(
        tmp_path,
        """\
version: 1
organizations:
  - slug: acme
    name: Acme
    time_zone: Mars/Olympus
    colour: red
    teams:
      - slug: search
        name: Search
      - slug: search
        name: Search again
    budgets:
      - team: ghosts
        limit_usd: "10.0000000001"
      - scope: key
        limit_usd: 5
    providers:
      - name: openai
        kind: openai
        api_key: sk-pasted-straight-into-the-file-42
      - name: azure
        kind: azure
        base_url: ${UNSET_AZURE_ENDPOINT}
        api_key_env: UNSET_AZURE_KEY
        deployments:
          - name: gpt-4o
            weight: -1
    routes:
      - model_name: gpt-4o
        deployments: [gpt-4o, nowhere]
        fallbacks: [claude, gpt-4o]
        strategy: fastest
      - model_name: claude
        deployments: []
        fallbacks: [gpt-5]
    prices:
      - provider_kind: openai
        model: gpt-4o
        input_usd_per_mtok: "0.1234567"
""",
    )
    before = database_snapshot()

    output = run_config_failing("apply", bad)

    expected = [
        "organizations[0].colour: unknown field",
        "organizations[0].time_zone: 'Mars/Olympus' is not a known IANA time zone",
        "organizations[0].teams[1]: team 'search' is given twice (also at organizations[0]"
        ".teams[0])",
        "organizations[0].budgets[0].limit_usd: at most 9 decimal places",
        "organizations[0].budgets[1].scope: key budgets belong to virtual keys",
        "organizations[0].providers[0].api_key: credentials come from the environment",
        "organizations[0].providers[1].base_url: the environment variable UNSET_AZURE_ENDPOINT "
        "is not set",
        "organizations[0].providers[1].api_key_env: the environment variable UNSET_AZURE_KEY "
        "is not set",
        "organizations[0].providers[1].deployments[0].weight: must be from 0 to",
        "organizations[0].routes[0].strategy: expected one of: priority, weighted",
        "organizations[0].routes[0].fallbacks[1]: a route cannot fall back to itself",
        "organizations[0].prices[0].input_usd_per_mtok: at most 6 decimal places",
        # References, checked against the file and the database in the same run:
        "organizations[0].budgets[0].team: unknown team 'ghosts'",
        "organizations[0].providers[1].deployments[0].upstream_model: required to create "
        "deployment 'gpt-4o'",
        "organizations[0].routes[0].deployments[1]: unknown deployment 'nowhere'",
        "organizations[0].routes[1].fallbacks[0]: unknown route 'gpt-5'",
        "organizations[0].prices[0].output_usd_per_mtok: required to create price",
    ]
    for line in expected:
        assert f"{bad}: {line}" in output.err, line
    assert "nothing was written" in output.err
    assert "sk-pasted-straight-into-the-file-42" not in output.text
    assert database_snapshot() == before


def test_yaml_mistakes_are_reported_by_line_without_quoting_the_file(tmp_path: Path) -> None:
    duplicate = write(
        tmp_path,
        "organizations:\n  - slug: acme\n    name: Acme\n    name: sk-secret-looking-42\n",
    )
    output = run_config_failing("apply", duplicate)
    assert f"{duplicate}: line 4, column 5: the key 'name' is given twice" in output.err
    assert "sk-secret-looking-42" not in output.text

    broken = write(tmp_path, "organizations: [\n  - slug: {acme\n", "broken.yaml")
    assert f"{broken}: line " in run_config_failing("apply", broken).err
    empty = write(tmp_path, "", "empty.yaml")
    assert f"{empty}: the file is empty" in run_config_failing("apply", empty).err


def test_a_provider_address_on_a_private_network_is_refused_in_a_shared_deployment(
    tmp_path: Path, settings
) -> None:
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = False

    output = run_config_failing("apply", str(ACME))

    assert f"{ACME}: organizations[0].providers[3].base_url: This address is on a private" in (
        output.err
    )
    assert not Provider.objects.exists()


def test_prune_removes_what_the_file_leaves_out_in_the_lists_it_gives(tmp_path: Path) -> None:
    run_config("apply", str(ACME))
    org = Organization.objects.get(slug="acme")
    actor = Actor.system("tests")
    team_create(org=org, slug="interns", name="Interns", actor=actor)
    virtual_key_issue(org=org, name="support bot", team=Team.objects.get(slug="support"),
                      actor=actor, monthly_budget_nanos=NANOS)  # fmt: skip
    reduced = write(
        tmp_path,
        """\
organizations:
  - slug: acme
    teams:
      - slug: search
    budgets:
      - scope: org
        period: monthly
        limit_usd: "5000"
    providers:
      - name: openai
        api_key: ${OPENAI_API_KEY}
        deployments:
          - name: gpt-4o-mini
    routes:
      - model_name: gpt-4o-mini
        deployments: [gpt-4o-mini]
        fallbacks: []
        shadow_deployment: null
        shadow_percent: 0
    prices: []
""",
    )

    without = run_config("apply", reduced, "--dry-run")
    assert "to remove" in without.out and " 0 to remove" in without.out

    output = run_config("apply", reduced, "--prune")

    assert "warning: team acme/support is not in the file but still has virtual keys" in (
        output.err
    )
    for line in [
        "- delete team acme/interns  (not in the file)",
        "- delete budget acme: team search, daily, soft  (not in the file)",
        "- delete budget acme: team support, monthly, hard  (not in the file)",
        "- disable provider acme/anthropic  (not in the file)",
        "- disable deployment acme/openai/text-embedding-3-small  (not in the file)",
        "- disable route acme/claude-haiku  (not in the file)",
        "- end price acme/openai/gpt-4o-mini  (not in the file)",
    ]:
        assert line in output.out, line
    assert "route acme/llama-3-8b" not in output.out  # already disabled
    assert set(Team.objects.filter(org=org).values_list("slug", flat=True)) == {
        "search", "support",
    }  # fmt: skip
    assert Budget.objects.filter(org=org, scope="team").count() == 0
    assert Budget.objects.filter(org=org, scope="key").count() == 1  # keys' are not the file's
    assert set(Provider.objects.filter(enabled=True).values_list("name", flat=True)) == {"openai"}
    assert not Deployment.objects.get(name="text-embedding-3-small").enabled
    assert set(Route.objects.filter(enabled=True).values_list("model_name", flat=True)) == {
        "gpt-4o-mini"
    }
    assert not ModelPrice.objects.filter(org=org, effective_until__isnull=True).exists()
    assert Provider.objects.count() == 4 and Route.objects.count() == 4  # disabled, kept

    again = run_config("apply", reduced, "--prune")
    assert "No changes" in again.out


def test_a_reference_to_what_prune_removes_is_an_error(tmp_path: Path) -> None:
    run_config("apply", str(ACME))
    file = write(
        tmp_path,
        """\
organizations:
  - slug: acme
    teams:
      - slug: search
    budgets:
      - team: support
        limit_usd: 10
    providers:
      - name: openai
        deployments:
          - name: gpt-4o-mini
    routes:
      - model_name: gpt-4o-mini
        deployments: [gpt-4o-mini, text-embedding-3-small]
        fallbacks: [claude-haiku]
""",
    )

    output = run_config_failing("apply", file, "--prune")

    assert "budgets[0].team: team 'support' is not in the file's teams, and --prune deletes" in (
        output.err
    )
    assert "deployments[1]: unknown deployment 'text-embedding-3-small' (it is not in the file" in (
        output.err
    )
    assert "fallbacks[0]: unknown route 'claude-haiku' (it is not in the file, and --prune" in (
        output.err
    )
    assert Team.objects.filter(slug="support").exists()


def test_secrets_never_appear_in_output_errors_or_audit_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = [run_config("apply", str(ACME), "--dry-run"), run_config("apply", str(ACME))]
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-rotated-1a2b3c4d5e6f")
    outputs.append(run_config("apply", str(ACME), "-v", "2"))
    outputs.append(run_config("export"))
    monkeypatch.setenv("AZURE_WESTEUROPE_API_KEY", "x" * 5000)  # too long: refused, not shown
    outputs.append(run_config_failing("apply", str(ACME)))

    printed = "".join(output.text for output in outputs)
    assert "credentials: (stored) → changed, from $ANTHROPIC_API_KEY" in printed
    assert "longer than 4096 characters" in printed
    audit = "".join(f"{e.before}{e.after}" for e in AuditLog.objects.all())
    for secret in [*SECRETS.values(), "sk-ant-rotated-1a2b3c4d5e6f", "x" * 100]:
        assert secret not in printed
        assert secret not in audit


def test_the_documented_example_is_a_valid_file(tmp_path: Path) -> None:
    (example,) = [
        block
        for block in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)
        if "organizations:" in block
    ]

    output = run_config("apply", write(tmp_path, example), "--dry-run")

    assert "Plan: 19 to create, 0 to update, 0 to remove, 0 unchanged." in output.out
