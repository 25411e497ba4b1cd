"""Gateway test fixtures: a private real redis-server; the real stack from the root conftest when present."""
import pytest

from cosyvoice_gateway.testing import RedisProcess


@pytest.fixture
def gateway_redis(tmp_path):
    """A private redis-server (some tests stop it on purpose, so it is not the shared fixture)."""
    proc = RedisProcess(tmp_path).start()
    yield proc
    proc.stop()


@pytest.fixture
def stack_or_skip(request):
    """The real stack (root conftest `stack`), or a skip that says why."""
    try:
        return request.getfixturevalue("stack")
    except pytest.FixtureLookupError:
        pytest.skip("root conftest fixture `stack` (tools/cosyvoice_tools/testing.py) has not landed yet")
