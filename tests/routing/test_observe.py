"""The proxy's per-process counters: histogram buckets, and the snapshot files through
which several workers' counters are summed (a bad or foreign file never breaks a scrape)."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from gatewaysite.metrics import ScrapeView, StoredGauges, exposition
from routing.proxy import observe
from routing.proxy.observe import ProxyMetrics, SnapshotWriter, read_snapshots
from tests.support.observability import parse_samples

SCOPE = {"type": "http", "method": "GET", "path": "/v1/nope", "client": ("127.0.0.1", 1)}


def counted(
    metrics: ProxyMetrics, *, elapsed_s: float, path: str = "/v1/nope", status: int = 404
) -> None:
    observe.request_started()
    observe.request_finished(
        {**SCOPE, "path": path},
        request_id=None,
        status=status,
        headers={},
        started=time.monotonic() - elapsed_s,
        metrics=metrics,
    )


def scraped(metrics: ProxyMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    view = ScrapeView(
        metrics=metrics,
        processes_running=1,
        processes_exited=0,
        process_gauges={},
        circuits={},
        stored=StoredGauges(database_up=True, redis_up=None),
    )
    return parse_samples(exposition(view).decode())


def bucket(samples: dict, le: str, route: str = "none") -> float:  # type: ignore[type-arg]
    labels = frozenset({"route": route, "deployment": "none", "le": le}.items())
    return samples[("tollgate_request_duration_seconds_bucket", labels)]


def test_latency_lands_in_the_first_bucket_that_holds_it_and_buckets_are_cumulative() -> None:
    metrics = ProxyMetrics()
    counted(metrics, elapsed_s=0.3)
    counted(metrics, elapsed_s=400.0)
    samples = scraped(metrics)
    assert bucket(samples, "0.25") == 0
    assert bucket(samples, "0.5") == 1
    assert bucket(samples, "300.0") == 1
    assert bucket(samples, "+Inf") == 2
    labels = frozenset({"route": "none", "deployment": "none"}.items())
    assert samples[("tollgate_request_duration_seconds_sum", labels)] >= 400.3


def test_requests_without_a_key_are_labelled_by_endpoint_never_by_their_path() -> None:
    metrics = ProxyMetrics()
    counted(metrics, elapsed_s=0.01, path="/v1/admin/secret-thing")
    counted(metrics, elapsed_s=0.01, path="/v1/models/some-model", status=401)
    counted(metrics, elapsed_s=0.01, path="/v1/chat/completions/", status=413)
    assert sorted(metrics.requests) == [
        ("chat.completions", "none", "none", 413, "client_error"),
        ("models", "none", "none", 401, "client_error"),
        ("other", "none", "none", 404, "client_error"),
    ]


def test_snapshots_of_several_processes_add_up() -> None:
    first, second = ProxyMetrics(), ProxyMetrics()
    counted(first, elapsed_s=0.01)
    counted(second, elapsed_s=0.01)
    counted(second, elapsed_s=2.0, status=401)
    first.tokens[("alpha", "alpha-east")] = [10, 20]
    second.tokens[("alpha", "alpha-east")] = [1, 2]
    second.upstream_errors[("alpha-east", "upstream_timeout")] = 4
    total = first.copy()
    total.merge(ProxyMetrics())  # an idle worker changes nothing
    total.add_snapshot(orjson.loads(orjson.dumps(second.snapshot())))  # through JSON, as in a file
    assert total.requests == {
        ("other", "none", "none", 404, "client_error"): 2,
        ("other", "none", "none", 401, "client_error"): 1,
    }
    assert total.tokens == {("alpha", "alpha-east"): [11, 22]}
    assert total.upstream_errors == {("alpha-east", "upstream_timeout"): 4}
    histogram = total.latency[("none", "none")]
    assert sum(histogram.counts) == 3 and histogram.sum >= 2.02
    assert first.requests == {("other", "none", "none", 404, "client_error"): 1}  # untouched


def test_a_snapshot_with_other_buckets_keeps_its_counts_but_not_its_histograms() -> None:
    other = ProxyMetrics()
    counted(other, elapsed_s=0.01)
    data = other.snapshot()
    data["latency_buckets"] = [1.0, 2.0]  # a worker of another version, mid-deploy
    total = ProxyMetrics()
    total.add_snapshot(data)
    assert sum(total.requests.values()) == 1
    assert total.latency == {}


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data["requests"].append(["a", "b", "c", 200, "success", -1]),
        lambda data: data["requests"].append(["a", "b", 3, 200, "success", 1]),
        lambda data: data["latency"][0][2].append(5),
        lambda data: data.pop("cache"),
    ],
)
def test_a_malformed_snapshot_is_refused_whole(damage) -> None:  # type: ignore[no-untyped-def]
    source = ProxyMetrics()
    counted(source, elapsed_s=0.01)
    data = orjson.loads(orjson.dumps(source.snapshot()))
    damage(data)
    total = ProxyMetrics()
    with pytest.raises((ValueError, TypeError, KeyError, IndexError)):
        total.add_snapshot(data)
    assert total.requests == {} and total.latency == {}


def test_workers_files_are_read_back_and_a_dead_worker_s_counts_are_kept(
    tmp_path: Path,
) -> None:
    live = ProxyMetrics()
    counted(live, elapsed_s=0.01)
    writer = SnapshotWriter(
        tmp_path, interval_s=60, gauges=lambda: {"usage_buffered_events": 3}, metrics=live
    )
    asyncio.run(writer.write())
    # A worker that exited: a pid nobody has any more.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    (tmp_path / f"web-{dead_pid}.json").write_bytes(
        orjson.dumps(
            {
                "version": 1,
                "pid": dead_pid,
                "written_at": 0,
                "metrics": live.snapshot(),
                "gauges": {"usage_buffered_events": 7},
            }
        )
    )
    (tmp_path / "web-12345678.json").write_bytes(b"{not json")
    (tmp_path / "web-12345679.json").write_bytes(orjson.dumps({"version": 99, "pid": 12345679}))

    snapshots = {s.pid: s for s in read_snapshots(tmp_path)}
    assert set(snapshots) == {os.getpid(), dead_pid}
    assert snapshots[os.getpid()].alive and not snapshots[dead_pid].alive
    assert snapshots[os.getpid()].gauges == {"usage_buffered_events": 3.0}
    assert snapshots[dead_pid].metrics.requests == live.requests
    assert {s.pid for s in read_snapshots(tmp_path, skip_pid=os.getpid())} == {dead_pid}
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed
