"""A stage URL whose host is a DNS name standing for several servers (compose --scale, a headless Service):
the gateway expands it to one replica per address, re-resolves it on every readiness check, spreads calls
over every address and skips one that went away. Real tritonservers (a trivial Python model under the
tokenizer's model name) on 127.0.0.1 and 127.0.0.2 (same port),
behind a resolver the test controls (the default resolver is the system's getaddrinfo)."""
from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
import tritonclient.grpc

from cosyvoice_gateway.stage_client import (
    StageClient, expand_url, resolve_addresses, split_host_port, stage_config,
)
from cosyvoice_gateway.testing import STANDIN_TOKENIZER_CONFIG
from cosyvoice_launcher.triton import TritonServer, TritonServerConfig, free_ports


# --- expansion rules -----------------------------------------------------------------------------------

def test_localhost_dual_stack_stays_one_replica():
    assert expand_url("localhost:8401", ["127.0.0.1", "::1"]) == ("localhost:8401",)
    assert expand_url("localhost:8401", ["::1", "127.0.0.1", "127.0.0.1"]) == ("localhost:8401",)


def test_name_with_several_ipv4_addresses_expands_in_resolver_order_without_duplicates():
    got = expand_url("token2wav:8401", ["10.0.0.7", "10.0.0.5", "10.0.0.7", "fd00::7", "10.0.0.6"])
    assert got == ("10.0.0.7:8401", "10.0.0.5:8401", "10.0.0.6:8401")


def test_ipv6_only_name_expands_to_bracketed_addresses():
    assert expand_url("t2w:8401", ["fd00::1", "fd00::2%eth0", "fd00::1"]) == ("[fd00::1]:8401", "[fd00::2]:8401")


def test_ip_literals_single_addresses_and_failed_lookups_stay_as_configured():
    assert expand_url("10.0.0.1:8401", ["10.0.0.1", "10.0.0.2"]) == ("10.0.0.1:8401",)
    assert expand_url("[::1]:8401", []) == ("[::1]:8401",)
    assert expand_url("token2wav:8401", ["10.0.0.5"]) == ("token2wav:8401",)
    assert expand_url("token2wav:8401", []) == ("token2wav:8401",)
    assert split_host_port("[fd00::1]:9") == ("fd00::1", 9)
    with pytest.raises(ValueError):
        split_host_port("token2wav")


def test_system_resolver_resolves_localhost_to_loopback():
    addresses = asyncio.run(resolve_addresses("localhost", 8401))
    assert addresses and set(addresses) <= {"127.0.0.1", "::1"}


class FakeResolver:
    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.table[host])


def test_replicas_follow_dns_as_containers_come_and_go():
    async def main():
        resolver = FakeResolver({"t2w": ["10.9.0.1"]})
        client = StageClient(stage_config("token2wav", "t2w:8401,10.9.9.9:8401", 0.2), resolver=resolver)
        assert client.replica_urls == ("t2w:8401", "10.9.9.9:8401")       # before any check: as configured
        resolver.table["t2w"] = ["10.9.0.1", "10.9.0.2", "10.9.0.3"]       # docker compose up --scale t2w=3
        await client.refresh_addresses()
        assert client.replica_urls == ("10.9.0.1:8401", "10.9.0.2:8401", "10.9.0.3:8401", "10.9.9.9:8401")
        kept = client._replicas[0]
        resolver.table["t2w"] = ["10.9.0.1", "10.9.0.3"]                   # one container removed
        await client.refresh_addresses()
        assert client.replica_urls == ("10.9.0.1:8401", "10.9.0.3:8401", "10.9.9.9:8401")
        assert client._replicas[0] is kept                                 # state (outstanding, ready) kept
        assert [r.url for r in client._retired] == ["t2w:8401", "10.9.0.2:8401"]   # closed once idle
        del resolver.table["t2w"]                                          # DNS outage: keep what we have
        await client.refresh_addresses()
        assert client.replica_urls == ("10.9.0.1:8401", "10.9.0.3:8401", "10.9.9.9:8401")
        assert not await client.check_ready()                              # nothing listens there
        assert client._retired == []                                       # idle retired clients closed
        await client.close()

    asyncio.run(main())


# --- real tritonservers on two loopback addresses ----------------------------------------------------------

MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils

from cosyvoice_common.triton_io import to_triton


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([to_triton("n", np.array([1], np.int32))]) for _ in requests]
"""


def _free_on_both(port: int) -> bool:
    for host in ("127.0.0.1", "127.0.0.2"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


@pytest.fixture
def server_pair(tmp_path):
    """Two tritonservers with a trivial `audio_tokenizer` on the same ports of 127.0.0.1 and 127.0.0.2 (what one
    name with two A records reaches)."""
    repo = tmp_path / "models"
    (repo / "audio_tokenizer" / "1").mkdir(parents=True)
    (repo / "audio_tokenizer" / "config.pbtxt").write_text(STANDIN_TOKENIZER_CONFIG)
    (repo / "audio_tokenizer" / "1" / "model.py").write_text(MODEL)
    for _ in range(20):
        ports = free_ports(3)
        if all(_free_on_both(p) for p in ports):
            break
    else:
        raise AssertionError("no 3 ports free on both 127.0.0.1 and 127.0.0.2")
    servers = [TritonServer(TritonServerConfig(repo, *ports, tmp_path / f"triton-{host}.log", host=host)).start()
               for host in ("127.0.0.1", "127.0.0.2")]
    try:
        for server in servers:
            server.wait_ready(180.0)
        yield ports[1], servers
    finally:
        for server in servers:
            server.stop()


def _served(server: TritonServer) -> int:
    stats = tritonclient.grpc.InferenceServerClient(server.grpc_url).get_inference_statistics(
        "audio_tokenizer", as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def _counted(servers: list[TritonServer], total: int) -> list[int]:
    """Each server's count once they add up to `total` (Triton counts a request a moment after it answered)."""
    deadline = time.monotonic() + 60
    while sum(counts := [_served(s) for s in servers]) < total and time.monotonic() < deadline:
        time.sleep(0.1)
    return counts


def _tokenizer_inputs() -> dict[str, np.ndarray]:
    return {"reference_wav": np.zeros(160, np.float32), "reference_wav_len": np.array([160], np.int32)}


def test_name_resolving_to_two_addresses_spreads_calls_and_skips_a_stopped_server(server_pair):
    port, servers = server_pair

    async def main():
        resolver = FakeResolver({"tokenizer.test": ["127.0.0.1", "127.0.0.2", "::1"]})
        config = stage_config("tokenizer", f"tokenizer.test:{port}", 30.0)
        client = StageClient(config, resolver=resolver)
        try:
            assert await client.check_ready()
            assert client.replica_urls == (f"127.0.0.1:{port}", f"127.0.0.2:{port}")
            await asyncio.gather(*(client.infer(_tokenizer_inputs(), ["n"]) for _ in range(12)))
            assert _counted(servers, 12) == [6, 6]           # least outstanding, ties round-robin
            await asyncio.to_thread(servers[1].stop)         # one container goes away
            for _ in range(6):                               # a call may hit it once: retried elsewhere
                await client.infer(_tokenizer_inputs(), ["n"])
            assert _counted(servers[:1], 12) == [12]
            await client.check_ready()
            assert [r.ready for r in client._replicas] == [True, False]
            resolver.table["tokenizer.test"] = ["127.0.0.1"]  # DNS drops it: back to the configured name
            await client.check_ready()
            assert client.replica_urls == (f"tokenizer.test:{port}",)
        finally:
            await client.close()

    asyncio.run(main())
