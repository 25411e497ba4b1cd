"""Per-stage profile of a live stack, in one table: what the gateway saw and what each Triton server did.

    python -m cosyvoice_tools.profile                 # addresses from run/stack.json (`make up`)
    python -m cosyvoice_tools.profile --watch 2       # refresh every 2 s, numbers for the last interval
    python -m cosyvoice_tools.profile --gateway 127.0.0.1:8080 --stages 127.0.0.1:8100,127.0.0.1:8400
    python -m cosyvoice_tools.profile --print-addresses stage-http    # for scripts (make bench)

Sources:
  gateway   Prometheus text on its HTTP port (/metrics): `cosyvoice_gateway_stage_seconds{stage,part}`
            (calls, avg and ~p50/p90 from the buckets of queue = waiting for a replica slot and
            compute = the call's round trip), first-chunk and request latency histograms.
  stages    each tritonserver's statistics API (HTTP port, /v2/models/stats): requests, average queue,
            compute input / infer / output per request, executions, average batch and the batch-size
            histogram. Summed over a stage's replicas. For the decoupled `llm` model compute is the
            execute() call (validation + enqueue), not generation: generation shows in the gateway's
            llm compute.
Without --watch the numbers are totals since the processes started; with it, the last interval's.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from cosyvoice_common.contracts import GatewayMetric
from cosyvoice_common.stages import STAGE_NAMES
from cosyvoice_common.stages import STAGES as STAGE_REGISTRY

STAGES = STAGE_NAMES
STAGE_OF_MODEL = {s.triton_model: s.name for s in STAGE_REGISTRY}
HTTP_TIMEOUT_S = 5.0
MS_PER_S = 1000.0
NS_PER_MS = 1e6


# --- addresses --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StackAddresses:
    gateway_grpc: str = ""                                   # host:port
    gateway_http: str = ""                                   # host:port
    stage_http: dict[str, list[str]] = field(default_factory=dict)   # stage -> [host:port per replica]
    stage_grpc: dict[str, list[str]] = field(default_factory=dict)
    stage_metrics: dict[str, list[str]] = field(default_factory=dict)   # Triton's metrics port per replica

    def all_stage_http(self) -> list[str]:
        return [u for urls in self.stage_http.values() for u in urls]


def stack_addresses(run_dir: pathlib.Path) -> StackAddresses:
    """Addresses of what `make up` started, from `<run_dir>/stack.json`."""
    path = pathlib.Path(run_dir) / "stack.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: start the stack with `make up`, or pass --gateway/--stages")
    processes = json.loads(path.read_text())["processes"]
    stage_http: dict[str, list[str]] = {}
    stage_grpc: dict[str, list[str]] = {}
    stage_metrics: dict[str, list[str]] = {}
    grpc = http = ""
    for p in processes:
        if p["kind"] == "triton":
            stage_http.setdefault(p["stage"], []).append(f"127.0.0.1:{p['ports']['http']}")
            stage_grpc.setdefault(p["stage"], []).append(f"127.0.0.1:{p['ports']['grpc']}")
            if "metrics" in p["ports"]:
                stage_metrics.setdefault(p["stage"], []).append(f"127.0.0.1:{p['ports']['metrics']}")
        elif p["kind"] == "gateway":
            grpc, http = f"127.0.0.1:{p['ports']['grpc']}", f"127.0.0.1:{p['ports']['http']}"
    return StackAddresses(grpc, http, stage_http, stage_grpc, stage_metrics)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url if "://" in url else f"http://{url}", timeout=HTTP_TIMEOUT_S) as resp:
        return resp.read()


# --- gateway histograms ------------------------------------------------------------------------------
@dataclass(slots=True)
class Histogram:
    count: float = 0.0
    sum_s: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)   # upper bound (s) -> cumulative count

    def minus(self, other: "Histogram | None") -> "Histogram":
        if other is None:
            return self
        return Histogram(self.count - other.count, self.sum_s - other.sum_s,
                         {le: c - other.buckets.get(le, 0.0) for le, c in self.buckets.items()})

    @property
    def avg_ms(self) -> float:
        return self.sum_s / self.count * MS_PER_S if self.count else float("nan")

    def quantile_ms(self, q: float) -> float:
        """Linear interpolation inside the bucket holding the q-th observation (Prometheus' rule)."""
        if not self.count:
            return float("nan")
        rank, lower, below = q * self.count, 0.0, 0.0
        for le in sorted(self.buckets):
            cum = self.buckets[le]
            if cum >= rank:
                if math.isinf(le):
                    return lower * MS_PER_S
                width = cum - below
                return (lower + (le - lower) * ((rank - below) / width if width else 0.0)) * MS_PER_S
            lower, below = le, cum
        return lower * MS_PER_S


def parse_gateway_metrics(text: str) -> dict[tuple[str, ...], Histogram]:
    """Histograms by key: (STAGE_SECONDS, stage, part), (FIRST_CHUNK_SECONDS,), (REQUEST_SECONDS, rpc), names of
    GatewayMetric."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, ...], Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (GatewayMetric.STAGE_SECONDS, GatewayMetric.FIRST_CHUNK_SECONDS,
                               GatewayMetric.REQUEST_SECONDS):
            continue
        for sample in family.samples:
            labels = sample.labels
            if family.name == GatewayMetric.STAGE_SECONDS:
                key = (family.name, labels.get("stage", ""), labels.get("part", ""))
            elif family.name == GatewayMetric.REQUEST_SECONDS:
                key = (family.name, labels.get("rpc", ""))
            else:
                key = (family.name,)
            hist = out.setdefault(key, Histogram())
            if sample.name.endswith("_bucket"):
                hist.buckets[float(labels["le"])] = sample.value
            elif sample.name.endswith("_count"):
                hist.count = sample.value
            elif sample.name.endswith("_sum"):
                hist.sum_s = sample.value
    return out


def gateway_metrics(http_addr: str) -> dict[tuple[str, ...], Histogram]:
    return parse_gateway_metrics(_get(f"{http_addr.removeprefix('http://')}/metrics").decode())


# --- Triton statistics ---------------------------------------------------------------------------------
@dataclass(slots=True)
class ModelStats:
    requests: int = 0
    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    executions: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)   # batch size -> executions

    def add(self, other: "ModelStats", sign: int = 1) -> None:
        self.requests += sign * other.requests
        self.queue_ns += sign * other.queue_ns
        self.input_ns += sign * other.input_ns
        self.infer_ns += sign * other.infer_ns
        self.output_ns += sign * other.output_ns
        self.executions += sign * other.executions
        for size, n in other.batch_sizes.items():
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + sign * n

    def minus(self, other: "ModelStats | None") -> "ModelStats":
        out = ModelStats()
        out.add(self)
        if other is not None:
            out.add(other, -1)
        out.batch_sizes = {k: v for k, v in out.batch_sizes.items() if v}
        return out

    def per_request_ms(self, ns: int) -> float:
        return ns / self.requests / NS_PER_MS if self.requests else float("nan")

    @property
    def avg_batch(self) -> float:
        return self.requests / self.executions if self.executions else float("nan")


def parse_triton_stats(stats: dict) -> dict[str, ModelStats]:
    out: dict[str, ModelStats] = {}
    for model in stats.get("model_stats", []):
        inf = model.get("inference_stats", {})
        ns = lambda key: int(inf.get(key, {}).get("ns", 0))  # noqa: E731
        s = ModelStats(requests=int(inf.get("success", {}).get("count", 0)), queue_ns=ns("queue"),
                       input_ns=ns("compute_input"), infer_ns=ns("compute_infer"), output_ns=ns("compute_output"),
                       executions=int(model.get("execution_count", 0)))
        for b in model.get("batch_stats", []):
            s.batch_sizes[int(b["batch_size"])] = int(b.get("compute_infer", {}).get("count", 0))
        out.setdefault(model["name"], ModelStats()).add(s)
    return out


def triton_stage_stats(urls: list[str]) -> dict[str, ModelStats]:
    """Stage name -> stats summed over every reachable server in `urls` (host:port of HTTP)."""
    out: dict[str, ModelStats] = {}
    for url in urls:
        try:
            stats = json.loads(_get(f"{url.removeprefix('http://')}/v2/models/stats"))
        except OSError:
            continue
        for model, s in parse_triton_stats(stats).items():
            out.setdefault(STAGE_OF_MODEL.get(model, model), ModelStats()).add(s)
    return out


# --- the table -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class Snapshot:
    taken_s: float
    gateway: dict[tuple[str, ...], Histogram]
    triton: dict[str, ModelStats]

    def minus(self, before: "Snapshot | None") -> "Snapshot":
        if before is None:
            return self
        return Snapshot(self.taken_s - before.taken_s,
                        {k: h.minus(before.gateway.get(k)) for k, h in self.gateway.items()},
                        {k: s.minus(before.triton.get(k)) for k, s in self.triton.items()})


def take_snapshot(addresses: StackAddresses) -> Snapshot:
    gateway = {}
    if addresses.gateway_http:
        try:
            gateway = gateway_metrics(addresses.gateway_http)
        except OSError as exc:
            print(f"gateway metrics unavailable at {addresses.gateway_http}: {exc}", file=sys.stderr)
    return Snapshot(time.time(), gateway, triton_stage_stats(addresses.all_stage_http()))


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def stage_rows(snap: Snapshot) -> list[dict]:
    rows = []
    for stage in STAGES:
        q = snap.gateway.get((GatewayMetric.STAGE_SECONDS, stage, "queue"), Histogram())
        c = snap.gateway.get((GatewayMetric.STAGE_SECONDS, stage, "compute"), Histogram())
        t = snap.triton.get(stage, ModelStats())
        rows.append({
            "stage": stage,
            "gateway_calls": int(c.count), "gateway_queue_avg_ms": q.avg_ms,
            "gateway_compute_avg_ms": c.avg_ms, "gateway_compute_p50_ms": c.quantile_ms(0.5),
            "gateway_compute_p90_ms": c.quantile_ms(0.9),
            "triton_requests": t.requests, "triton_queue_ms": t.per_request_ms(t.queue_ns),
            "triton_input_ms": t.per_request_ms(t.input_ns), "triton_infer_ms": t.per_request_ms(t.infer_ns),
            "triton_output_ms": t.per_request_ms(t.output_ns), "triton_executions": t.executions,
            "triton_avg_batch": t.avg_batch, "triton_batch_sizes": dict(sorted(t.batch_sizes.items())),
        })
    return rows


def format_table(snap: Snapshot, title: str) -> str:
    lines = [title, "",
             "| stage | gw calls | gw queue avg | gw compute avg / p50 / p90 | triton reqs | triton queue | "
             "input + infer + output | execs | avg batch | batch sizes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in stage_rows(snap):
        sizes = " ".join(f"{k}:{v}" for k, v in r["triton_batch_sizes"].items()) or "-"
        lines.append(
            f"| {r['stage']} | {r['gateway_calls']} | {_ms(r['gateway_queue_avg_ms'])} | "
            f"{_ms(r['gateway_compute_avg_ms'])} / {_ms(r['gateway_compute_p50_ms'])} / "
            f"{_ms(r['gateway_compute_p90_ms'])} | {r['triton_requests']} | {_ms(r['triton_queue_ms'])} | "
            f"{_ms(r['triton_input_ms'])} + {_ms(r['triton_infer_ms'])} + {_ms(r['triton_output_ms'])} | "
            f"{r['triton_executions']} | {_ms(r['triton_avg_batch'])} | {sizes} |")
    lines.append("")
    lines.append("(ms per call; gw = seen by the gateway incl. transport, triton = inside the stage server; "
                 "llm triton compute = enqueue only)")
    first = snap.gateway.get((GatewayMetric.FIRST_CHUNK_SECONDS,))
    if first is not None and first.count:
        lines.append(f"first chunk: {int(first.count)} requests, avg {_ms(first.avg_ms)} ms, "
                     f"~p50 {_ms(first.quantile_ms(0.5))}, ~p90 {_ms(first.quantile_ms(0.9))}")
    for key, hist in sorted(snap.gateway.items()):
        if key[0] == GatewayMetric.REQUEST_SECONDS and hist.count:
            lines.append(f"{key[1]}: {int(hist.count)} requests, avg {_ms(hist.avg_ms)} ms, "
                         f"~p50 {_ms(hist.quantile_ms(0.5))}, ~p90 {_ms(hist.quantile_ms(0.9))}")
    return "\n".join(lines)


def resolve_addresses(args) -> StackAddresses:
    if args.gateway or args.stages:   # explicit addresses; Triton stats name their models, so no stage labels
        return StackAddresses("", args.gateway.removeprefix("http://"),
                              {"given": [u for u in args.stages.split(",") if u]})
    return stack_addresses(pathlib.Path(args.run_dir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="run", help="where `make up` wrote stack.json")
    parser.add_argument("--gateway", default="", help="gateway HTTP host:port (instead of stack.json)")
    parser.add_argument("--stages", default="", help="comma list of stage servers' HTTP host:port")
    parser.add_argument("--watch", type=float, default=0.0, help="refresh every N seconds (interval numbers)")
    parser.add_argument("--count", type=int, default=0, help="with --watch: stop after N refreshes")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--print-addresses", choices=("stage-http", "stage-metrics", "gateway-grpc", "gateway-http"),
                        help="print one address list from stack.json and exit")
    args = parser.parse_args(argv)
    addresses = resolve_addresses(args)
    if args.print_addresses:
        print({"stage-http": ",".join(addresses.all_stage_http()),
               "stage-metrics": ",".join(u for urls in addresses.stage_metrics.values() for u in urls),
               "gateway-grpc": addresses.gateway_grpc,
               "gateway-http": addresses.gateway_http}[args.print_addresses])
        return 0

    def show(snap: Snapshot, title: str) -> None:
        print(json.dumps(stage_rows(snap), indent=1) if args.json else format_table(snap, title), flush=True)

    previous = take_snapshot(addresses)
    if not args.watch:
        show(previous, "## per-stage profile (totals since start)")
        return 0
    shown = 0
    try:
        while not args.count or shown < args.count:
            time.sleep(args.watch)
            current = take_snapshot(addresses)
            interval = current.minus(previous)
            if not args.json and sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            show(interval, f"## per-stage profile, last {interval.taken_s:.1f} s ({time.strftime('%H:%M:%S')})")
            previous = current
            shown += 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
