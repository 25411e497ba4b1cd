"""Gateway test fixtures: a private real redis-server."""
import pytest

from cosyvoice_gateway.testing import RedisProcess


@pytest.fixture
def gateway_redis(tmp_path):
    """A private redis-server (some tests stop it on purpose, so it is not the shared fixture)."""
    proc = RedisProcess(tmp_path).start()
    yield proc
    proc.stop()
