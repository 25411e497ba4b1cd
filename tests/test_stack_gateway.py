"""The `stack` fixture: Redis + gateway over the stage servers, gateway healthy on its gRPC and HTTP ports."""
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_stack_gateway_serves_health_over_the_stage_servers(stack):
    assert stack.health() and all(stack.health().values())
    with urllib.request.urlopen(f"{stack.gateway_http_url}/healthz", timeout=5) as response:
        assert response.status == 200
    with grpc.insecure_channel(stack.gateway_grpc_url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
