"""The production-like stack (`bin/run-stack`) on the test database and Redis, for a block."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.gateway import LOOPBACK_PROVIDERS_ENV, GatewayServer, database_env
from tests.support.processes import REPO_ROOT, free_port, running_process


@contextmanager
def production_stack(var_dir: Path, **extra_env: str) -> Iterator[GatewayServer]:
    """Run `bin/run-stack`: release, then web (uvicorn, WEB_WORKERS), Celery worker and beat.

    Call it from a test marked django_db(transaction=True): the processes see only
    committed rows, and pytest-django flushes what they wrote afterwards. REDIS_URL
    and the secrets come from the test run's environment; `extra_env` overrides.
    """
    port = free_port()
    env = {
        **os.environ,
        **database_env(),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "TOLLGATE_VAR_DIR": str(var_dir),
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        **LOOPBACK_PROVIDERS_ENV,
        **extra_env,
    }
    base_url = f"http://127.0.0.1:{port}"
    with running_process(
        [str(REPO_ROOT / "bin/run-stack")],
        env=env,
        # Without a key the proxy answers 401 (and meters nothing), once a worker serves.
        ready_url=f"{base_url}/v1/models",
        timeout_s=90,
        cwd=REPO_ROOT,
    ):
        yield GatewayServer(base_url=base_url)
