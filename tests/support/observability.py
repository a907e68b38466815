"""Servers whose log a test reads, Prometheus scrapes parsed, and calls that note their ids."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from gatewaysite.http_server import HTTP_PROTOCOL
from tests.support.gateway import ALERTS_ENV, LOOPBACK_PROVIDERS_ENV, GatewayServer, database_env
from tests.support.processes import REPO_ROOT, free_port, stop_group

# Distinctive, so a test can tell that no prompt reached a log.
PROMPT = "observability test prompt 7f3a"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _wait_ready(
    process: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{url} not ready after {timeout_s}s:\n{tail}")
        time.sleep(0.05)


@contextmanager
def logged_process(
    args: list[str], *, env: dict[str, str], ready_url: str, log_path: Path, timeout_s: float
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `args` in its own process group, its output (stdout and stderr) in `log_path`."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args,
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_ready(process, ready_url, log_path, timeout_s)
            yield process
        finally:
            stop_group(process)


def _gateway_env(**extra_env: str) -> dict[str, str]:
    return {
        **os.environ,
        **database_env(),
        "PYTHONUNBUFFERED": "1",
        "TOLLGATE_CONFIG_POLL_SECONDS": "0.05",
        "TOLLGATE_USAGE_FLUSH_SECONDS": "0.05",
        **ALERTS_ENV,
        **LOOPBACK_PROVIDERS_ENV,
        **extra_env,
    }


@contextmanager
def logged_gateway(log_path: Path, **extra_env: str) -> Iterator[GatewayServer]:
    """One uvicorn process serving Tollgate on the test database, its log in `log_path`.

    Call it from a test marked django_db(transaction=True): the server sees committed rows.
    """
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "gatewaysite.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--http",
        HTTP_PROTOCOL,
    ]
    base_url = f"http://127.0.0.1:{port}"
    with logged_process(
        args,
        env=_gateway_env(**extra_env),
        ready_url=f"{base_url}/v1/models",
        log_path=log_path,
        timeout_s=30,
    ):
        yield GatewayServer(base_url=base_url)


@contextmanager
def logged_stack(var_dir: Path, log_path: Path, **extra_env: str) -> Iterator[GatewayServer]:
    """`bin/run-stack` (release, web with WEB_WORKERS through bin/run-process, Celery
    worker and beat) on the test database and Redis, every process's output in `log_path`."""
    port = free_port()
    env = _gateway_env(PORT=str(port), HOST="127.0.0.1", TOLLGATE_VAR_DIR=str(var_dir), **extra_env)
    base_url = f"http://127.0.0.1:{port}"
    with logged_process(
        [str(REPO_ROOT / "bin/run-stack")],
        env=env,
        ready_url=f"{base_url}/v1/models",
        log_path=log_path,
        timeout_s=120,
    ):
        yield GatewayServer(base_url=base_url)


# ---------------------------------------------------------------- scrapes


@dataclass(frozen=True)
class Scrape:
    status: int
    worker_pid: str | None
    samples: Samples
    text: str

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a series the scrape does not have."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition (prometheus_client's own parser)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def scrape(base_url: str, token: str | None = None, **headers: str) -> Scrape:
    """GET /metrics on a new connection (so either worker may answer)."""
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=20)
    samples = parse_samples(response.text) if response.status_code == 200 else {}
    return Scrape(
        status=response.status_code,
        worker_pid=response.headers.get("x-tollgate-worker-pid"),
        samples=samples,
        text=response.text,
    )


def delta(after: Scrape, before: Scrape) -> Samples:
    """What changed between two scrapes, series by series (non-zero changes only)."""
    names = set(after.samples) | set(before.samples)
    changes = {key: after.samples.get(key, 0.0) - before.samples.get(key, 0.0) for key in names}
    return {key: change for key, change in changes.items() if change}


# ---------------------------------------------------------------- calls and logs


@dataclass(frozen=True)
class Answer:
    """One call the test made: what Tollgate answered."""

    request_id: str
    status: int
    deployment: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0


def chat(v1: str, key: str, model: str, *, stream: bool = False) -> Answer:
    """One chat completion with the official SDK, on its own connection."""
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
    with OpenAI(base_url=v1, api_key=key, max_retries=0) as client:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": PROMPT}],
                stream=stream,
                **options,
            )  # type: ignore[call-overload]
        except openai.APIStatusError as error:
            return Answer(error.response.headers["x-request-id"], error.status_code)
        if stream:
            chunks = list(raw.parse())
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = next(chunk.usage for chunk in chunks if chunk.usage is not None)
        else:
            usage = raw.parse().usage
        return Answer(
            request_id=raw.headers["x-request-id"],
            status=raw.status_code,
            deployment=raw.headers["x-tollgate-deployment"],
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
        )


def list_models(v1: str, key: str) -> Answer:
    with OpenAI(base_url=v1, api_key=key, max_retries=0) as client:
        raw = client.models.with_raw_response.list()
        return Answer(raw.headers["x-request-id"], raw.status_code)


def access_lines(log_path: Path) -> list[dict[str, Any]]:
    """The `tollgate.access` lines of a server log written with LOG_FORMAT=json."""
    lines = []
    for raw in log_path.read_bytes().splitlines():
        if b'"tollgate.access"' not in raw:
            continue
        line = orjson.loads(raw)  # must be JSON: the test fails otherwise
        if line.get("logger") == "tollgate.access":
            lines.append(line)
    return lines
