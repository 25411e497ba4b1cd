"""Prometheus metrics of the gateway (one registry, the process default; served on METRICS_PORT). Their names are
read by other processes (the profiler, dashboards): cosyvoice_common.contracts.GatewayMetric."""
from cosyvoice_common.contracts import GatewayMetric
from prometheus_client import Counter, Histogram

# Stage calls range from ~1 ms (cached, tiny model) to many seconds (long offline token2wav).
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_S_PER_MS = 1e-3

STAGE_LATENCY = Histogram(GatewayMetric.STAGE_SECONDS, "stage call latency seen by the gateway",
                          ["stage", "part"], buckets=_LATENCY_BUCKETS_S)
REQUESTS = Counter(GatewayMetric.REQUESTS, "finished requests", ["rpc", "code"])
FIRST_CHUNK = Histogram(GatewayMetric.FIRST_CHUNK_SECONDS, "request arrival -> first audio chunk",
                        buckets=_LATENCY_BUCKETS_S)
REQUEST_LATENCY = Histogram(GatewayMetric.REQUEST_SECONDS, "request arrival -> last audio",
                            ["rpc"], buckets=_LATENCY_BUCKETS_S)
STAGE_RETRIES = Counter(GatewayMetric.STAGE_RETRIES,
                        "stage calls retried on another replica after an unreachable one", ["stage"])
# Issued, counted when the call is sent (a call cancelled later is still counted): what a client's cancel must
# stop is the gateway issuing more of them.
STAGE_CALLS = Counter(GatewayMetric.STAGE_CALLS, "stage calls issued by the gateway", ["stage"])
CACHE_LOOKUPS = Counter(GatewayMetric.PROMPT_CACHE, "prompt-feature cache lookups", ["result"])


def observe_stage(stage: str, queue_ms: float, compute_ms: float) -> None:
    STAGE_LATENCY.labels(stage=stage, part="queue").observe(queue_ms * _S_PER_MS)
    STAGE_LATENCY.labels(stage=stage, part="compute").observe(compute_ms * _S_PER_MS)
