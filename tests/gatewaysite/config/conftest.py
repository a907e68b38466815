"""Shared pieces of the configuration-as-code tests: running the command, secrets in the env."""

from collections.abc import Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from billing.models import ModelPrice
from routing.models import Deployment, Provider, Route
from tenants.config import config_revision_get
from tenants.models import AuditLog, Budget, Organization, Team
from tests.support.processes import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "fixtures"
ACME = FIXTURES / "config" / "acme.yaml"
LITELLM = FIXTURES / "litellm" / "config.yaml"
DOCS = REPO_ROOT / "docs" / "config-as-code.md"

# The provider keys the realistic file reads; no output may ever contain one.
SECRETS = {
    "OPENAI_API_KEY": "sk-openai-3f9a2c7e1b5d4a6c8e0f",
    "AZURE_WESTEUROPE_API_KEY": "az-weu-7c1e9b3d5f2a4c6e8a0b",
    "ANTHROPIC_API_KEY": "sk-ant-5e2b8d1f4a7c9e3b6d0f",
}
ENV = {**SECRETS, "AZURE_WESTEUROPE_ENDPOINT": "https://acme-weu.openai.azure.com"}


@dataclass(frozen=True)
class Output:
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_config(*args: str) -> Output:
    """Run `manage.py config ARGS` and return what it printed."""
    out, err = StringIO(), StringIO()
    try:
        call_command("config", *args, stdout=out, stderr=err)
    except CommandError as failure:
        raise AssertionError(f"config {' '.join(args)} failed:\n{err.getvalue()}") from failure
    return Output(out.getvalue(), err.getvalue())


def run_config_failing(*args: str) -> Output:
    """Run a `config` command that must fail; its error message is part of `err`."""
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as failure:
        call_command("config", *args, stdout=out, stderr=err)
    return Output(out.getvalue(), err.getvalue() + f"CommandError: {failure.value}\n")


@pytest.fixture
def config_env(monkeypatch: pytest.MonkeyPatch, settings) -> Iterator[dict[str, str]]:
    """The environment the realistic file reads, and private addresses allowed for its
    self-hosted vLLM (a shared deployment would refuse 10.0.0.12; see test_apply)."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = True
    yield ENV


def write(tmp_path: Path, text: str, name: str = "tollgate.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def database_snapshot() -> dict[str, object]:
    """Every configuration row and its last change, the audit log and the revision."""
    return {
        "orgs": list(Organization.objects.order_by("pk").values_list("pk", "updated_at")),
        "teams": list(Team.objects.order_by("pk").values_list("pk", "updated_at")),
        "budgets": list(Budget.objects.order_by("pk").values_list("pk", "updated_at")),
        "providers": list(Provider.objects.order_by("pk").values_list("pk", "updated_at")),
        "deployments": list(Deployment.objects.order_by("pk").values_list("pk", "updated_at")),
        "routes": list(Route.objects.order_by("pk").values_list("pk", "updated_at")),
        "prices": list(ModelPrice.objects.order_by("pk").values_list("pk", "effective_until")),
        "audit": AuditLog.objects.count(),
        "revision": config_revision_get(),
    }
