"""Triton clients for the four stages: replicas, load balancing, timeouts, readiness, streaming.

One `StageClient` per stage holds one `tritonclient.grpc.aio` client per replica URL (a stage URL env
var may list several, comma-separated). Each call goes to the ready replica with the fewest
outstanding calls (ties broken round-robin, so idle replicas share work evenly). Whether a model
batches (`max_batch_size > 0`, so tensors carry a leading batch dim of 1) is read from the model
config at readiness time, so the same client serves our models and drop-in ones.

A replica URL whose host is a DNS name may stand for several servers (`docker compose up --scale
token2wav=3`, a Kubernetes headless Service): every readiness check re-resolves it, and when it
resolves to two or more distinct addresses each address becomes a replica of its own (IPv4 preferred:
a dual-stack host's A and AAAA records are one server, so `localhost` stays one replica). Replicas
that drop out of DNS finish their in-flight calls and are closed.

Affinity: a call may name a key (a stream); the first call with that key picks a replica as above, and later
calls with the same key go to the same replica while it is ready, so a stage that keeps per-stream state (token2wav's
state cache) finds it. Calls never depend on it: if that replica is gone, the call goes elsewhere and the key
follows it. Keys are forgotten with `forget` (the stream ended) or, past `AFFINITY_KEYS`, oldest first.

Timing per call, measured by the gateway: `queue_ms` = waiting for a replica slot (only when
`max_inflight_per_replica` bounds it), `compute_ms` = the call's round trip. Triton's own queue and
compute split is in its statistics/metrics endpoint, which the benchmark reads.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from cosyvoice_common.contracts import TensorSpec
from cosyvoice_common.stages import LLM, STAGE_NAMES, stage
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from cosyvoice_gateway import metrics
from cosyvoice_gateway.admission import time_left_s

log = logging.getLogger(__name__)

MS_PER_S = 1000.0
# Triton request parameter that makes a decoupled model's last (possibly empty) response carry
# `triton_final_response`, so a stream's end is known without a side channel.
_EMPTY_FINAL_PARAM = "triton_enable_empty_final_response"
_FINAL_PARAM = "triton_final_response"
# Stage models answer bad request values with this exception name (cosyvoice_common.errors).
_STAGE_INVALID_REQUEST = "InvalidRequestError"
# Affinity keys remembered per stage client (streams in flight; a key costs a dict entry).
AFFINITY_KEYS = 65536


class StageError(RuntimeError):
    """A stage call failed (unreachable, timed out, or the model returned an error)."""

    def __init__(self, stage: str, message: str, *, unavailable: bool = False, timed_out: bool = False,
                 invalid: bool = False):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.unavailable = unavailable
        self.timed_out = timed_out
        self.invalid = invalid      # the stage rejected the request's values (a client error)


@dataclass(frozen=True, slots=True)
class StageConfig:
    name: str                        # tokenizer | speaker | llm | token2wav (metrics, logs, StageTimings)
    model: str                       # Triton model name
    urls: tuple[str, ...]            # host:port of each replica's gRPC endpoint
    timeout_s: float
    inputs: tuple[TensorSpec, ...]
    max_inflight_per_replica: int = 0   # 0 = unbounded (Triton queues)

    def __post_init__(self) -> None:
        if not self.urls or any(not u for u in self.urls):
            raise ValueError(f"stage {self.name}: no replica URLs")
        if self.timeout_s <= 0 or self.max_inflight_per_replica < 0:
            raise ValueError(f"stage {self.name}: bad timeout/inflight: {self}")


def parse_urls(value: str) -> tuple[str, ...]:
    return tuple(u.strip().removeprefix("grpc://") for u in value.split(",") if u.strip())


# --- DNS: one configured URL, several servers -----------------------------------------------------------
# host, port -> the addresses the name resolves to now (tests inject their own).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def resolve_addresses(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def split_host_port(url: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host without brackets, port)."""
    host, sep, port = url.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"replica URL must be host:port, got {url!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def join_host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def expand_url(url: str, addresses: Sequence[str]) -> tuple[str, ...]:
    """The replica URLs that `url` (host:port) stands for, given what its host resolves to now.

    Two or more distinct addresses: one `address:port` each, in resolver order, IPv4 only when there is
    any (a dual-stack host's A and AAAA records are one server, counted once). Otherwise `url` itself: an
    IP literal, a name with one server (`localhost` -> 127.0.0.1 and ::1 is one), or a name that did not
    resolve (gRPC resolves it again on connect, and the readiness check reports it)."""
    host, port = split_host_port(url)
    if is_ip_literal(host):
        return (url,)
    distinct = list(dict.fromkeys(a.split("%", 1)[0] for a in addresses))   # drop v6 zone ids, dedupe
    v4 = [a for a in distinct if is_ip_literal(a) and ipaddress.ip_address(a).version == 4]
    chosen = v4 or [a for a in distinct if is_ip_literal(a)]
    if len(chosen) < 2:
        return (url,)
    return tuple(join_host_port(a, port) for a in chosen)


def stage_config(name: str, urls: str, timeout_s: float, max_inflight_per_replica: int = 0) -> StageConfig:
    """The client settings of a registered stage (its Triton model and input contract) at `urls`."""
    spec = stage(name)
    return StageConfig(name, spec.triton_model, parse_urls(urls), timeout_s, spec.inputs, max_inflight_per_replica)


@dataclass(slots=True)
class CallTiming:
    queue_ms: float = 0.0
    compute_ms: float = 0.0


@dataclass(slots=True)
class _Replica:
    url: str
    client: triton_aio.InferenceServerClient
    slots: asyncio.Semaphore | None
    source: str = ""           # the configured URL this replica came from (a DNS name may give several)
    outstanding: int = 0
    ready: bool = False
    batched: bool | None = None   # model config max_batch_size > 0: add/strip a leading batch dim of 1;
                                  # None until the replica's config was read (see _batched)
    inputs: frozenset[str] = frozenset()   # input names its model config declares (optional ones may be absent)
    parameters: dict[str, str] = field(default_factory=dict)   # model config `parameters` (string values)
    not_ready_why: str = "not checked yet"   # what the last readiness check saw, for logs and errors


@dataclass(slots=True)
class _Lease:
    replica: _Replica
    timing: CallTiming = field(default_factory=CallTiming)


class StageClient:
    def __init__(self, config: StageConfig, resolver: Resolver | None = resolve_addresses) -> None:
        """`resolver=None` never re-resolves names (each configured URL is one replica)."""
        self.config = config
        self._dtypes = {spec.name: spec.datatype for spec in config.inputs}
        self._optional = frozenset(spec.name for spec in config.inputs if spec.optional)
        self._honoured_or_refused = frozenset(spec.name for spec in config.inputs if spec.honoured_or_refused)
        self._resolver = resolver
        self._replicas = [self._new_replica(url, url) for url in config.urls]
        self._retired: list[_Replica] = []     # dropped from DNS, closed once their calls finish
        self._rr = itertools.count()
        self._affinity: OrderedDict[str, _Replica] = OrderedDict()

    def _new_replica(self, url: str, source: str) -> _Replica:
        slots = asyncio.Semaphore(self.config.max_inflight_per_replica) if self.config.max_inflight_per_replica else None
        return _Replica(url, triton_aio.InferenceServerClient(url, channel_args=_channel_args()), slots, source=source)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def replica_urls(self) -> tuple[str, ...]:
        return tuple(r.url for r in self._replicas)

    async def close(self) -> None:
        await asyncio.gather(*(r.client.close() for r in (*self._replicas, *self._retired)), return_exceptions=True)
        self._retired = []

    # --- DNS ----------------------------------------------------------------------------------------
    async def refresh_addresses(self) -> None:
        """Re-resolve every configured URL whose host is a name; add replicas for new addresses, retire
        those gone. A failed lookup keeps that URL's current replicas."""
        if self._resolver is None:
            return
        wanted: list[tuple[str, str]] = []     # (replica url, source)
        for source in self.config.urls:
            current = [(r.url, source) for r in self._replicas if r.source == source]
            try:
                host, port = split_host_port(source)
                if is_ip_literal(host):
                    wanted.extend(current or [(source, source)])
                    continue
                addresses = await self._resolver(host, port)
            except (OSError, ValueError) as exc:
                log.warning("stage %s: cannot resolve %s (%s); keeping %d replica(s)", self.name, source, exc,
                            len(current))
                wanted.extend(current or [(source, source)])
                continue
            wanted.extend((url, source) for url in expand_url(source, addresses))
        self._set_replicas(wanted)

    def _set_replicas(self, wanted: Sequence[tuple[str, str]]) -> None:
        by_url = {r.url: r for r in self._replicas}
        keep = [by_url.get(url) or self._new_replica(url, source) for url, source in dict.fromkeys(wanted)]
        kept_ids = {id(r) for r in keep}
        gone = [r for r in self._replicas if id(r) not in kept_ids]
        added = [r.url for r in keep if r.url not in by_url]
        if added or gone:
            log.info("stage %s replicas now %s (added %s, dropped %s)", self.name, [r.url for r in keep], added,
                     [r.url for r in gone])
        self._replicas = keep
        self._retired.extend(gone)

    async def _close_idle_retired(self) -> None:
        idle = [r for r in self._retired if r.outstanding == 0]
        self._retired = [r for r in self._retired if r.outstanding > 0]
        await asyncio.gather(*(r.client.close() for r in idle), return_exceptions=True)

    # --- readiness ----------------------------------------------------------------------------------
    async def check_ready(self) -> bool:
        """Re-resolve DNS names, then refresh each replica's readiness (server ready and model ready);
        True if any replica is."""
        await self.refresh_addresses()
        await self._close_idle_retired()
        replicas = list(self._replicas)
        await asyncio.gather(*(self._check_replica(r) for r in replicas))
        return any(r.ready for r in replicas)

    async def _check_replica(self, replica: _Replica) -> None:
        was_ready = replica.ready
        try:
            ready = False
            if not await replica.client.is_server_ready(client_timeout=self.config.timeout_s):
                replica.not_ready_why = "server not ready"
            elif not await replica.client.is_model_ready(self.config.model, client_timeout=self.config.timeout_s):
                replica.not_ready_why = f"model {self.config.model} not ready"
            else:
                ready = True
                config = await replica.client.get_model_config(self.config.model, as_json=True,
                                                               client_timeout=self.config.timeout_s)
                replica.batched = int(config["config"].get("max_batch_size", 0)) > 0
                replica.inputs = frozenset(spec["name"] for spec in config["config"].get("input", []))
                replica.parameters = {k: str(v.get("string_value", "")) for k, v in
                                      config["config"].get("parameters", {}).items()}
        except InferenceServerException as exc:
            ready = False
            replica.not_ready_why = f"{exc.status() or 'error'}: {exc.message()}"
        replica.ready = bool(ready)
        if replica.ready != was_ready:
            log.info("stage %s replica %s %s", self.name, replica.url,
                     "ready" if replica.ready else f"NOT ready ({replica.not_ready_why})")

    def int_parameter(self, name: str) -> int | None:
        """A model config parameter as an int, the smallest over the replicas that have read it (what every
        replica can serve), or None until one has (or when it is absent or not an int)."""
        values = []
        for replica in self._replicas:
            try:
                values.append(int(replica.parameters[name]))
            except (KeyError, ValueError):
                continue
        return min(values) if values else None

    # --- load balancing -----------------------------------------------------------------------------
    def _pick(self, exclude: Sequence[_Replica] = ()) -> _Replica:
        pool = [r for r in self._replicas if all(r is not e for e in exclude)] or self._replicas
        candidates = [r for r in pool if r.ready] or pool   # none known ready: try anyway
        start = next(self._rr) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda r: r.outstanding)    # min keeps the first of equals: round-robin ties

    def _can_retry(self, exc: StageError, tried: Sequence[_Replica]) -> bool:
        """Retry an unreachable replica's call on another replica not tried yet (stage calls are stateless)."""
        if not exc.unavailable or not any(all(r is not t for t in tried) for r in self._replicas):
            return False
        metrics.STAGE_RETRIES.labels(stage=self.name).inc()
        log.warning("stage %s: %s; retrying on another replica", self.name, exc)
        return True

    def _pick_for(self, affinity: str | None, exclude: Sequence[_Replica]) -> _Replica:
        """The key's replica while it is ready and not excluded; else a fresh pick, which the key then follows."""
        if affinity is None:
            return self._pick(exclude)
        replica = self._affinity.get(affinity)
        if (replica is None or not replica.ready or any(replica is e for e in exclude)
                or all(replica is not r for r in self._replicas)):
            replica = self._pick(exclude)
            self._affinity[affinity] = replica
            if len(self._affinity) > AFFINITY_KEYS:
                self._affinity.popitem(last=False)
        return replica

    def forget(self, affinity: str) -> None:
        """The key's stream ended: its calls may go anywhere again."""
        self._affinity.pop(affinity, None)

    async def _acquire(self, exclude: Sequence[_Replica] = (), affinity: str | None = None) -> _Lease:
        replica = self._pick_for(affinity, exclude)
        replica.outstanding += 1
        lease = _Lease(replica)
        if replica.slots is not None:
            start = time.perf_counter()
            await replica.slots.acquire()
            lease.timing.queue_ms = (time.perf_counter() - start) * MS_PER_S
        return lease

    @staticmethod
    def _release(lease: _Lease) -> None:
        lease.replica.outstanding -= 1
        if lease.replica.slots is not None:
            lease.replica.slots.release()

    # --- tensors ------------------------------------------------------------------------------------
    async def _batched(self, replica: _Replica) -> bool:
        """Whether the replica's model batches. A call can come before the first readiness check (a gateway
        serving at once, a replica added by DNS): then the config is read now, since sending unbatched
        tensors to a batching model is rejected ("batch size does not match")."""
        if replica.batched is None:
            await self._check_replica(replica)
        if replica.batched is None:
            raise StageError(self.name, f"{replica.url}: model config not readable (replica not ready: "
                                        f"{replica.not_ready_why})", unavailable=True)
        return replica.batched

    def _inputs(self, tensors: Mapping[str, np.ndarray], batched: bool, replica: _Replica) -> list[InferInput]:
        """Triton inputs; an optional tensor the replica's model does not declare is left out (e.g. our llm
        stage's `stream_boundaries` going to the real TensorRT-LLM backend), unless leaving it out would change
        the answer (token2wav's `speed` to an older replica): then the call is refused."""
        inputs = []
        for name, array in tensors.items():
            if name in self._optional and name not in replica.inputs:
                if name in self._honoured_or_refused:
                    raise StageError(self.name, f"{replica.url}: the {self.config.model} model there does not "
                                     f"support {name!r} (an older stage version)", invalid=True)
                continue
            array = np.ascontiguousarray(array)[None] if batched else np.ascontiguousarray(array)
            infer_input = InferInput(name, list(array.shape), self._dtypes[name])
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        return inputs

    @staticmethod
    def _outputs(result, names: Sequence[str], batched: bool) -> dict[str, np.ndarray]:
        out = {}
        for name in names:
            array = result.as_numpy(name)
            if array is None:
                raise KeyError(name)
            out[name] = array[0] if batched else array
        return out

    def _error(self, replica: _Replica, exc: InferenceServerException) -> StageError:
        status = (exc.status() or "").upper()
        unavailable = "UNAVAILABLE" in status
        if unavailable:
            replica.ready = False   # the readiness loop brings it back
        message = exc.message() or ""
        return StageError(self.name, f"{replica.url}: {message}", unavailable=unavailable,
                          timed_out="DEADLINE" in status, invalid=_STAGE_INVALID_REQUEST in message)

    def _timeout_s(self) -> float:
        """This call's timeout: the stage's, or the time left to the request's deadline if sooner."""
        left = time_left_s()
        if left is None:
            return self.config.timeout_s
        if left <= 0:
            raise StageError(self.name, "request deadline passed before the call", timed_out=True)
        return min(self.config.timeout_s, left)

    # --- calls --------------------------------------------------------------------------------------
    async def infer(self, tensors: Mapping[str, np.ndarray], outputs: Sequence[str], request_id: str = "",
                    priority: int = 0, affinity: str | None = None) -> tuple[dict[str, np.ndarray], CallTiming]:
        """One call; an unreachable replica's call is retried on the other replicas (the call is self-contained).
        `priority`: Triton's request priority (1 = highest level; 0 = the model's default level). `affinity`: a
        stream's key; its calls go to one replica while that replica is ready (see the module docstring)."""
        tried: list[_Replica] = []
        while True:
            try:
                return await self._infer_once(tensors, outputs, request_id, tried, priority, affinity)
            except StageError as exc:
                if not self._can_retry(exc, tried):
                    raise

    async def _infer_once(self, tensors: Mapping[str, np.ndarray], outputs: Sequence[str], request_id: str,
                          tried: list[_Replica], priority: int = 0, affinity: str | None = None
                          ) -> tuple[dict[str, np.ndarray], CallTiming]:
        lease = await self._acquire(tried, affinity)
        replica = lease.replica
        tried.append(replica)
        start = time.perf_counter()
        call: asyncio.Future | None = None
        try:
            batched = await self._batched(replica)
            inputs = self._inputs(tensors, batched, replica)
            wait_s = None if time_left_s() is None else self._timeout_s()
            metrics.STAGE_CALLS.labels(stage=self.name).inc()
            # The RPC runs under the stage's own timeout and is never cancelled by its request: a request that is
            # cancelled or runs out of time stops waiting and leaves the call to finish (one call's compute).
            # Triton 2.51 can crash or wedge its gRPC server when a unary call is cancelled in flight
            # (triton-inference-server/server#7368, #8034); a call left to finish costs only its compute.
            call = asyncio.ensure_future(replica.client.infer(
                self.config.model, inputs,
                outputs=[InferRequestedOutput(n) for n in outputs], request_id=request_id,
                client_timeout=self.config.timeout_s, priority=priority))
            try:
                result = await asyncio.wait_for(asyncio.shield(call), wait_s)
            except TimeoutError:
                raise StageError(self.name, f"{replica.url}: the request's deadline passed during the call",
                                 timed_out=True) from None
            lease.timing.compute_ms = (time.perf_counter() - start) * MS_PER_S
            return self._outputs(result, outputs, batched), lease.timing
        except InferenceServerException as exc:
            raise self._error(replica, exc) from exc
        finally:
            if call is None or call.done():
                self._release(lease)
            else:       # left to finish: its replica counts it as outstanding until it does
                call.add_done_callback(lambda done, lease=lease: self._release_detached(done, lease))

    def _release_detached(self, call: asyncio.Future, lease: _Lease) -> None:
        error = None if call.cancelled() else call.exception()   # retrieved: nobody waits for it any more
        if error is not None:
            log.debug("stage %s: a call left to finish failed: %s", self.name, error)
        self._release(lease)

    async def stream(self, tensors: Mapping[str, np.ndarray], outputs: Sequence[str], request_id: str = "",
                     timing: CallTiming | None = None) -> AsyncIterator[dict[str, np.ndarray]]:
        """Decoupled call: yields each non-empty response's outputs; returns after the final response.

        Closing the generator early (consumer cancelled) cancels the gRPC stream, which Triton turns
        into a request cancellation the decoupled model sees. `timing` (if given) is filled in place.
        A replica that is unreachable before its first response is replaced by another one (nothing
        was delivered yet, so the retry is invisible); after that the error goes to the caller.
        """
        timing = timing if timing is not None else CallTiming()
        tried: list[_Replica] = []
        while True:
            delivered = False
            try:
                # aclosing: a consumer that leaves early closes the replica's stream now, not at GC.
                async with contextlib.aclosing(self._stream_once(tensors, outputs, request_id, timing, tried)) as once:
                    async for out in once:
                        delivered = True
                        yield out
                return
            except StageError as exc:
                if delivered or not self._can_retry(exc, tried):
                    raise

    async def _stream_once(self, tensors: Mapping[str, np.ndarray], outputs: Sequence[str], request_id: str,
                           timing: CallTiming, tried: list[_Replica]) -> AsyncIterator[dict[str, np.ndarray]]:
        lease = await self._acquire(tried)
        replica = lease.replica
        tried.append(replica)
        timing.queue_ms += lease.timing.queue_ms
        try:
            batched = await self._batched(replica)
            inputs = self._inputs(tensors, batched, replica)
            timeout_s = self._timeout_s()
        except BaseException:
            self._release(lease)
            raise
        request = {
            "model_name": self.config.model,
            "inputs": inputs,
            "outputs": [InferRequestedOutput(n) for n in outputs],
            "request_id": request_id,
            "parameters": {_EMPTY_FINAL_PARAM: True},
        }

        async def requests():
            yield request

        start = time.perf_counter()
        metrics.STAGE_CALLS.labels(stage=self.name).inc()
        responses = replica.client.stream_infer(requests(), stream_timeout=timeout_s)
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    raise self._error(replica, error)
                response = result.get_response()
                if response.outputs:
                    yield self._outputs(result, outputs, batched)
                final = response.parameters.get(_FINAL_PARAM)
                if final is not None and final.bool_param:
                    finished = True
                    break
            if not finished:
                raise StageError(self.name, f"{replica.url}: stream ended without a final response")
        except InferenceServerException as exc:
            raise self._error(replica, exc) from exc
        except grpc.aio.AioRpcError as exc:   # the stream itself failed (tritonclient does not wrap these)
            raise self._error(replica, InferenceServerException(exc.details(), status=str(exc.code()))) from exc
        finally:
            timing.compute_ms += (time.perf_counter() - start) * MS_PER_S
            if not finished:
                responses.cancel()
            self._release(lease)


# gRPC's reconnect backoff grows to 120 s by default: a gateway started before a replica (slow start, a
# restart) would then fail fast on that replica for up to two minutes after it is up. Capped, the readiness
# loop sees it within about a second.
MAX_RECONNECT_BACKOFF_MS = 1000


def _channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel defaults (message sizes, keepalive) plus the capped reconnect backoff."""
    keepalive = triton_aio.KeepAliveOptions()
    return [("grpc.max_send_message_length", triton_aio.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", triton_aio.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]


class Stages(Mapping[str, StageClient]):
    """A client for every stage of the registry (cosyvoice_common.stages), by stage name: `stages[LLM]`."""

    def __init__(self, clients: Mapping[str, StageClient]) -> None:
        if set(clients) != set(STAGE_NAMES):
            raise ValueError(f"one client per stage {list(STAGE_NAMES)}, got {sorted(clients)}")
        self._clients = {name: clients[name] for name in STAGE_NAMES}

    @classmethod
    def connect(cls, urls: Mapping[str, str], stage_timeout_s: float, llm_timeout_s: float,
                max_inflight_per_replica: int = 0) -> "Stages":
        """Clients at `urls[stage]` (host:port, comma-separated replicas); the LLM's timeout bounds a whole stream."""
        return cls({name: StageClient(stage_config(name, urls[name], llm_timeout_s if name == LLM else stage_timeout_s,
                                                   max_inflight_per_replica))
                    for name in STAGE_NAMES})

    def __getitem__(self, name: str) -> StageClient:
        return self._clients[name]

    def __iter__(self):
        return iter(self._clients)

    def __len__(self) -> int:
        return len(self._clients)

    async def check_ready(self) -> bool:
        results = await asyncio.gather(*(s.check_ready() for s in self.values()))
        return all(results)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.values()))
