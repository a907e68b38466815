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
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_PY = REPO / ".venv" / "bin" / "python"
# The processes under test (gateways, mock, Celery) run on an optimized CPython build:
# Debian's python3.11 is built with profile-guided and link-time optimisation into a
# static executable, as the official python Docker images (the Dockerfile's base) are.
# A default pyenv build (--enable-shared, no PGO/LTO), which `.venv` may come from,
# ran the same pure-Python work 1.75x slower here (bench/README.md).
OPTIMIZED_PYTHON = Path("/usr/bin/python3.11")
RUN_VENV = REPO / "bench" / ".venv-run"
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


def base_python(python: Path) -> Path:
    """The interpreter a venv's python runs (itself, outside a venv)."""
    probe = subprocess.run(
        [str(python), "-c", "import sys; print(sys._base_executable)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(probe.stdout.strip()).resolve()


def _venv_of(venv: Path, base: Path) -> bool:
    """Whether `venv` exists and runs on `base`."""
    python = venv / "bin" / "python"
    return python.exists() and base_python(python) == base.resolve()


def ensure_run_python(interpreter: str) -> Path:
    """The python the processes under test run on.

    "project": `.venv`'s. "optimized": a venv of OPTIMIZED_PYTHON with the project
    installed (editable, so it runs this checkout) in bench/.venv-run, made or
    refreshed when pyproject.toml changes; `.venv`'s when that interpreter is missing
    or the venv cannot be made.
    """
    if interpreter == "project":
        return VENV_PY
    if not OPTIMIZED_PYTHON.exists():
        print(f"{OPTIMIZED_PYTHON} not found: the gateways run on .venv's python", flush=True)
        return VENV_PY
    python = RUN_VENV / "bin" / "python"
    stamp = RUN_VENV / ".installed"
    wanted = (REPO / "pyproject.toml").read_text()
    if _venv_of(RUN_VENV, OPTIMIZED_PYTHON) and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"installing the project into {RUN_VENV} ({OPTIMIZED_PYTHON})", flush=True)
    shutil.rmtree(RUN_VENV, ignore_errors=True)
    for step in (
        [str(OPTIMIZED_PYTHON), "-m", "venv", str(RUN_VENV)],
        [str(python), "-m", "pip", "install", "--quiet", "-e", str(REPO)],
    ):
        done = subprocess.run(step, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:  # e.g. no python3.11-venv package
            print(f"{' '.join(step)} failed: the gateways run on .venv's python\n"
                  f"{done.stderr[-2000:]}", flush=True)  # fmt: skip
            shutil.rmtree(RUN_VENV, ignore_errors=True)
            return VENV_PY
    stamp.write_text(wanted)
    return python


def ensure_litellm(base: Path) -> Path:
    """LiteLLM Proxy (pinned) in its own venv on `base` under bench/.litellm; its CLI."""
    cli = LITELLM_VENV / "bin" / "litellm"
    if not _venv_of(LITELLM_VENV, base):
        # The gateways' interpreter, so both sides run the same Python.
        shutil.rmtree(LITELLM_VENV, ignore_errors=True)
        subprocess.run([str(base), "-m", "venv", str(LITELLM_VENV)], check=True)
    elif cli.exists() and litellm_version() == LITELLM_VERSION:
        return cli
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV}", flush=True)
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


def postgres_server_pid() -> int | None:
    """The pid of the PostgreSQL server (postmaster) Django connects to, if local."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path(f"/proc/{backend}/status").read_text().splitlines()
        # A server elsewhere: that pid here, if any, is some other process.
        if status[0].split()[-1] == "postgres":
            return int(next(line for line in status if line.startswith("PPid:")).split()[1])
    return None


@contextlib.contextmanager
def pinned(pids: list[int], cpu: int) -> Iterator[bool]:
    """Every thread of `pids` and of their children on `cpu` for the block, then put back.

    Redis and PostgreSQL are the machine's services, free to run on either core: left
    so, the scheduler ran them on the gateway's core for ~13 % of its time (perf,
    2026-11-22). Processes forked meanwhile (new PostgreSQL backends) inherit the pin.
    Yields whether it could pin them (it needs the right to: root, or their owner).
    """
    saved: dict[int, set[int]] = {}

    def restore() -> None:
        for tid, cpus in saved.items():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setaffinity(tid, cpus)

    try:
        for pid in pids:
            for tid in _threads(_tree(pid)):
                with contextlib.suppress(ProcessLookupError):
                    saved[tid] = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, {cpu})
    except PermissionError:
        restore()  # all or nothing
        yield False
        return
    try:
        yield True
    finally:
        restore()


def _threads(pids: list[int]) -> list[int]:
    tids = []
    for pid in pids:
        with contextlib.suppress(OSError):
            tids += [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    return tids


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
