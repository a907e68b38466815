"""The management API against its own OpenAPI schema: schemathesis fuzzes every operation
over real HTTP on a live gateway and finds no server error and no answer that breaks the
schema (bodies, status codes, content types, headers)."""

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from billing.models import Statement
from tenants.api_tokens import api_token_create
from tenants.services import budget_create, virtual_key_issue
from tests.conftest import TEST_ACTOR
from tests.support.gateway import gateway_server, wait_for_key
from tests.support.halves import production_half_only

pytestmark = pytest.mark.django_db(transaction=True)

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def schemathesis_run(
    base_url: str, token: str, *options: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{base_url}/api/schema/",
            "--url",
            base_url,
            "--header",
            f"Authorization: Bearer {token}",
            "--checks",
            CHECKS,
            "--max-examples",
            "25",
            "--seed",
            "20261121",
            "--workers",
            "1",
            "--no-color",
            "--generation-database",
            "none",
            "--request-timeout",
            "20",
            *options,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,  # its working files stay out of the checkout
    )


def test_the_schema_is_served_with_local_docs() -> None:
    with gateway_server() as gateway:
        schema = httpx.get(
            f"{gateway.base_url}/api/schema/", headers={"Accept": "application/json"}
        )
        docs = httpx.get(f"{gateway.base_url}/api/docs/")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/api/v1/teams/", "/v1/key/info"} <= set(paths)
    assert docs.status_code == 200
    # Served from the project's own static files: nothing from a CDN.
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in docs.text
    assert "cdn" not in docs.text.lower()


# Once, with production settings: the embedded half serves the same API code, and the
# fuzzing is the suite's longest test.
@pytest.mark.slow
@production_half_only
def test_every_management_operation_conforms_to_the_schema(org, team, tmp_path: Path) -> None:
    token = api_token_create(org=org, name="fuzz", role="admin", actor=TEST_ACTOR).plaintext
    key = virtual_key_issue(org=org, team=team, name="fuzzed", actor=TEST_ACTOR)
    budget_create(org=org, scope="key", key=key.key, limit_nanos=10**9, actor=TEST_ACTOR)
    # A closed statement, so its detail endpoint answers with a body, not only 404s.
    start = datetime(2026, 1, 1, tzinfo=UTC)
    Statement.objects.create(
        org=org, month=start.date(), time_zone="UTC", period_start=start,
        period_end=start + timedelta(days=31), closed_at=start + timedelta(days=32),
    )  # fmt: skip
    with gateway_server(TOLLGATE_API_RATE_LIMIT="100000/m") as gateway:
        wait_for_key(gateway, key.plaintext)
        management = schemathesis_run(
            gateway.base_url, token, "--include-path-regex", "^/api/", cwd=tmp_path
        )
        key_info = schemathesis_run(
            gateway.base_url, key.plaintext, "--include-path", "/v1/key/info", cwd=tmp_path
        )
    assert management.returncode == 0, management.stdout[-6000:] + management.stderr[-2000:]
    assert key_info.returncode == 0, key_info.stdout[-4000:] + key_info.stderr[-2000:]
    assert "No issues found" in management.stdout or "passed" in management.stdout.lower()
