"""A stage URL whose host is a DNS name standing for several servers (compose --scale, a headless Service):
the gateway expands it to one replica per address, re-resolves it on every readiness check, spreads calls
over every address and skips one that went away. Real gRPC servers on 127.0.0.1 and 127.0.0.2 (same port),
behind a resolver the test controls (the default resolver is the system's getaddrinfo)."""
from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
import tritonclient.grpc.service_pb2 as pb
import tritonclient.grpc.service_pb2_grpc as pb_grpc
import grpc

from cosyvoice_gateway.stage_client import (
    StageClient, expand_url, resolve_addresses, split_host_port, stage_config,
)


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


# --- real servers on two loopback addresses ----------------------------------------------------------------

class FakeTriton(pb_grpc.GRPCInferenceServiceServicer):
    """Just enough of Triton's gRPC service for StageClient: readiness, config, a unary infer that counts."""

    def __init__(self, model: str):
        self.model = model
        self.infers = 0

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.model)

    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config={"name": self.model, "max_batch_size": 0})

    async def ModelInfer(self, request, context):
        self.infers += 1
        await asyncio.sleep(0.01)
        out = np.array([self.infers], dtype=np.int32)
        return pb.ModelInferResponse(
            model_name=self.model, id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="n", datatype="INT32", shape=[1])],
            raw_output_contents=[out.tobytes()])


def _port_free_on_both(port: int) -> bool:
    for host in ("127.0.0.1", "127.0.0.2"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


async def _start_pair(model: str):
    """Two servers on the same port of 127.0.0.1 and 127.0.0.2 (what one name with two A records reaches)."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not _port_free_on_both(port):
            continue
        servers, fakes = [], []
        try:
            for host in ("127.0.0.1", "127.0.0.2"):
                fake = FakeTriton(model)
                server = grpc.aio.server()
                pb_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
                if server.add_insecure_port(f"{host}:{port}") == 0:
                    raise OSError(f"cannot bind {host}:{port}")
                await server.start()
                servers.append(server)
                fakes.append(fake)
            return port, servers, fakes
        except (OSError, RuntimeError):
            for server in servers:
                await server.stop(0)
    pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")


def _tokenizer_inputs() -> dict[str, np.ndarray]:
    return {"reference_wav": np.zeros(160, np.float32), "reference_wav_len": np.array([160], np.int32)}


def test_name_resolving_to_two_addresses_spreads_calls_and_skips_a_stopped_server():
    async def main():
        port, servers, fakes = await _start_pair("audio_tokenizer")
        resolver = FakeResolver({"tokenizer.test": ["127.0.0.1", "127.0.0.2", "::1"]})
        config = stage_config("tokenizer", f"tokenizer.test:{port}", 5.0)
        client = StageClient(config, resolver=resolver)
        try:
            assert await client.check_ready()
            assert client.replica_urls == (f"127.0.0.1:{port}", f"127.0.0.2:{port}")
            await asyncio.gather(*(client.infer(_tokenizer_inputs(), ["n"]) for _ in range(12)))
            assert [f.infers for f in fakes] == [6, 6]       # least outstanding, ties round-robin
            await servers[1].stop(0)                         # one container goes away
            for _ in range(6):                               # a call may hit it once: retried elsewhere
                await client.infer(_tokenizer_inputs(), ["n"])
            assert fakes[0].infers == 12 and fakes[1].infers == 6
            await client.check_ready()
            assert [r.ready for r in client._replicas] == [True, False]
            resolver.table["tokenizer.test"] = ["127.0.0.1"]  # DNS drops it: back to the configured name
            await client.check_ready()
            assert client.replica_urls == (f"tokenizer.test:{port}",)
        finally:
            await client.close()
            for server in servers:
                await server.stop(0)

    asyncio.run(main())
