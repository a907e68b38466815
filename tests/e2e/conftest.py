"""A real browser (Debian's Chromium, driven by Playwright) against a real Tollgate server.

The server is uvicorn running the one ASGI application (dashboard, /v1 proxy and the
live websocket) on the test database, with its static files collected as in production.
Screenshots of the main pages land in tests/screenshots/<suite half>/ for people to look at.
"""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.support.gateway import GatewayServer, database_env, gateway_server, usage_ingestion
from tests.support.processes import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SUITE_HALF = "postgres" if settings.REDIS_URL else "embedded"
SCREENSHOTS = REPO_ROOT / "tests" / "screenshots" / SUITE_HALF
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def site(
    django_db_setup: None, mock_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """Tollgate as deployed: static files collected (DEBUG is off in the PostgreSQL
    half), usage ingested by a Celery worker when there is Redis."""
    var_dir = tmp_path_factory.mktemp("e2e-var")
    env = {**os.environ, **database_env(), "TOLLGATE_VAR_DIR": str(var_dir)}
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=REPO_ROOT, env=env, check=True,
    )  # fmt: skip
    with gateway_server(TOLLGATE_VAR_DIR=str(var_dir)) as server, usage_ingestion():
        yield server


@pytest.fixture(scope="module")
def sync_orm_beside_playwright() -> Iterator[None]:
    """Playwright's sync API keeps an event loop on this thread for as long as the
    browser runs; the tests' own ORM calls (and pytest-django's flushes) are plain
    synchronous code, which Django would otherwise refuse next to a running loop."""
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if previous is None:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(scope="module")
def browser(sync_orm_beside_playwright: None) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser, site: GatewayServer) -> Iterator[BrowserContext]:
    opened = browser.new_context(base_url=site.base_url, viewport={"width": 1360, "height": 900})
    opened.set_default_timeout(TIMEOUT_MS)
    yield opened
    opened.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def screenshot(page: Page, name: str) -> None:
    """Save a full-page screenshot for people to look at (not compared by the tests)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, username: str, password: str) -> None:
    page.goto("/dashboard/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/sign-in/" not in url)
