"""deploy/nginx.conf in front of a real gateway: it parses, streams pass unbuffered,
bodies over the limit get the gateway's error shape, /metrics stays private.

Skipped where nginx is not installed (`apt-get install nginx-light`).
"""

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.support.gateway import gateway_server, wait_for_key
from tests.support.processes import REPO_ROOT, free_port, running_process

NGINX = shutil.which("nginx")
SITE = REPO_ROOT / "deploy" / "nginx.conf"
MAX_REQUEST_BYTES = 10 * 1024 * 1024  # TOLLGATE_MAX_REQUEST_BYTES's default
CHUNK_DELAY_MS = 200
TOKENS = 10

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def main_config(directory: Path, site: Path) -> Path:
    """A minimal nginx.conf that includes `site` in its http context, as conf.d would,
    with every file nginx writes under `directory`."""
    config = directory / "nginx-main.conf"
    temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    config.write_text(
        f"""
daemon off;
user root;  # ignored unless run as root; the test's files are root's own then
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {site};
}}
"""
    )
    return config


def site_for(upstream_port: int, listen_port: int) -> str:
    """The shipped site with its example replicas replaced by one local gateway."""
    site = SITE.read_text()
    site, replicas = re.subn(r"^ *server 10\.0\.0\.\d+:8000 [^;]*;\n", "", site, flags=re.M)
    assert replicas == 2
    replica = f"    server 127.0.0.1:{upstream_port} max_fails=3 fail_timeout=10s;\n"
    site = site.replace("upstream tollgate {\n", "upstream tollgate {\n" + replica)
    site, listens = re.subn(r"\blisten 80;", f"listen 127.0.0.1:{listen_port};", site)
    assert listens == 1
    return site


def nginx_test(config: Path) -> subprocess.CompletedProcess[str]:
    assert NGINX is not None
    return subprocess.run(
        [NGINX, "-t", "-c", str(config)], capture_output=True, text=True, check=False
    )


def test_the_shipped_config_is_valid_nginx(tmp_path: Path) -> None:
    result = nginx_test(main_config(tmp_path, SITE))
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_streams_pass_unbuffered_and_limits_hold_through_nginx(
    tmp_path: Path, make_route: Any, issue_key: Any, org: Any
) -> None:
    assert NGINX is not None
    make_route(
        model="via-nginx",
        org=org,
        upstream_model=f"via-nginx+chunk_delay_ms={CHUNK_DELAY_MS}+tokens={TOKENS}",
    )
    key = issue_key(org)
    # The gateway's own limit is higher here, so a 413 below can only come from nginx.
    with gateway_server(
        TOLLGATE_VAR_DIR=str(tmp_path / "var"),
        TOLLGATE_MAX_REQUEST_BYTES=str(2 * MAX_REQUEST_BYTES),
    ) as gateway:
        wait_for_key(gateway, key)
        listen_port = free_port()
        upstream_port = int(gateway.base_url.rsplit(":", 1)[1])
        site = tmp_path / "tollgate.conf"
        site.write_text(site_for(upstream_port, listen_port))
        config = main_config(tmp_path, site)
        assert nginx_test(config).returncode == 0
        front = f"http://127.0.0.1:{listen_port}"
        with running_process(
            [NGINX, "-c", str(config)], ready_url=f"{front}/healthz", timeout_s=15
        ):
            client = OpenAI(base_url=f"{front}/v1", api_key=key, max_retries=0)
            # A first call warms the gateway's pools, so no start-up pause skews the timing.
            client.chat.completions.create(
                model="via-nginx", messages=[{"role": "user", "content": "hi"}]
            )
            # Each chunk reaches the client when the provider sends it, not at the end.
            started = time.monotonic()
            arrivals = []
            words = []
            stream = client.chat.completions.create(
                model="via-nginx", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append(time.monotonic() - started)
                    words.append(chunk.choices[0].delta.content)
            assert len(words) == TOKENS
            # Buffered, they would arrive together; streamed, over ~1.8 s. Half of that
            # leaves room for a pause of this loaded machine.
            spread_s = arrivals[-1] - arrivals[0]
            assert spread_s >= (TOKENS - 1) * CHUNK_DELAY_MS / 1000 / 2, arrivals

            # A body over 10 MiB: refused by nginx, in the gateway's (OpenAI's) shape.
            too_large = httpx.post(
                f"{front}/v1/chat/completions",
                content=b"x" * (MAX_REQUEST_BYTES + 1),
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
                timeout=30,
            )
            assert too_large.status_code == 413
            assert too_large.json()["error"]["code"] == "request_too_large"
            # One at the limit passes nginx, streamed to the gateway, which parses it.
            at_limit = httpx.post(
                f"{front}/v1/chat/completions",
                content=b" " * MAX_REQUEST_BYTES,
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
                timeout=30,
            )
            assert at_limit.status_code == 400
            assert at_limit.json()["error"]["code"] == "invalid_json"

            assert httpx.get(f"{front}/metrics").status_code == 404
            assert httpx.get(f"{front}/readyz").status_code == 200  # from a private address
            assert httpx.get(f"{front}/admin/login/").status_code == 200
