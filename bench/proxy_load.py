"""Load for the proxy benchmark: wrk with a Lua script, and a streaming probe.

The Lua script sends non-streamed chat completions, rotating keys and models, and
reports latency percentiles and the number of requests it *sent* (completed ones
plus those in flight when wrk stopped), which the usage ledger must match.
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CHAT_PATH = "/v1/chat/completions"
PROMPT = "Write one short sentence about toll roads."
MAX_TOKENS = 64
_MARK = "BENCH_JSON "

_LUA = """
local keys = {%(keys)s}
local bodies = {%(bodies)s}
local n = 0
sent = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function request()
  n = n + 1
  sent = n
  local key = keys[(n %% #keys) + 1]
  local body = bodies[(math.floor(n / #keys) %% #bodies) + 1]
  return wrk.format("POST", "%(path)s", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. key,
  }, body)
end

function done(summary, latency, requests)
  local total_sent = 0
  for _, thread in ipairs(threads) do
    total_sent = total_sent + (thread:get("sent") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"sent":%%d,"duration_us":%%d,"connect_errors":%%d,' ..
    '"read_errors":%%d,"write_errors":%%d,"status_errors":%%d,"timeouts":%%d,' ..
    '"p50_us":%%.1f,"p90_us":%%.1f,"p99_us":%%.1f,"max_us":%%.1f,"mean_us":%%.1f}\\n',
    summary.requests, total_sent, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def chat_body(model: str, *, stream: bool = False) -> str:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(body, separators=(",", ":"))


def write_lua(path: Path, *, keys: list[str], models: list[str]) -> Path:
    path.write_text(
        _LUA
        % {
            "keys": ", ".join(_lua_string(key) for key in keys),
            "bodies": ", ".join(_lua_string(chat_body(model)) for model in models),
            "path": CHAT_PATH,
            "mark": _MARK,
        }
    )
    return path


@dataclass(frozen=True)
class WrkResult:
    connections: int
    requests: int
    sent: int
    duration_s: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def run_wrk(
    wrk: str, *, port: int, script: Path, connections: int, duration_s: int, cpu: int
) -> WrkResult:
    """One wrk run (one thread, pinned to `cpu`) against 127.0.0.1:`port`."""
    argv = [
        "taskset", "-c", str(cpu), wrk, "-t1", f"-c{connections}", f"-d{duration_s}s",
        "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((ln for ln in finished.stdout.splitlines() if ln.startswith(_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary:\n{finished.stdout}\n{finished.stderr}")
    raw = json.loads(line[len(_MARK) :])
    errors = sum(
        raw[name]
        for name in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return WrkResult(
        connections=connections,
        requests=raw["requests"],
        sent=raw["sent"],
        duration_s=raw["duration_us"] / 1e6,
        errors=errors,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


@dataclass(frozen=True)
class StreamResult:
    sent: int
    ok: int  # 200, a content chunk, the usage chunk and [DONE]
    ttft_ms: list[float]
    total_ms: list[float]

    @property
    def errors(self) -> int:
        return self.sent - self.ok

    @property
    def ttft_p50_ms(self) -> float:
        return statistics.median(self.ttft_ms) if self.ttft_ms else float("nan")


# The first chunk carrying text: `"content":"` followed by anything but the closing quote.
_CONTENT = re.compile(rb'"content":"[^"]')


def _one_stream(port: int, key: str, model: str) -> tuple[bool, float, float]:
    body = chat_body(model, stream=True).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    received = b""
    first_content = None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        conn.sendall(head + body)
        while True:
            data = conn.recv(65536)
            if not data:
                break
            received += data
            if first_content is None and _CONTENT.search(received):
                first_content = time.perf_counter()
    ended = time.perf_counter()
    ok = (
        received.startswith(b"HTTP/1.1 200")
        and first_content is not None
        and b'"usage":{' in received
        and b"[DONE]" in received
    )
    ttft = ((first_content or ended) - started) * 1000
    return ok, ttft, (ended - started) * 1000


def stream_probe(*, port: int, keys: list[str], models: list[str], count: int) -> StreamResult:
    """`count` streamed completions one after another; time to the first text chunk."""
    ttfts, totals, ok = [], [], 0
    for n in range(count):
        try:
            good, ttft, total = _one_stream(port, keys[n % len(keys)], models[n % len(models)])
        except OSError:
            continue
        if good:
            ok += 1
            ttfts.append(ttft)
            totals.append(total)
    return StreamResult(sent=count, ok=ok, ttft_ms=ttfts, total_ms=totals)
