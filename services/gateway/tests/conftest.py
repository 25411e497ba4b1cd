"""Gateway test fixtures: a private real redis-server; the session stack's HTTP address once it is ready."""
import time

import httpx
import pytest

from cosyvoice_gateway.testing import RedisProcess

READY_WAIT_S = 60.0


@pytest.fixture
def gateway_redis(tmp_path):
    """A private redis-server (some tests stop it on purpose, so it is not the shared fixture)."""
    proc = RedisProcess(tmp_path).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def stack_http_url(stack) -> str:
    """http://host:port of the session stack's gateway, once /readyz says every stage has a ready replica."""
    url = stack.gateway_http_url
    deadline = time.monotonic() + READY_WAIT_S
    while httpx.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "gateway /readyz never became 200"
        time.sleep(0.2)
    return url
