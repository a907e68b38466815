"""Logs: JSON lines with tracebacks as a field; one access line per request Django serves,
without query strings or secrets; LOG_FORMAT, TOLLGATE_ACCESS_LOG and the metrics
settings checked at start-up. (The proxy's access lines: tests/gatewaysite/test_metrics.py.)"""

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from django.test import AsyncClient, Client

from gatewaysite.logging import ACCESS_LOGGER, JsonFormatter, PlainFormatter
from tenants.api_tokens import api_token_create
from tenants.models import Membership, Organization
from tests.conftest import TEST_ACTOR
from tests.factories import UserFactory
from tests.support.processes import REPO_ROOT


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(record.getMessage()))


@pytest.fixture
def access_log() -> Iterator[list[dict[str, Any]]]:
    """The access lines logged during the test, as dicts."""
    handler = Collected()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def json_line(logger_name: str, emit: Any) -> dict[str, Any]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.INFO
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    return orjson.loads(line)


def test_a_json_line_carries_the_traceback_and_extra_fields() -> None:
    def fail(logger: logging.Logger) -> None:
        try:
            {}["missing"]
        except KeyError:
            logger.exception("Could not %s", "work", extra={"deployment": "east", "n": 3})

    line = json_line("tests.json", fail)
    assert line["level"] == "error" and line["logger"] == "tests.json"
    assert line["message"] == "Could not work"
    assert (line["deployment"], line["n"]) == ("east", 3)
    assert line["exception"].startswith("Traceback (most recent call last)")
    assert "KeyError: 'missing'" in line["exception"]
    assert line["ts"].endswith("Z") and len(line["ts"]) == len("2026-01-01T00:00:00.000Z")


def test_an_access_line_keeps_its_fields_behind_time_level_and_logger() -> None:
    line = json_line(
        ACCESS_LOGGER, lambda logger: logger.info(orjson.dumps({"status": 200, "a": "b"}).decode())
    )
    assert list(line) == ["ts", "level", "logger", "status", "a"]
    assert (line["logger"], line["status"], line["a"]) == (ACCESS_LOGGER, 200, "b")


def test_plain_lines_show_utc_time_with_milliseconds() -> None:
    formatter = PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("x", logging.WARNING, "", 0, "careful", None, None)
    record.created = 1_800_000_000.25
    assert formatter.format(record) == "2027-01-15T08:00:00.250Z WARNING x: careful"


@pytest.mark.django_db
def test_one_line_per_page_without_the_query_string(access_log: list[dict[str, Any]]) -> None:
    response = Client().get("/dashboard/sign-in/?next=/dashboard/&password=hunter2")
    assert response.status_code == 200
    (line,) = access_log
    assert line["source"] == "django"
    assert (line["method"], line["path"], line["route"]) == (
        "GET",
        "/dashboard/sign-in/",
        "dashboard/sign-in/",
    )
    assert (line["status"], line["user_id"], line["client"]) == (200, None, "127.0.0.1")
    assert line["latency_ms"] >= 0
    assert "hunter2" not in orjson.dumps(line).decode()


@pytest.mark.django_db
def test_an_invitation_token_in_the_path_is_redacted(access_log: list[dict[str, Any]]) -> None:
    token = "inv_SecretInvitationToken0123456789"
    Client().get(f"/dashboard/invite/{token}/")
    (line,) = access_log
    assert line["path"] == "/dashboard/invite/[redacted]/"
    assert token not in orjson.dumps(line).decode()


@pytest.mark.django_db
def test_a_signed_in_page_names_the_user_and_the_org(
    org: Organization, access_log: list[dict[str, Any]]
) -> None:
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=Membership.Role.OWNER)
    client = Client()
    client.force_login(user)
    response = client.get(f"/dashboard/keys/?org={org.slug}")
    assert response.status_code == 200
    (line,) = access_log
    assert (line["user_id"], line["org"], line["status"]) == (user.pk, org.slug, 200)


@pytest.mark.django_db
def test_an_api_call_names_its_token_s_org_never_the_token(
    org: Organization, access_log: list[dict[str, Any]]
) -> None:
    token = api_token_create(org=org, name="ops", role="admin", actor=TEST_ACTOR)
    response = Client().get(
        "/api/v1/teams/", headers={"authorization": f"Bearer {token.plaintext}"}
    )
    assert response.status_code == 200
    (line,) = access_log
    assert (line["org_id"], line["token_prefix"], line["user_id"]) == (
        org.pk,
        token.plaintext[: len(line["token_prefix"])],
        None,
    )
    assert token.plaintext not in orjson.dumps(line).decode()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_requests_served_through_asgi_are_logged_too(
    access_log: list[dict[str, Any]],
) -> None:
    response = await AsyncClient().get("/dashboard/sign-in/")
    assert response.status_code == 200
    (line,) = access_log
    assert (line["path"], line["status"]) == ("/dashboard/sign-in/", 200)


REQUEST_ONE_PAGE = """
import django
django.setup()
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()
Client().get("/dashboard/sign-in/?password=hunter2")
"""


def run_django(
    env: dict[str, str], code: str = REQUEST_ONE_PAGE
) -> subprocess.CompletedProcess[str]:
    base = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY"}
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "DJANGO_SETTINGS_MODULE": "gatewaysite.settings", **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_log_format_json_makes_every_line_json(tmp_path: Any) -> None:
    result = run_django({"LOG_FORMAT": "json", "TOLLGATE_VAR_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stderr.splitlines()]
    access = [line for line in lines if line["logger"] == ACCESS_LOGGER]
    assert len(access) == 1 and access[0]["path"] == "/dashboard/sign-in/"
    assert "hunter2" not in result.stderr


def test_the_access_log_can_be_turned_off(tmp_path: Any) -> None:
    result = run_django({"TOLLGATE_ACCESS_LOG": "off", "TOLLGATE_VAR_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert ACCESS_LOGGER not in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    [
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be plain or json"),
        ("TOLLGATE_ACCESS_LOG", "sometimes", "TOLLGATE_ACCESS_LOG must be true or false"),
        ("TOLLGATE_METRICS_TOKEN", "short", "at least 16 characters"),
        ("TOLLGATE_METRICS_ALLOW_NETWORKS", "10.0.0.0/8,localhost", "'localhost' is not a network"),
    ],
)
def test_bad_settings_refuse_to_start(name: str, value: str, complaint: str, tmp_path: Any) -> None:
    result = run_django(
        {name: value, "TOLLGATE_VAR_DIR": str(tmp_path)}, "import django; django.setup()"
    )
    assert result.returncode != 0
    assert complaint in result.stderr
