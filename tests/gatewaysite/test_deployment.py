"""docker-compose.yml, the Procfile and the local stack run the same real processes."""

import os
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from celery import Celery
from django.conf import settings

from tests.support.gateway import database_env, wait_until
from tests.support.processes import REPO_ROOT, free_port, running_process

APP_SERVICES = {"migrate": "release", "web": "web", "worker": "worker", "beat": "beat"}


def procfile() -> dict[str, str]:
    entries = {}
    for line in (REPO_ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(": ")
        entries[name] = command
    return entries


def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def test_compose_defines_the_production_stack_with_health_checks() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", *APP_SERVICES}
    for name in ("postgres", "redis", "web", "worker"):
        assert services[name]["healthcheck"]["test"], name
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert environment["DATABASE_URL"].startswith("postgres://")
        assert environment["REDIS_URL"].startswith("redis://")
        # Secrets are required from the environment, never baked in.
        assert environment["SECRET_KEY"].startswith("${SECRET_KEY:?")
        assert environment["TOLLGATE_ENCRYPTION_KEYS"].startswith("${TOLLGATE_ENCRYPTION_KEYS:?")


def test_compose_services_run_the_procfile_entries() -> None:
    services = compose()["services"]
    entries = procfile()
    for service, process in APP_SERVICES.items():
        assert services[service]["command"] == ["bin/run-process", process]
        assert process in entries
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert 'CMD ["bin/run-process", "web"]' in dockerfile
    assert "USER tollgate" in dockerfile


def test_procfile_commands_name_real_entry_points() -> None:
    entries = procfile()
    assert "gatewaysite.asgi:application" in entries["web"]
    from gatewaysite.asgi import application

    assert callable(application)
    assert "-A gatewaysite worker" in entries["worker"]
    assert "-A gatewaysite beat" in entries["beat"]
    import gatewaysite

    assert isinstance(gatewaysite.celery_app, Celery)
    assert "migrate" in entries["release"]


def test_run_process_refuses_an_unknown_process() -> None:
    result = subprocess.run(
        [REPO_ROOT / "bin/run-process", "nope"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "no 'nope' process" in result.stderr


@pytest.mark.skipif(not settings.REDIS_URL, reason="the production-like stack needs Redis")
# Makes pytest-django create the test database the stack runs on, and flush what the
# stack's release step (migrate, import_prices) committed there afterwards.
@pytest.mark.django_db(transaction=True)
def test_local_stack_serves_the_dashboard_and_proxy_with_a_celery_worker(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        **database_env(),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WEB_WORKERS": "2",
        "TOLLGATE_VAR_DIR": str(tmp_path),
    }
    with running_process(
        [str(REPO_ROOT / "bin/run-stack")],
        env=env,
        ready_url=f"http://127.0.0.1:{port}/admin/login/",
        timeout_s=60,
        cwd=REPO_ROOT,
    ):
        login = httpx.get(f"http://127.0.0.1:{port}/admin/login/")
        assert login.status_code == 200
        # Static files are served by the production stack itself.
        assert httpx.get(f"http://127.0.0.1:{port}/static/admin/css/base.css").status_code == 200
        proxy = httpx.get(f"http://127.0.0.1:{port}/v1/models")
        assert proxy.status_code == 401
        assert proxy.json()["error"]["code"] == "missing_api_key"

        def worker_answers() -> bool:
            ping = subprocess.run(
                [str(REPO_ROOT / ".venv/bin/celery"), "-A", "gatewaysite", "inspect", "ping",
                 "--timeout", "2"],
                env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False,
            )  # fmt: skip
            return "pong" in ping.stdout

        wait_until(worker_answers, timeout_s=45, what="the Celery worker to answer a ping")
