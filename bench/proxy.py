"""Proxy benchmark: Tollgate vs LiteLLM Proxy vs the floor (direct to the mock), one run.

Production-like: PostgreSQL (a scratch database this script creates and drops), Redis
db 8, one uvicorn worker pinned to CPU 1, Celery worker and beat on CPU 0 so usage
flows into the ledger as in production. It seeds 10,000 keys with rate limits and
budgets and 100 routes, then measures each system in turn, round by round: wrk at 1
and 64 connections, a streaming probe (time to first content chunk) and peak RSS.
Afterwards it checks that every request Tollgate got is in the ledger and that the
budget counters equal the ledger. Writes bench/RESULTS.md and bench/results/run-*.jsonl.

    make bench                      # or: .venv/bin/python bench/proxy.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import proxy_load  # noqa: E402
import proxy_report  # noqa: E402
import proxy_seed  # noqa: E402
import proxy_stack  # noqa: E402
from proxy_stack import GATEWAY_CPU, LOAD_CPU, REPO, Process, Stack  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
ENCRYPTION_KEY = "YmVuY2gtb25seS1mZXJuZXQta2V5LTAxMjM0NTY3ODk="
BENCH_ENV = {
    "DATABASE_URL": f"{proxy_seed.PG_ROOT}/{proxy_seed.SCRATCH_DB}",
    "REDIS_URL": REDIS_URL,
    "DEBUG": "false",
    "SECRET_KEY": "bench-only-secret-key-0123456789abcdefghijklmnopqrstuvwxyz",
    "TOLLGATE_ENCRYPTION_KEYS": ENCRYPTION_KEY,
    "ALLOWED_HOSTS": "127.0.0.1,localhost",
    "DJANGO_SETTINGS_MODULE": "gatewaysite.settings",
    "LOG_LEVEL": "WARNING",
    # The mock provider listens on loopback, which production settings refuse to call.
    "TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS": "true",
}
LITELLM_MASTER_KEY = "sk-bench-master-key"
# Streams: 16 words 5 ms apart, so a gateway that holds chunks back shows it.
MOCK_CHUNK_DELAY_MS = 5
# As the Procfile serves it (gatewaysite/http_server.py: head and first bytes in one write).
HTTP_PROTOCOL = "gatewaysite.http_server:GatewayHttpProtocol"


@dataclass(frozen=True)
class System:
    name: str  # "direct", "tollgate", "litellm"
    label: str
    port: int
    keys: list[str]
    process: Process


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the cleanup in main()


def _versions(python: Path, litellm: bool) -> dict[str, str]:
    import django

    def run(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        return (done.stdout or done.stderr).strip()

    rev = run(["git", "rev-parse", "--short", "HEAD"])
    if run(["git", "status", "--porcelain", "--untracked-files=no"]):
        rev += " (with uncommitted changes)"
    versions = {
        "Python": run([str(python), "-c", _PYTHON_VERSION]),
        "Django": django.get_version(),
        "Tollgate": rev,
        "uvicorn": run([str(python), "-c", "import uvicorn; print(uvicorn.__version__)"]),
        "wrk": run(["wrk", "-v"]).splitlines()[0].split(" [")[0].removeprefix("wrk "),
        "PostgreSQL": _server_versions()[0],
        "Redis": _server_versions()[1],
    }
    if litellm:
        versions["LiteLLM"] = proxy_stack.litellm_version() or "?"
    return versions


# The gateways' interpreter: its version and which build it is.
_PYTHON_VERSION = (
    "import platform, sys; print(platform.python_version(), f'({sys._base_executable})')"
)


def _server_versions() -> tuple[str, str]:
    import redis
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        postgres = cursor.fetchone()[0].split()[0]
    return postgres, str(redis.Redis.from_url(REDIS_URL).info("server")["redis_version"])


def _machine() -> dict[str, str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    memory_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{memory_kb / 1024**2:.0f} GiB",
        "os": platform.platform(),
    }


class Recorder:
    """Appends one JSON line per measurement and keeps them for the report."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        self.rows: list[dict[str, object]] = []

    def add(self, **row: object) -> None:
        row = {"run": self.run_id, "at": datetime.now(UTC).isoformat(), **row}
        self.rows.append(row)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def _start_stack(stack: Stack, args: argparse.Namespace, models: list[str]) -> dict[str, System]:
    """Mock, Tollgate (web + Celery worker + beat) and LiteLLM, each ready."""
    env = {**os.environ, **BENCH_ENV}
    mock_port = args.mock_port
    python = str(args.run_python)
    mock = stack.start(
        "mock",
        [python, "-m", "routing.mockprovider", "--host", "127.0.0.1",
         "--port", str(mock_port), "--chunk-delay-ms", str(MOCK_CHUNK_DELAY_MS)],
        cpu=LOAD_CPU, env=env,
    )  # fmt: skip
    proxy_stack.wait_http(mock_port, "/_mock/health", process=mock)

    web_port = proxy_stack.free_port()
    web = stack.start(
        "tollgate-web",
        [python, "-m", "uvicorn", "gatewaysite.asgi:application", "--host", "127.0.0.1",
         "--port", str(web_port), "--workers", "1", "--no-access-log", "--http", HTTP_PROTOCOL],
        cpu=GATEWAY_CPU, env=env,
    )  # fmt: skip
    celery = [python, "-m", "celery", "-A", "gatewaysite"]
    celery_worker = stack.start(
        "celery-worker",
        [*celery, "worker", "--loglevel", "WARNING", "--concurrency", "2"],
        cpu=LOAD_CPU,
        env=env,
    )
    stack.start(
        "celery-beat",
        [*celery, "beat", "--loglevel", "WARNING",
         "--schedule", str(Path(env["TOLLGATE_VAR_DIR"]) / "celerybeat-schedule")],
        cpu=LOAD_CPU, env=env,
    )  # fmt: skip
    # Any answer on an unknown /v1 path: up, its lifespan startup (snapshot load) done,
    # and nothing metered.
    proxy_stack.wait_http(web_port, "/v1/bench-ready", process=web)
    args.shared_pids = {"celery": celery_worker.pid}
    redis_pid = proxy_stack.redis_server_pid(REDIS_URL)
    if redis_pid is not None:
        args.shared_pids["redis"] = redis_pid
    systems = {
        "direct": System("direct", "direct (mock, no gateway)", mock_port, ["none"], mock),
        "tollgate": System(
            "tollgate", "Tollgate", web_port, [key for key, _ in args.seeded.bench_keys], web
        ),
    }
    if not args.skip_litellm:
        litellm_port = proxy_stack.free_port()
        config = Path(env["TOLLGATE_VAR_DIR"]) / "litellm-config.yaml"
        proxy_stack.litellm_config(
            config, mock_port=mock_port, models=models, master_key=LITELLM_MASTER_KEY
        )
        litellm = stack.start(
            "litellm",
            [str(args.litellm_cli), "--config", str(config), "--host", "127.0.0.1",
             "--port", str(litellm_port), "--num_workers", "1"],
            cpu=GATEWAY_CPU, env=proxy_stack.litellm_env(env),
        )  # fmt: skip
        proxy_stack.wait_http(litellm_port, "/health/liveliness", process=litellm, timeout_s=180)
        systems["litellm"] = System(
            "litellm", "LiteLLM Proxy (master key, no DB)", litellm_port,
            [LITELLM_MASTER_KEY], litellm,
        )  # fmt: skip
    return systems


def _measure_round(
    round_number: int,
    systems: dict[str, System],
    args: argparse.Namespace,
    scripts: dict[str, Path],
    models: list[str],
    recorder: Recorder,
    sent: dict[str, int],
    answered: dict[str, int],
) -> None:
    for system in systems.values():
        print(f"round {round_number}: {system.label}", flush=True)
        wrk = {"wrk": args.wrk, "port": system.port, "script": scripts[system.name]}
        warm = proxy_load.run_wrk(
            **wrk, connections=8, duration_s=args.warmup_seconds, cpu=LOAD_CPU
        )
        # CPU per request at load: the gateway's own, and (for Tollgate) what the shared
        # Redis and the Celery worker ingesting usage spend per request, which is what
        # decides how throughput scales with more workers (bench/README.md).
        shared = args.shared_pids if system.name == "tollgate" else {}
        with proxy_stack.RssSampler(system.process.pid) as rss:
            c1 = proxy_load.run_wrk(**wrk, connections=1, duration_s=args.c1_seconds, cpu=LOAD_CPU)
            with proxy_stack.CpuMeter({"gateway": system.process.pid, **shared}) as cpu:
                many = proxy_load.run_wrk(
                    **wrk, connections=args.connections, duration_s=args.cmany_seconds,
                    cpu=LOAD_CPU,
                )  # fmt: skip
            stream = proxy_load.stream_probe(
                port=system.port, keys=system.keys, models=models, count=args.stream_requests
            )
        sent[system.name] += warm.sent + c1.sent + many.sent + stream.sent
        # A probe waits for its whole answer: each one sent was read by the gateway.
        answered[system.name] += warm.requests + c1.requests + many.requests + stream.sent
        common = {"round": round_number, "system": system.name}
        for phase, result in (("warmup", warm), ("c1", c1), ("cmany", many)):
            recorder.add(**common, phase=phase, **asdict(result), rps=result.rps)
        recorder.add(
            **common, phase="stream", sent=stream.sent, ok=stream.ok, errors=stream.errors,
            ttft_p50_ms=stream.ttft_p50_ms, ttft_ms=stream.ttft_ms, total_ms=stream.total_ms,
        )  # fmt: skip
        recorder.add(**common, phase="rss", peak_rss_bytes=rss.peak_bytes)
        recorder.add(
            **common, phase="cpu", requests=many.requests,
            **{f"{name}_us_per_request": 1e6 * seconds / max(1, many.requests)
               for name, seconds in cpu.seconds.items()},
        )  # fmt: skip
        check = f"{c1.errors + many.errors + stream.errors} errors"
        print(
            f"  p50 c=1 {c1.p50_ms:.2f} ms, {many.rps:,.0f} rps c={args.connections}, "
            f"TTFT p50 {stream.ttft_p50_ms:.2f} ms, RSS {rss.peak_bytes / 2**20:.0f} MB, {check}",
            flush=True,
        )


def _profile(
    args: argparse.Namespace, system: System, script: Path, results_dir: Path
) -> proxy_report.Profile | None:
    """py-spy on the Tollgate worker during an extra c=64 run (after the measured rounds)."""
    py_spy = proxy_stack.ensure_py_spy()
    if py_spy is None:
        print("py-spy could not be installed: no profile", flush=True)
        return None
    raw = results_dir / "profile-tollgate.txt"
    rate = 200
    print(f"profiling Tollgate for {args.profile_seconds} s (py-spy, {rate} Hz)", flush=True)
    spy = subprocess.Popen(
        ["taskset", "-c", str(LOAD_CPU), str(py_spy), "record", "--pid", str(system.process.pid),
         "--rate", str(rate), "--duration", str(args.profile_seconds + 1), "--format", "raw",
         "--nonblocking", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1.0)  # py-spy attaches
    load = proxy_load.run_wrk(
        args.wrk, port=system.port, script=script, connections=args.connections,
        duration_s=args.profile_seconds, cpu=LOAD_CPU,
    )  # fmt: skip
    _, errors = spy.communicate(timeout=60)
    if spy.returncode != 0 or not raw.exists():
        print(f"py-spy failed: {errors.decode(errors='replace')[-500:]}", flush=True)
        return proxy_report.Profile.failed(load)
    return proxy_report.Profile.from_collapsed(raw, rate_hz=rate, load=load)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=10_000, help="virtual keys seeded")
    parser.add_argument("--routes", type=int, default=100)
    parser.add_argument("--bench-keys", type=int, default=8, help="keys the load rotates over")
    parser.add_argument("--bench-models", type=int, default=8, help="routes the load rotates")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--warmup-seconds", type=int, default=2)
    parser.add_argument("--c1-seconds", type=int, default=8)
    parser.add_argument("--cmany-seconds", type=int, default=10)
    parser.add_argument("--stream-requests", type=int, default=30)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument(
        "--pin-services", action=argparse.BooleanOptionalAction, default=True,
        help="pin Redis and PostgreSQL to the load generator's core for the run",
    )  # fmt: skip
    parser.add_argument(
        "--python", choices=("optimized", "project"), default="optimized",
        help="what the gateways, the mock and Celery run on: an optimized CPython build "
        "(Debian's python3.11, in bench/.venv-run) or .venv's python",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args()


def main() -> int:
    args = _parse_args()
    run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results_dir = BENCH / "results" / f"run-{run_id}"
    results_dir.mkdir(parents=True)
    recorder = Recorder(BENCH / "results" / f"run-{run_id}.jsonl", run_id)
    args.wrk = proxy_stack.ensure_wrk()
    args.run_python = proxy_stack.ensure_run_python(args.python)
    if args.run_python == proxy_stack.VENV_PY:
        args.python = "project"  # asked for, or no optimized build here
    args.litellm_cli = (
        None
        if args.skip_litellm
        else proxy_stack.ensure_litellm(proxy_stack.base_python(args.run_python))
    )
    args.mock_port = proxy_stack.free_port()
    os.environ.update(BENCH_ENV, TOLLGATE_VAR_DIR=str(results_dir / "var"))
    (results_dir / "var").mkdir()
    sys.path.insert(0, str(REPO))
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    stack = Stack(logs=results_dir)
    services = contextlib.ExitStack()
    started = time.monotonic()
    exit_code = 1
    proxy_seed.recreate_database()
    try:
        import django

        django.setup()
        import redis
        from django.core.management import call_command
        from django.db import connections

        redis.Redis.from_url(REDIS_URL).flushdb()
        call_command("migrate", verbosity=0)
        call_command("import_prices", verbosity=0)
        args.seeded = proxy_seed.seed(
            mock_base_url=f"http://127.0.0.1:{args.mock_port}/v1",
            keys_total=args.keys,
            routes_total=args.routes,
            bench_keys=args.bench_keys,
        )
        # Off the gateway's core, before the stack starts (its backends inherit the pin).
        shared = [proxy_stack.redis_server_pid(REDIS_URL), proxy_stack.postgres_server_pid()]
        args.services_pinned = args.pin_services and services.enter_context(
            proxy_stack.pinned([pid for pid in shared if pid is not None], LOAD_CPU)
        )
        connections.close_all()
        models = [proxy_seed.bench_model(n) for n in range(args.routes)]
        load_models = models[:: max(1, args.routes // args.bench_models)][: args.bench_models]
        systems = _start_stack(stack, args, models)
        # The harness and its probe share CPU 0 with wrk, never the gateway's core.
        os.sched_setaffinity(0, {LOAD_CPU})
        scripts = {
            name: proxy_load.write_lua(
                results_dir / f"{name}.lua", keys=system.keys, models=load_models
            )
            for name, system in systems.items()
        }
        sent = dict.fromkeys(systems, 0)
        answered = dict.fromkeys(systems, 0)
        for round_number in range(1, args.rounds + 1):
            stack.check_alive()
            _measure_round(
                round_number, systems, args, scripts, load_models, recorder, sent, answered
            )
        profile = None
        if args.profile:
            profile = _profile(args, systems["tollgate"], scripts["tollgate"], results_dir)
            if profile is not None:
                sent["tollgate"] += profile.sent
                answered["tollgate"] += profile.requests
        stack.check_alive()  # a Celery worker that died would show as lost usage
        print(f"checking usage: {sent['tollgate']:,} Tollgate requests sent", flush=True)
        accounting = proxy_seed.accounting_check(
            org_id=args.seeded.org_id,
            key_ids=[key_id for _, key_id in args.seeded.bench_keys],
            sent=sent["tollgate"],
            answered=answered["tollgate"],
            redis_url=REDIS_URL,
        )
        recorder.add(phase="accounting", **asdict(accounting), ok=accounting.ok)
        report = proxy_report.Report(
            run_id=run_id,
            args=args,
            machine=_machine(),
            versions=_versions(args.run_python, not args.skip_litellm),
            labels={name: system.label for name, system in systems.items()},
            rows=recorder.rows,
            accounting=accounting,
            profile=profile,
            elapsed_s=time.monotonic() - started,
        )
        args.output.write_text(report.markdown())
        print(f"wrote {args.output} and {recorder.path}", flush=True)
        print(report.summary(), flush=True)
        exit_code = 0 if report.passed_correctness else 1
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        exit_code = 130
    finally:
        # A second Ctrl-C or SIGTERM must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop_all()
        services.close()
        from django.db import connections

        connections.close_all()
        try:
            import redis

            redis.Redis.from_url(REDIS_URL).flushdb()
        finally:
            proxy_seed.drop_database()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
