"""The processes of the proxy benchmark: tools, start/stop, readiness, memory.

Every process is started in its own session and pinned with `taskset`, so the
harness can stop the whole group (also on Ctrl-C) and the CPU split is explicit:
CPU 0 carries the load generator, the mock upstream, Celery; CPU 1 the gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_PY = REPO / ".venv" / "bin" / "python"
LITELLM_DIR = REPO / "bench" / ".litellm"
LITELLM_VENV = LITELLM_DIR / "venv"
# Pinned: the version measured in research/bench-results.md and installed here.
LITELLM_VERSION = "1.106.2"
LOAD_CPU, GATEWAY_CPU = 0, 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _root_prefix() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo"]


def ensure_wrk() -> str:
    """wrk on PATH, installed from Debian's archive when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (apt-get)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*_root_prefix(), "apt-get", "install", "-y", "-qq", "wrk"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run([*_root_prefix(), "apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(install, env=env, check=True, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed and apt-get could not install it")
    return found


def ensure_litellm() -> Path:
    """LiteLLM Proxy (pinned) in its own venv under bench/.litellm; its `litellm` CLI."""
    cli = LITELLM_VENV / "bin" / "litellm"
    if cli.exists() and litellm_version() == LITELLM_VERSION:
        return cli
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV}", flush=True)
    if not (LITELLM_VENV / "bin" / "python").exists():
        # The project's interpreter, so both sides run the same Python.
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base), "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run(
        [str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet",
         f"litellm[proxy]=={LITELLM_VERSION}"],
        check=True,
    )  # fmt: skip
    return cli


def litellm_version() -> str | None:
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() or None


def ensure_py_spy() -> Path | None:
    """py-spy in the project venv, installed at run time (not a project dependency)."""
    binary = REPO / ".venv" / "bin" / "py-spy"
    if binary.exists():
        return binary
    print("installing py-spy into .venv for the profile", flush=True)
    install = subprocess.run(
        [str(VENV_PY), "-m", "pip", "install", "--quiet", "py-spy"], capture_output=True
    )
    return binary if install.returncode == 0 and binary.exists() else None


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Stack:
    """The processes this run started, stopped in reverse order whatever happens."""

    logs: Path
    processes: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, cpu: int, env: dict[str, str]) -> Process:
        log = self.logs / f"{name}.log"
        handle = log.open("ab")
        popen = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as one
        )
        handle.close()
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def stop(self, process: Process, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group (graceful: uvicorn settles and flushes usage)."""
        if process.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.popen.wait()
        # Children that outlived their leader (a Celery pool) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.processes)):
            self.stop(process)

    def check_alive(self) -> None:
        for process in self.processes:
            if process.popen.poll() is not None:
                tail = process.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{process.name} exited ({process.popen.returncode}):\n{tail}")


def wait_http(port: int, path: str, *, process: Process, timeout_s: float = 120.0) -> None:
    """Until GET `path` gets any HTTP answer (the server is up and its startup done)."""
    deadline = time.monotonic() + timeout_s
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            tail = process.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{process.name} exited during startup:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(request)
                if conn.recv(16).startswith(b"HTTP/1."):
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{process.name} not ready on port {port} after {timeout_s:.0f} s")


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue.extend(int(child) for child in children)
    return pids


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants so far, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def redis_server_pid(url: str) -> int | None:
    """The pid of the Redis server behind `url` if it runs on this machine, else None."""
    import redis

    with contextlib.suppress(redis.RedisError, KeyError, ValueError):
        pid = int(redis.Redis.from_url(url).info("server")["process_id"])
        if Path(f"/proc/{pid}/stat").exists():
            return pid
    return None


class CpuMeter:
    """CPU seconds each named process tree spends while a block runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = {
            name: tree_cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()
        }


class RssSampler:
    """Peak RSS of a process tree while a block runs (sampled every 100 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))
            self._stop.wait(0.1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))


def litellm_config(path: Path, *, mock_port: int, models: list[str], master_key: str) -> None:
    """LiteLLM's proxy config: every bench model to the mock, master key, no database."""
    # JSON is YAML: no YAML library needed on this side.
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": f"http://127.0.0.1:{mock_port}/v1",
                    "api_key": "mock-provider-secret",
                },
            }
            for model in models
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": master_key},
    }
    path.write_text(json.dumps(config, indent=2))


def litellm_env(base: dict[str, str]) -> dict[str, str]:
    """No database, no network at startup (local cost map), quiet logs."""
    env = {k: v for k, v in base.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",
        NO_DOCS="True",
    )
    return env
