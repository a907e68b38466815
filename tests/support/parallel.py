"""A Redis database of its own for each pytest-xdist worker (`make test` runs the suite
on several workers: most tests wait on servers, few use a core throughout).

pytest-django gives each worker a database of its own (test_<name>_gw0, …); the Redis
counters, streams and rate buckets need the same, or one worker's session would delete
another's counters. Worker gwN takes database (the base's − N), so REDIS_URL's database
must leave room below it (the Makefile uses 15).

Load it with `-p tests.support.parallel` (the Makefile does): it must change REDIS_URL
before pytest-django imports the settings, which happens before any conftest is read.
"""

import os
from urllib.parse import urlsplit, urlunsplit

import pytest


def worker_redis_url(url: str, worker: str) -> str:
    """`url` with the database of xdist worker `worker` ("gw0", "gw1", …)."""
    parts = urlsplit(url)
    base = int(parts.path.strip("/") or 0)
    database = base - int(worker.removeprefix("gw"))
    if database < 0:
        raise pytest.UsageError(
            f"REDIS_URL's database {base} leaves no database for xdist worker {worker}: "
            "use a higher one (databases 0-15 exist by default) or fewer workers"
        )
    return urlunsplit(parts._replace(path=f"/{database}"))


_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and os.environ.get("REDIS_URL"):
    os.environ["REDIS_URL"] = worker_redis_url(os.environ["REDIS_URL"], _worker)
