"""A real Celery worker killed in the middle of ingestion loses nothing and counts nothing twice."""

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.db.models import Count, Sum

from billing.models import UsageEvent
from billing.stream import (
    USAGE_GROUP,
    UsageStreamProducer,
    dead_letter_stream,
    usage_record_decode,
    usage_stream_async_client,
)
from tenants.models import Organization, Team, VirtualKey
from tenants.services import virtual_key_issue
from tests.billing.test_stream import make_record
from tests.conftest import TEST_ACTOR
from tests.support.gateway import celery_process, database_env, wait_until
from tests.support.processes import REPO_ROOT

pytestmark = pytest.mark.skipif(
    not settings.REDIS_URL, reason="the Celery worker and the usage stream need Redis"
)

RECORDS = 2_000
BATCH = 100
# Each batch waits this long between its commit and its acknowledgement, so the
# kill lands in the window where a lost ack would count a batch twice.
PAUSE_AFTER_COMMIT_S = 0.4

# The worker, with a pause injected after each committed batch; the rest is the
# production worker: same app, task, drain and ledger write.
SLOW_WORKER = f"""
import sys, time
import django
django.setup()
import billing.stream
from gatewaysite.celery import app

write = billing.stream.usage_events_write

def write_then_pause(records):
    write(records)
    time.sleep({PAUSE_AFTER_COMMIT_S})

billing.stream.usage_events_write = write_then_pause
app.worker_main(sys.argv[1:])
"""


@pytest.fixture
def stream() -> Iterator[str]:
    """A stream of this test's own, out of reach of any other worker in the session."""
    name = f"tollgate:usage:e2e-{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(name, dead_letter_stream(name))
    client.close()


@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_batch_and_restarted_loses_nothing_and_counts_nothing_twice(
    org: Organization, team: Team, stream: str, tmp_path: Path
) -> None:
    key: VirtualKey = virtual_key_issue(org=org, team=team, name="e2e", actor=TEST_ACTOR).key
    records = [make_record(key, cost_nanos=1_000 + n) for n in range(RECORDS)]

    async def produce() -> None:
        producer = UsageStreamProducer(
            client=usage_stream_async_client(settings.REDIS_URL),
            stream=stream,
            spool_dir=tmp_path / "spool",
            flush_interval_s=0.05,
            batch_size=500,
        )
        for record in records:
            producer.add(record)
        assert await producer.flush()
        await producer.aclose()

    asyncio.run(produce())
    client = redis.Redis.from_url(settings.REDIS_URL)
    assert client.xlen(stream) == RECORDS

    env = {
        **os.environ,
        **database_env(),
        "TOLLGATE_USAGE_STREAM": stream,
        "TOLLGATE_USAGE_BATCH_SIZE": str(BATCH),
        "TOLLGATE_USAGE_DRAIN_SECONDS": "1",
        "TOLLGATE_USAGE_CLAIM_IDLE_SECONDS": "1",
    }
    rows = UsageEvent.objects.filter(org=org)
    worker_args = ["worker", "--concurrency", "1", "--loglevel", "INFO"]
    with (
        tempfile.TemporaryDirectory() as beat_dir,
        celery_process("beat", "--schedule", f"{beat_dir}/schedule", "--loglevel", "INFO", env=env),
    ):
        slow_worker = subprocess.Popen(
            [sys.executable, "-c", SLOW_WORKER, *worker_args],
            env=env, cwd=REPO_ROOT, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until(lambda: rows.count() >= 5 * BATCH, timeout_s=60, what="five batches")
        finally:
            os.killpg(slow_worker.pid, signal.SIGKILL)  # the worker and its pool, at once
            slow_worker.wait()

        # The kill hit between a commit and its acknowledgement: entries whose
        # events are in the ledger are still pending in the stream.
        assert 5 * BATCH <= rows.count() < RECORDS
        held = client.xpending_range(stream, USAGE_GROUP, "-", "+", count=RECORDS)
        assert held
        held_events = {
            usage_record_decode(
                client.xrange(stream, entry["message_id"], entry["message_id"])[0][1]
            ).event_id
            for entry in held
        }
        assert rows.filter(id__in=held_events).exists()

        # The production worker, restarted: a new consumer that claims what the dead one held.
        with celery_process(*worker_args, env=env):
            wait_until(
                lambda: client.xlen(stream) == 0 and rows.count() == RECORDS,
                timeout_s=90,
                what="the restarted worker to drain the stream",
            )

    assert rows.aggregate(events=Count("id"), cost_nanos=Sum("cost_nanos")) == {
        "events": RECORDS,
        "cost_nanos": sum(1_000 + n for n in range(RECORDS)),
    }
    assert set(rows.values_list("id", flat=True)) == {record.event_id for record in records}
    assert client.xpending(stream, USAGE_GROUP)["pending"] == 0
    assert client.xlen(dead_letter_stream(stream)) == 0
    client.close()
