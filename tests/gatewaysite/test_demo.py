"""The embedded default: demo data, and `make run`'s script end to end."""

import json
import os
import sqlite3
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db.models import Sum
from openai import OpenAI

from billing.models import UsageEvent
from gatewaysite.demo import demo_seed
from routing.models import Deployment, Provider, Route
from tenants.keys import key_matches
from tenants.models import AuditLog, Budget, Organization, Team, VirtualKey
from tests.support.processes import REPO_ROOT, free_port, running_process


def row_counts() -> dict[str, int]:
    models = [Organization, Team, VirtualKey, Budget, Provider, Deployment, Route, UsageEvent,
              AuditLog]  # fmt: skip
    return {model.__name__: model.objects.count() for model in models}


@pytest.mark.django_db
def test_demo_seed_is_idempotent_and_its_keys_work(tmp_path: Path, settings) -> None:
    settings.VAR_DIR = tmp_path
    first = demo_seed(mock_base_url="http://127.0.0.1:9100/v1", admin_password="pw")
    counts = row_counts()
    second = demo_seed(mock_base_url="http://127.0.0.1:9100/v1", admin_password="pw")

    assert row_counts() == counts
    assert second.keys == first.keys
    assert json.loads((tmp_path / "demo-keys.json").read_text()) == first.keys
    assert oct((tmp_path / "demo-keys.json").stat().st_mode & 0o777) == "0o600"
    for name, plaintext in first.keys.items():
        assert key_matches(plaintext, VirtualKey.objects.get(name=name).secret_hash)
    # A week of history with real, priced costs, so the dashboard is not empty.
    assert counts["UsageEvent"] >= 7 * 60
    days = UsageEvent.objects.dates("started_at", "day")
    assert len(days) == 7
    assert UsageEvent.objects.aggregate(total=Sum("cost_nanos"))["total"] > 0
    assert not UsageEvent.objects.filter(outcome="success", output_tokens__gt=0, cost_nanos=0)


@pytest.mark.django_db
def test_seed_demo_refuses_to_create_a_known_password_without_debug(settings) -> None:
    settings.DEBUG = False
    with pytest.raises(CommandError, match="only runs with DEBUG on"):
        call_command("seed_demo")


@pytest.mark.skipif(
    bool(settings.REDIS_URL), reason="make run is the embedded default; it runs in that half"
)
def test_make_run_serves_the_printed_openai_example(tmp_path: Path) -> None:
    """`bin/run-embedded` (what `make run` starts) on an empty data directory."""
    port, mock_port = free_port(), free_port()
    env = {**os.environ, "PORT": str(port), "MOCK_PORT": str(mock_port),
           "TOLLGATE_VAR_DIR": str(tmp_path)}  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with running_process(
        [str(REPO_ROOT / "bin/run-embedded")],
        env=env,
        ready_url=f"{base}/v1/models",
        timeout_s=90,
        cwd=REPO_ROOT,
    ):
        key = json.loads((tmp_path / "demo-keys.json").read_text())["platform-app"]
        sdk = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        reply = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}]
        )
        assert reply.choices[0].message.content
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
            reply.choices[0].message.content
        )
        assert sdk.embeddings.create(model="text-embedding-3-small", input="hi").data
        assert {m.id for m in sdk.models.list()} == {
            "gpt-4o", "gpt-4o-mini", "text-embedding-3-small"
        }  # fmt: skip

        # Each call is a usage event in the embedded database.
        database = tmp_path / "tollgate.sqlite3"

        def todays_events() -> int:
            with sqlite3.connect(database) as connection:
                return connection.execute(
                    "SELECT count(*) FROM billing_usageevent WHERE key_id IS NOT NULL "
                    "AND started_at >= date('now')"
                ).fetchone()[0]

        from tests.support.gateway import wait_until

        # Written in batches; on a loaded machine this took over 10 s (the startup jobs,
        # e.g. rollups of the demo month, share SQLite's one writer with them).
        wait_until(lambda: todays_events() >= 4, timeout_s=30, what="four usage events")

        # The dashboard shows them to the admin.
        with httpx.Client(base_url=base, follow_redirects=True) as browser:
            login = browser.get("/admin/login/?next=/dashboard/")
            token = browser.cookies["csrftoken"]
            assert login.status_code == 200
            overview = browser.post(
                "/admin/login/?next=/dashboard/",
                data={"username": "admin", "password": "tollgate-demo",
                      "csrfmiddlewaretoken": token, "next": "/dashboard/"},
            )  # fmt: skip
            assert overview.status_code == 200
            assert "Acme Corp" in overview.text
            assert "gpt-4o-mini" in overview.text
