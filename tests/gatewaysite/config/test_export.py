"""`manage.py config export`: the running configuration as YAML that applies back unchanged."""

from pathlib import Path

import pytest
import yaml

from routing.models import Route
from routing.services import route_update
from tenants.models import Organization
from tenants.services import Actor, virtual_key_issue
from tests.gatewaysite.config.conftest import (
    ACME,
    SECRETS,
    database_snapshot,
    run_config,
    run_config_failing,
    write,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("config_env")]

EXPORTED_KEYS = {
    "PROVIDER_ACME_OPENAI_API_KEY": SECRETS["OPENAI_API_KEY"],
    "PROVIDER_ACME_AZURE_WESTEUROPE_API_KEY": SECRETS["AZURE_WESTEUROPE_API_KEY"],
    "PROVIDER_ACME_ANTHROPIC_API_KEY": SECRETS["ANTHROPIC_API_KEY"],
}


@pytest.fixture
def acme() -> Organization:
    """The realistic file applied, plus what only the dashboard sets: an A/B variant and a
    key with its own budget (keys are not the file's)."""
    run_config("apply", str(ACME))
    org = Organization.objects.get(slug="acme")
    route = Route.objects.get(org=org, model_name="gpt-4o-mini")
    variant = route.deployments.get(name="gpt-4o-mini-weu")
    actor = Actor.system("tests")
    route_update(route=route, actor=actor, changes={"variant_deployment": variant,
                                                    "variant_percent": 10})  # fmt: skip
    virtual_key_issue(org=org, name="ci", actor=actor, monthly_budget_nanos=10**9)
    return org


def test_export_writes_credentials_as_environment_references_never_secrets(
    acme: Organization,
) -> None:
    output = run_config("export", "--org", "acme")

    for secret in SECRETS.values():
        assert secret not in output.text
    document = yaml.safe_load(output.out)
    (org,) = document["organizations"]
    providers = {p["name"]: p for p in org["providers"]}
    assert providers["openai"]["api_key"] == "${PROVIDER_ACME_OPENAI_API_KEY}"
    assert providers["azure-westeurope"]["api_key"] == "${PROVIDER_ACME_AZURE_WESTEUROPE_API_KEY}"
    assert "api_key" not in providers["local-vllm"]  # it has none
    for name in EXPORTED_KEYS:
        assert f"#   {name}\n" in output.out  # the header lists what to set
    routes = {r["model_name"]: r for r in org["routes"]}
    assert routes["gpt-4o-mini"]["variant_deployment"] == "gpt-4o-mini-weu"
    assert routes["gpt-4o-mini"]["shadow_deployment"] == "claude-haiku"
    assert org["budgets"][0] == {
        "scope": "org", "period": "monthly", "enforcement": "hard", "limit_usd": "5000",
        "soft_thresholds": [50, 80, 100],
    }  # fmt: skip
    assert "acme: 1 key budget(s) are not exported" in output.err


def test_export_then_apply_changes_nothing(
    acme: Organization,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks,
) -> None:
    exported = write(tmp_path, run_config("export").out)
    for name, value in EXPORTED_KEYS.items():
        monkeypatch.setenv(name, value)
    before = database_snapshot()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        output = run_config("apply", exported, "--prune")

    assert "No changes: the configuration matches the file (21 objects unchanged)." in output.out
    assert callbacks == []
    assert database_snapshot() == before


def test_an_exported_organization_recreates_itself_elsewhere(
    acme: Organization, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = run_config("export", "--org", "acme").out
    assert original.count("- slug: acme\n") == 1
    for name, value in EXPORTED_KEYS.items():
        monkeypatch.setenv(name, value)

    run_config("apply", write(tmp_path, original.replace("- slug: acme\n", "- slug: acme2\n")))

    copy = yaml.safe_load(run_config("export", "--org", "acme2").out)["organizations"][0]
    expected = yaml.safe_load(original.replace("PROVIDER_ACME_", "PROVIDER_ACME2_"))
    assert copy == {**expected["organizations"][0], "slug": "acme2"}


def test_applying_an_export_without_its_variables_names_each_one(
    acme: Organization, tmp_path: Path
) -> None:
    exported = write(tmp_path, run_config("export").out)

    output = run_config_failing("apply", exported)

    for name in EXPORTED_KEYS:
        assert f"the environment variable {name} is not set" in output.err


def test_export_of_an_unknown_organization_is_an_error() -> None:
    assert "No organization with slug 'nope'" in run_config_failing("export", "--org", "nope").err
