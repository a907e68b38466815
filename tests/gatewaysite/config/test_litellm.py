"""`manage.py config import-litellm`: a LiteLLM proxy config.yaml becomes working routes."""

import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from gatewaysite.config_as_code.litellm import litellm_config_translate
from gatewaysite.config_as_code.loader import yaml_load
from routing.models import Provider, Route
from tests.conftest import IssueKey
from tests.factories import OrganizationFactory
from tests.gatewaysite.config.conftest import LITELLM, run_config, run_config_failing
from tests.support.gateway import GatewayServer, wait_for_config
from tests.support.processes import free_port

MODELS = {"gpt-4o", "gpt-4o-mini", "claude-sonnet", "gemini-flash", "text-embedding-3-small"}


def translate(text: str) -> tuple[dict, list[str]]:
    result = litellm_config_translate(yaml_load(text), org_slug="acme")
    return result.document["organizations"][0], result.warnings


def test_the_sample_config_maps_to_providers_deployments_routes_and_prices() -> None:
    org, warnings = translate(LITELLM.read_text())

    providers = {p["name"]: p for p in org["providers"]}
    assert set(providers) == {"azure-eastus", "azure-westeurope", "openai", "anthropic", "gemini"}
    eastus = providers["azure-eastus"]
    assert (eastus["kind"], eastus["base_url"], eastus["api_key"], eastus["api_version"]) == (
        "azure", "${AZURE_EASTUS_API_BASE}", "${AZURE_EASTUS_API_KEY}", "2024-10-21",
    )  # fmt: skip
    assert eastus["deployments"] == [
        {
            "name": "gpt-4o-eastus", "upstream_model": "gpt-4o-eastus", "rpm_limit": 900,
            "tpm_limit": 150_000, "priority": 1, "total_timeout_ms": 30_000,
        }
    ]  # fmt: skip
    weights = {
        d["name"]: d["weight"] for p in org["providers"] for d in p["deployments"] if "weight" in d
    }
    assert weights == {"gpt-4o-mini": 75, "gpt-4o-mini-2": 25}  # 0.75 / 0.25, scaled alike
    routes = {r["model_name"]: r for r in org["routes"]}
    assert set(routes) == MODELS  # the Bedrock entry is skipped, with a warning
    gpt4o = routes["gpt-4o"]
    # LiteLLM's `order` is priority; num_retries 2 plus one fallback: 4 upstream calls.
    assert (gpt4o["strategy"], gpt4o["deployments"], gpt4o["fallbacks"]) == (
        "priority", ["gpt-4o-eastus", "gpt-4o-westeurope"], ["claude-sonnet"],
    )  # fmt: skip
    assert (gpt4o["max_attempts"], gpt4o["unsupported_params"], gpt4o["cache_ttl_seconds"]) == (
        4, "drop", 600,
    )  # fmt: skip
    assert routes["gpt-4o-mini"]["strategy"] == "weighted"  # simple-shuffle
    assert routes["claude-sonnet"]["fallbacks"] == ["gpt-4o"]  # from litellm_settings
    assert org["prices"] == [
        {
            "provider_kind": "anthropic", "model": "claude-sonnet-4-20250514",
            "input_usd_per_mtok": "3", "output_usd_per_mtok": "15",
        }
    ]  # fmt: skip
    for expected in [
        "model_list[7].litellm_params.model: LiteLLM provider 'bedrock' is not supported",
        "general_settings.master_key: not imported",
        "router_settings.allowed_fails: not imported: circuit breakers",
        "router_settings.redis_host: not imported: Tollgate reads REDIS_URL",
        "litellm_settings.context_window_fallbacks: not imported",
        "litellm_settings.success_callback: not imported",
        "model_list[].litellm_params.max_retries (model_list[2]): not imported",
        "model_list[].litellm_params.temperature (model_list[4]): not imported",
        "litellm_settings.cache_params: type not imported",
    ]:
        assert any(warning.startswith(expected) for warning in warnings), expected


def test_a_key_written_in_the_litellm_file_is_never_copied() -> None:
    org, warnings = translate(
        """\
model_list:
  - model_name: fast
    litellm_params:
      model: groq/llama-3.1-8b-instant
      api_key: gsk_pasted_secret_0123456789
  - model_name: local
    litellm_params:
      model: ollama/llama3
      api_base: http://127.0.0.1:11434
"""
    )

    assert "gsk_pasted_secret_0123456789" not in repr(org) + repr(warnings)
    groq, ollama = org["providers"]
    assert groq["api_key"] == "${TOLLGATE_GROQ_API_KEY}"
    assert any("TOLLGATE_GROQ_API_KEY" in warning for warning in warnings)
    # Ollama is called on its OpenAI-compatible API, without a key.
    assert (ollama["kind"], ollama["base_url"], "api_key" in ollama) == (
        "ollama", "http://127.0.0.1:11434/v1", False,
    )  # fmt: skip


def test_simple_shuffle_weighs_by_rpm_when_no_weight_is_given() -> None:
    org, _ = translate(
        """\
model_list:
  - model_name: chat
    litellm_params: {model: azure/chat-a, api_base: "https://a.example.com", rpm: 900}
  - model_name: chat
    litellm_params: {model: azure/chat-b, api_base: "https://b.example.com", rpm: 100}
router_settings:
  routing_strategy: least-busy
"""
    )

    assert [p["name"] for p in org["providers"]] == ["azure-a", "azure-b"]
    assert org["routes"][0]["strategy"] == "least_busy"
    assert all("weight" not in p["deployments"][0] for p in org["providers"])
    org, _ = translate(
        "model_list:\n"
        "  - {model_name: chat, litellm_params: {model: openai/a, rpm: 900}}\n"
        "  - {model_name: chat, litellm_params: {model: openai/b, rpm: 100}}\n"
    )
    (openai,) = org["providers"]
    assert [d["weight"] for d in openai["deployments"]] == [900, 100]
    assert org["routes"][0]["strategy"] == "weighted"


@pytest.mark.django_db
def test_what_is_not_a_litellm_config_is_refused_with_its_path(tmp_path: Path) -> None:
    OrganizationFactory(slug="x")
    missing = run_config_failing("import-litellm", str(tmp_path / "nope.yaml"), "--org", "x")
    assert "Cannot read" in missing.err
    other = tmp_path / "other.yaml"
    other.write_text("models: []\n")
    assert (
        f"{other}: model_list: a LiteLLM config needs a model_list"
        in run_config_failing("import-litellm", str(other), "--org", "x").err
    )
    other.write_text("model_list:\n  - model_name: chat\n    litellm_params: {api_key: k}\n")
    assert (
        f"{other}: model_list[0].litellm_params.model: required"
        in run_config_failing("import-litellm", str(other), "--org", "x").err
    )
    assert not Provider.objects.exists()


@pytest.mark.django_db
def test_output_writes_tollgate_yaml_and_changes_nothing(tmp_path: Path) -> None:
    OrganizationFactory(slug="acme")
    target = tmp_path / "tollgate.yaml"

    output = run_config("import-litellm", str(LITELLM), "--output", str(target))

    assert "warning: model_list[7]" in output.err
    document = yaml.safe_load(target.read_text())
    assert document["organizations"][0]["slug"] == "acme"  # the only organization
    assert not Provider.objects.exists()


@pytest.mark.django_db
def test_the_organization_must_be_named_when_there_are_several() -> None:
    OrganizationFactory(), OrganizationFactory()
    output = run_config_failing("import-litellm", str(LITELLM), "--dry-run")
    assert "Give --org SLUG" in output.err


@pytest.mark.django_db(transaction=True)
def test_imported_routes_answer_through_the_gateway_and_fail_over(
    gateway: GatewayServer,
    mock_url: str,
    live_key: IssueKey,
    monkeypatch: pytest.MonkeyPatch,
    settings,
) -> None:
    """The sample config against the mock: Azure East US and Anthropic are down (nothing
    listens at their addresses), so gpt-4o fails over to West Europe and claude-sonnet
    falls back to gpt-4o."""
    root = mock_url.removesuffix("/v1")
    down = f"http://127.0.0.1:{free_port()}"
    environment = {
        "AZURE_EASTUS_API_BASE": down, "AZURE_EASTUS_API_KEY": "az-eastus-key",
        "AZURE_WESTEUROPE_API_BASE": root, "AZURE_WESTEUROPE_API_KEY": "az-weu-key",
        "OPENAI_API_BASE": mock_url, "OPENAI_API_KEY": "sk-openai-key",
        "ANTHROPIC_API_BASE": down, "ANTHROPIC_API_KEY": "sk-ant-key",
        "GEMINI_API_BASE": f"{root}/v1beta", "GEMINI_API_KEY": "gemini-key",
    }  # fmt: skip
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = True  # the mock is on loopback
    org = OrganizationFactory(slug="acme")

    output = run_config("import-litellm", str(LITELLM), "--org", "acme")

    assert "Applied 18 change(s)." in output.out  # 5 providers, 7 deployments, 5 routes, 1 price
    assert {route.model_name for route in Route.objects.filter(org=org)} == MODELS
    key = live_key(org)
    wait_for_config(gateway, key, "text-embedding-3-small")
    client = OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=20)
    assert {model.id for model in client.models.list()} == MODELS
    # The routes cache answers (LiteLLM's cache: true): a question no run asked before.
    hello = [{"role": "user", "content": f"Hello {uuid.uuid4()}"}]

    failover = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=hello)
    assert failover.headers["x-tollgate-deployment"] == "gpt-4o-westeurope"
    assert failover.headers["x-tollgate-attempts"] == "2"  # East US refused the connection
    assert failover.parse().choices[0].message.content
    cached = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=hello)
    assert cached.headers["x-tollgate-cache"] == "hit"

    fallback = client.chat.completions.with_raw_response.create(
        model="claude-sonnet", messages=hello
    )
    assert fallback.headers["x-tollgate-deployment"] == "gpt-4o-westeurope"
    assert fallback.headers["x-tollgate-attempts"] == "3"  # Anthropic, East US, West Europe

    balanced = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=hello)
    assert balanced.headers["x-tollgate-deployment"] in {"gpt-4o-mini", "gpt-4o-mini-2"}
    stream = client.chat.completions.create(model="gemini-flash", messages=hello, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    embedding = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(embedding.data) == 1 and embedding.data[0].embedding

    # The Azure call carried the key from the environment and LiteLLM's api_version.
    seen = httpx.get(f"{root}/_mock/requests", params={"limit": 200}).json()
    azure = [r for r in seen if r["path"].startswith("/openai/deployments/gpt-4o-westeurope/")]
    assert azure and azure[-1]["headers"]["api-key"] == "az-weu-key"
    assert "api-version=2024-10-21" in azure[-1]["query"]

    again = run_config("import-litellm", str(LITELLM), "--org", "acme")
    assert "No changes" in again.out
