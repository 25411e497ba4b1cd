"""Where each stage runs on one host: replicas, devices per replica, Triton instances per device, ports.

One placement is read once (defaults < YAML file < environment) and drives the two ways of starting the stack
on one machine, so a stage lands on the same GPUs either way:

- the local launcher (`make up`, cosyvoice_launcher.stack) walks `Placement.process_plan()`: one tritonserver
  process per slot, with that slot's `CUDA_VISIBLE_DEVICES`, ports and Triton instance group;
- `to_compose()` renders the docker compose file (`deploy/render.py compose`; docker-compose.yml is the default).

Kubernetes is not rendered here: the Helm chart (deploy/helm/cosyvoice2) is its only source, and the scheduler
picks GPUs there. What a stage *is* (name, Triton model, port base, environment prefix) comes from the stage
registry, cosyvoice_common.stages; this module only says where its replicas run.

YAML file (`PLACEMENT_FILE`, example `deploy/placement.example.yaml`):

    default_device: cuda:0          # for stages that name no devices
    stages:
      llm:       {replicas: 1, devices: [cuda:0], instances: 1}
      token2wav: {replicas: 2, devices: [cuda:1, cuda:2]}     # replica i on device i mod 2
      tokenizer: {devices: [cuda:3]}
      speaker:   {devices: [cuda:3]}                         # shares GPU 3 with the tokenizer
      # explicit per-replica lists (a replica may hold several GPUs): devices: [[cuda:1, cuda:2]]

Environment (empty = unset; overrides the file): `{STAGE}_REPLICAS`, `{STAGE}_DEVICES` (comma list of
`cpu` | `cuda:N`; replica i uses device i mod len), `{STAGE}_INSTANCES` (Triton instances per device),
`{STAGE}_BASE_PORT` (HTTP port of replica 0), `PLACEMENT_DEFAULT_DEVICE`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cosyvoice_common.constants import REDIS_BOUND_ARGS
from cosyvoice_common.stages import (
    DEFAULT_SPEAKER_ID,
    GATEWAY_GRPC_PORT,
    GATEWAY_HTTP_PORT,
    GRPC_PORT_DELTA,
    METRICS_PORT_DELTA,
    PUBLIC_PORTS,
    REDIS_PORT,
    REPLICA_PORT_STRIDE,
    SEED_OFFLINE_PORTS,
    SEED_STREAMING_PORTS,
    STAGE_NAMES,
    STAGES,
    stage,
)

CPU_DEVICE = "cpu"
DEFAULT_DEVICE = "cuda:0"          # the single-GPU target of the brief: every stage on GPU 0
# The two seed-compatible fronts (services/gateway/model_repository/cosyvoice2): compose service name,
# decoupled or not, (HTTP, gRPC, metrics). Each is a tritonserver from the gateway image.
SEED_FRONTS = (("seed-stream", True, SEED_STREAMING_PORTS), ("seed-offline", False, SEED_OFFLINE_PORTS))
SEED_FRONT_ENTRYPOINT = "/opt/cosyvoice/bin/seed_front.py"   # deploy/docker/seed_front.py in the gateway image

_DEVICE_RE = re.compile(r"^(?:cpu|cuda:(0|[1-9][0-9]*))$")
_STAGE_KEYS = frozenset({"replicas", "devices", "instances", "base_port"})
_TOP_KEYS = frozenset({"stages", "default_device"})


class PlacementError(ValueError):
    """A placement file or variable is malformed; the message names the stage and the field."""


def parse_device(text: object, where: str = "device") -> str:
    """`cpu` or `cuda:N` (N a GPU index as the host numbers them), normalised to lower case."""
    if not isinstance(text, str):
        raise PlacementError(f"{where}: expected 'cpu' or 'cuda:N', got {text!r}")
    device = text.strip().lower()
    if not _DEVICE_RE.match(device):
        raise PlacementError(f"{where}: expected 'cpu' or 'cuda:N' (N >= 0), got {text!r}")
    return device


def gpu_index(device: str) -> int | None:
    return None if device == CPU_DEVICE else int(device.split(":", 1)[1])


def deal_round_robin(devices: tuple[str, ...], replicas: int) -> tuple[tuple[str, ...], ...]:
    """Replica i runs on device i mod len(devices) (the launcher's rule). More devices than replicas would
    leave some unused, which is always a mistake: an error (several GPUs per replica = explicit lists)."""
    if not devices:
        raise PlacementError("empty device list")
    if len(devices) > replicas:
        raise PlacementError(f"{len(devices)} devices {list(devices)} for {replicas} replica(s): raise replicas, "
                             "or give per-replica lists in a placement file (devices: [[cuda:0, cuda:1]])")
    return tuple((devices[r % len(devices)],) for r in range(replicas))


@dataclass(frozen=True, slots=True)
class StagePlacement:
    replicas: int
    devices_per_replica: tuple[tuple[str, ...], ...]
    instances_per_device: int = 1

    def __post_init__(self) -> None:
        _check_count("replicas", self.replicas)
        _check_count("instances_per_device", self.instances_per_device)
        if len(self.devices_per_replica) != self.replicas:
            raise PlacementError(f"devices_per_replica lists {len(self.devices_per_replica)} replicas, "
                                 f"replicas = {self.replicas}")
        for r, devices in enumerate(self.devices_per_replica):
            if not devices:
                raise PlacementError(f"replica {r}: no device")
            for d in devices:
                if parse_device(d, f"replica {r}") != d:
                    raise PlacementError(f"replica {r}: device {d!r} is not normalised (use parse_device)")
            if len(set(devices)) != len(devices):
                raise PlacementError(f"replica {r}: device listed twice in {devices}")
            if CPU_DEVICE in devices and len(devices) > 1:
                # One tritonserver is either a CPU or a GPU server: its instance_group has one kind.
                raise PlacementError(f"replica {r}: 'cpu' cannot be mixed with GPUs in {devices}")

    def gpus_of_replica(self, replica_index: int) -> tuple[int, ...]:
        return tuple(i for i in map(gpu_index, self.devices_per_replica[replica_index]) if i is not None)

    @property
    def replicas_identical(self) -> bool:
        """All replicas on the same devices: compose can run them as one scaled service."""
        return len(set(self.devices_per_replica)) == 1


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlacementError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise PlacementError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True, slots=True)
class ProcessSlot:
    """One tritonserver process of the local launcher."""
    stage: str
    replica_index: int
    device: str                 # "cpu", "cuda:1" or "cuda:1,cuda:2"
    cuda_visible_devices: str   # host indices, "" for a CPU replica (hides every GPU from it)
    port_offset: int            # replica_index * REPLICA_PORT_STRIDE
    http_port: int
    grpc_port: int
    metrics_port: int
    instance_count: int         # Triton instances per device (per GPU; in all on CPU)

    @property
    def triton_kind(self) -> str:
        return "KIND_CPU" if self.device == CPU_DEVICE else "KIND_GPU"

    @property
    def triton_model(self) -> str:
        return stage(self.stage).triton_model

    def instance_group_pbtxt(self) -> str:
        # No `gpus:` list: Triton then places `count` instances on every GPU the process sees, and
        # CUDA_VISIBLE_DEVICES (launcher) or the container's device reservation limits that to ours.
        return f"instance_group [ {{ count: {self.instance_count} kind: {self.triton_kind} }} ]"

    def env(self) -> dict[str, str]:
        """Variables for the stage process; the stage entrypoint and config templates read these names."""
        return {
            "STAGE": self.stage,
            "CUDA_VISIBLE_DEVICES": self.cuda_visible_devices,
            "TRITON_HTTP_PORT": str(self.http_port),
            "TRITON_GRPC_PORT": str(self.grpc_port),
            "TRITON_METRICS_PORT": str(self.metrics_port),
            "TRITON_INSTANCE_COUNT": str(self.instance_count),
            "TRITON_INSTANCE_KIND": self.triton_kind,
            "TRITON_GPU_COUNT": str(len(self.cuda_visible_devices.split(",")) if self.cuda_visible_devices else 0),
        }

    def template_params(self) -> dict[str, str]:
        """config.pbtxt `${...}` values (names of cosyvoice_launcher.triton.device_params) for a process whose
        CUDA_VISIBLE_DEVICES is `cuda_visible_devices`, so its GPUs are numbered from 0."""
        n_gpus = int(self.env()["TRITON_GPU_COUNT"])
        return {"device": "cuda:0" if n_gpus else CPU_DEVICE, "device_kind": self.triton_kind,
                "gpu_ids": ", ".join(str(i) for i in range(n_gpus)), "instance_count": str(self.instance_count)}


def _known_stage(name: str):
    try:
        return stage(name)
    except KeyError as e:
        raise PlacementError(e.args[0]) from None


def _default_port_bases() -> dict[str, int]:
    return {name: stage(name).http_port_base for name in STAGE_NAMES}


@dataclass(frozen=True, slots=True)
class Placement:
    """Every registry stage's StagePlacement (`stages`, keyed by name) and HTTP port base."""
    stages: Mapping[str, StagePlacement]
    http_port_bases: Mapping[str, int] = field(default_factory=_default_port_bases)

    def __post_init__(self) -> None:
        for what, keys in (("stages", self.stages), ("http_port_bases", self.http_port_bases)):
            if set(keys) != set(STAGE_NAMES):
                raise PlacementError(f"{what} must name exactly {list(STAGE_NAMES)}, got {sorted(keys)}")
        seen: dict[int, str] = {p: "a public port" for p in PUBLIC_PORTS}
        for slot in self.process_plan():
            for port in (slot.http_port, slot.grpc_port, slot.metrics_port):
                if not 1024 <= port <= 65535:
                    raise PlacementError(f"{slot.stage} replica {slot.replica_index}: port {port} outside 1024..65535")
                if port in seen:
                    raise PlacementError(f"{slot.stage} replica {slot.replica_index}: port {port} already used by "
                                         f"{seen[port]}; change {slot.stage.upper()}_BASE_PORT or replicas")
                seen[port] = f"{slot.stage} replica {slot.replica_index}"

    def stage(self, name: str) -> StagePlacement:
        _known_stage(name)
        return self.stages[name]

    def items(self) -> list[tuple[str, StagePlacement]]:
        """(name, placement) in the registry's pipeline order."""
        return [(name, self.stages[name]) for name in STAGE_NAMES]

    def process_plan(self) -> list[ProcessSlot]:
        plan = []
        for stage, sp in self.items():
            base = self.http_port_bases[stage]
            for r, devices in enumerate(sp.devices_per_replica):
                offset = r * REPLICA_PORT_STRIDE
                plan.append(ProcessSlot(
                    stage=stage, replica_index=r, device=",".join(devices),
                    cuda_visible_devices=",".join(str(i) for i in sp.gpus_of_replica(r)),
                    port_offset=offset, http_port=base + offset, grpc_port=base + offset + GRPC_PORT_DELTA,
                    metrics_port=base + offset + METRICS_PORT_DELTA, instance_count=sp.instances_per_device))
        return plan

    def stage_urls(self, stage: str, host: str = "127.0.0.1") -> str:
        """The gateway's `{STAGE}_URLS` for processes on one host: every replica's gRPC address."""
        self.stage(stage)
        return ",".join(f"{host}:{s.grpc_port}" for s in self.process_plan() if s.stage == stage)


# --------------------------------------------------------------------------------------------------
# loading

@dataclass(slots=True)
class _StageSpec:
    """A stage's settings while sources are merged; None = not given yet."""
    replicas: int | None = None
    pool: tuple[str, ...] | None = None                       # flat list, dealt round-robin
    explicit: tuple[tuple[str, ...], ...] | None = None       # per-replica lists from the file
    instances: int | None = None
    base_port: int | None = None


def _as_int(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise PlacementError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        n = int(value)
    else:
        raise PlacementError(f"{where}: expected an integer, got {value!r}")
    if n < 0:
        raise PlacementError(f"{where}: must not be negative, got {n}")
    return n


def _device_list(value: object, where: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise PlacementError(f"{where}: expected a non-empty list of 'cpu' | 'cuda:N', got {value!r}")
    return tuple(parse_device(d, where) for d in items)


def _read_file(path: Path, specs: dict[str, _StageSpec]) -> str | None:
    import yaml  # only needed when a file is given

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise PlacementError(f"placement file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise PlacementError(f"placement file {path}: not valid YAML: {e}") from e
    doc = doc or {}
    if not isinstance(doc, Mapping):
        raise PlacementError(f"placement file {path}: top level must be a mapping")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise PlacementError(f"placement file {path}: unknown keys {sorted(unknown)}; allowed {sorted(_TOP_KEYS)}")
    default_device = None
    if doc.get("default_device") is not None:
        default_device = parse_device(doc["default_device"], f"{path}: default_device")
    stages = doc.get("stages") or {}
    if not isinstance(stages, Mapping):
        raise PlacementError(f"placement file {path}: 'stages' must map stage name to settings")
    for name, cfg in stages.items():
        where = f"{path}: stages.{name}"
        if name not in STAGE_NAMES:
            raise PlacementError(f"{where}: unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")
        cfg = cfg or {}
        if not isinstance(cfg, Mapping):
            raise PlacementError(f"{where}: expected a mapping, got {cfg!r}")
        bad = set(cfg) - _STAGE_KEYS
        if bad:
            raise PlacementError(f"{where}: unknown keys {sorted(bad)}; allowed {sorted(_STAGE_KEYS)}")
        spec = specs[name]
        if "replicas" in cfg:
            spec.replicas = _as_int(cfg["replicas"], f"{where}.replicas")
        if "instances" in cfg:
            spec.instances = _as_int(cfg["instances"], f"{where}.instances")
        if "base_port" in cfg:
            spec.base_port = _as_int(cfg["base_port"], f"{where}.base_port")
        if "devices" in cfg:
            devs = cfg["devices"]
            if isinstance(devs, list) and devs and all(isinstance(d, list) for d in devs):
                spec.explicit = tuple(_device_list(d, f"{where}.devices[{i}]") for i, d in enumerate(devs))
                if spec.replicas is not None and spec.replicas != len(spec.explicit):
                    raise PlacementError(f"{where}: replicas = {spec.replicas} but devices lists "
                                         f"{len(spec.explicit)} replicas")
            else:
                spec.pool = _device_list(devs, f"{where}.devices")
    return default_device


def load_placement(env: Mapping[str, str] | None = None, path: str | os.PathLike | None = None) -> Placement:
    """Defaults, then the YAML file (`path`, else env `PLACEMENT_FILE`), then `{STAGE}_*` variables."""
    env = os.environ if env is None else env

    def var(name: str) -> str | None:
        value = env.get(name)
        return value.strip() if value is not None and value.strip() else None

    specs = {name: _StageSpec() for name in STAGE_NAMES}
    file_path = path if path is not None else var("PLACEMENT_FILE")
    default_device = _read_file(Path(file_path), specs) if file_path else None
    if var("PLACEMENT_DEFAULT_DEVICE"):
        default_device = parse_device(var("PLACEMENT_DEFAULT_DEVICE"), "PLACEMENT_DEFAULT_DEVICE")
    default_device = default_device or DEFAULT_DEVICE

    stages: dict[str, StagePlacement] = {}
    port_bases = _default_port_bases()
    for name, spec in specs.items():
        replicas_var, instances_var, port_var, devices_var = (
            stage(name).env(suffix) for suffix in ("REPLICAS", "INSTANCES", "BASE_PORT", "DEVICES"))
        if var(replicas_var):
            spec.replicas = _as_int(var(replicas_var), replicas_var)
        if var(instances_var):
            spec.instances = _as_int(var(instances_var), instances_var)
        if var(port_var):
            spec.base_port = _as_int(var(port_var), port_var)
        if var(devices_var):
            spec.pool, spec.explicit = _device_list(var(devices_var), devices_var), None
        if spec.explicit is not None and spec.replicas in (None, len(spec.explicit)):
            per_replica = spec.explicit
        else:
            if spec.explicit is not None:   # replicas changed by env: re-deal the file's devices
                spec.pool = tuple(dict.fromkeys(d for devs in spec.explicit for d in devs))
            replicas = 1 if spec.replicas is None else spec.replicas
            if replicas < 1:
                raise PlacementError(f"{name}: replicas must be >= 1, got {replicas}")
            try:
                per_replica = deal_round_robin(spec.pool or (default_device,), replicas)
            except PlacementError as e:
                raise PlacementError(f"{name}: {e}") from e
        if spec.instances == 0:
            raise PlacementError(f"{name}: instances must be >= 1, got 0")
        try:
            stages[name] = StagePlacement(replicas=len(per_replica), devices_per_replica=per_replica,
                                          instances_per_device=spec.instances or 1)
        except PlacementError as e:
            raise PlacementError(f"{name}: {e}") from e
        if spec.base_port is not None:
            port_bases[name] = spec.base_port
    return Placement(stages, http_port_bases=port_bases)


def default_placement() -> Placement:
    """What `make up` and the checked-in docker-compose.yml use when nothing is set."""
    return load_placement(env={})


# --------------------------------------------------------------------------------------------------
# docker compose (Kubernetes: the Helm chart, deploy/helm/cosyvoice2)

IMAGE_REGISTRY = "cosyvoice2"
IMAGE_TAG = "latest"
REDIS_IMAGE = "redis:7-alpine"
MODEL_MOUNT_DIR = "/models/cosyvoice2"          # where every container sees MODEL_DIR
HEALTH_INTERVAL = "5s"
HEALTH_TIMEOUT = "3s"
HEALTH_RETRIES = 60
TRITON_START_PERIOD = "120s"      # full-size weights load and CUDA graphs are captured before ready
SEED_START_PERIOD = "60s"         # the front waits up to 60 s for the stages before its model is ready
# Front settings a deployment may change, with their defaults (names of `make up`; see services/gateway/README.md).
# SEED_PROMPT_WAV is a path inside the container (e.g. under the model mount): registered as the speaker at start.
SEED_SPEAKER_ENV = {"SEED_SPEAKER": DEFAULT_SPEAKER_ID, "SEED_PROMPT_WAV": "", "SEED_PROMPT_TEXT": "",
                    "SEED_LENGTH_FROM_TEXT": "off", "SEED_LENGTH_K": "7.5"}


def seed_front_env(decoupled: bool, http_port: int, grpc_port: int, metrics_port: int) -> dict[str, str]:
    """What deploy/docker/seed_front.py reads besides MODEL_DIR, REDIS_URL, the stage URLs and SEED_*."""
    return {"SEED_DECOUPLED": "true" if decoupled else "false", "TRITON_HTTP_PORT": str(http_port),
            "TRITON_GRPC_PORT": str(grpc_port), "TRITON_METRICS_PORT": str(metrics_port)}


def _triton_health_cmd(http_port: int) -> list[str]:
    # python3 is in every Triton image; curl is not guaranteed. urlopen raises (exit 1) unless 2xx.
    return ["CMD", "python3", "-c",
            f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{http_port}/v2/health/ready', timeout=2)"]


GATEWAY_HEALTH_CMD = [
    "CMD", "python", "-c",
    "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
    f"r = g.HealthStub(grpc.insecure_channel('127.0.0.1:{GATEWAY_GRPC_PORT}')).Check("
    "h.HealthCheckRequest(service=''), timeout=2); sys.exit(r.status != h.HealthCheckResponse.SERVING)",
]


# One parametrised image recipe for every stage (build arg STAGE); the gateway has its own Dockerfile.
STAGE_DOCKERFILE = "deploy/docker/Dockerfile.stage"
GATEWAY_DOCKERFILE = "services/gateway/Dockerfile"


def _image(component: str) -> str:
    return f"${{COSYVOICE_REGISTRY:-{IMAGE_REGISTRY}}}/{component}:${{COSYVOICE_TAG:-{IMAGE_TAG}}}"


def compose_service_names(placement: Placement, stage_name: str) -> list[str]:
    """One service scaled with `deploy.replicas` when every replica sits on the same devices (then
    `docker compose up --scale STAGE=N` works), else one service per replica, each with its own GPUs."""
    sp = placement.stage(stage_name)
    return [stage_name] if sp.replicas_identical else [f"{stage_name}-{r}" for r in range(sp.replicas)]


# Published ports bind to loopback unless PUBLISH_HOST says otherwise (`PUBLISH_HOST=0.0.0.0 docker compose up`).
COMPOSE_PUBLISH_HOST = "${PUBLISH_HOST:-127.0.0.1}"
# Triton's Python backend moves tensors through /dev/shm; Docker's 64 MB default is too small for audio batches.
COMPOSE_SHM_SIZE = "${TRITON_SHM_SIZE:-1gb}"
# Gateway settings taken from the host's environment (`COSYVOICE_API_KEY=k1,k2 docker compose up`); empty = open.
GATEWAY_HOST_ENV = {"COSYVOICE_API_KEY": "${COSYVOICE_API_KEY:-}"}


def to_compose(placement: Placement) -> dict:
    """The docker compose file for `placement`. Inside a container every replica of a stage listens on
    the stage's replica-0 ports (own network namespace); only the gateway and the seed fronts publish host ports."""
    services: dict[str, dict] = {}
    model_volume = f"${{MODEL_DIR:-./models/cosyvoice2-tiny}}:{MODEL_MOUNT_DIR}:ro"
    gateway_env = {
        "MODEL_DIR": MODEL_MOUNT_DIR,
        "REDIS_URL": f"redis://redis:{REDIS_PORT}/0",
        "GATEWAY_HOST": "0.0.0.0",       # listen on the container's interface, not its loopback
        "GRPC_PORT": str(GATEWAY_GRPC_PORT),
        "HTTP_PORT": str(GATEWAY_HTTP_PORT),
    }
    gateway_depends = {"redis": {"condition": "service_healthy"}}
    plan = placement.process_plan()
    for stage_name, sp in placement.items():
        slot0 = next(s for s in plan if s.stage == stage_name and s.replica_index == 0)
        names = compose_service_names(placement, stage_name)
        for i, name in enumerate(names):
            replica = 0 if len(names) == 1 else i
            gpus = sp.gpus_of_replica(replica)
            env = slot0.env()
            # Compose hands the reserved GPUs to the container renumbered from 0; hide none of them.
            del env["CUDA_VISIBLE_DEVICES"]
            env["TRITON_INSTANCE_KIND"] = "KIND_GPU" if gpus else "KIND_CPU"
            env["TRITON_GPU_COUNT"] = str(len(gpus))
            env["MODEL_DIR"] = MODEL_MOUNT_DIR
            svc: dict = {
                "image": _image(stage_name),
                "build": {"context": ".", "dockerfile": STAGE_DOCKERFILE, "args": {"STAGE": stage_name}},
                "environment": env,
                "volumes": [model_volume],
                "expose": [str(slot0.http_port), str(slot0.grpc_port), str(slot0.metrics_port)],
                "shm_size": COMPOSE_SHM_SIZE,
                "healthcheck": {"test": _triton_health_cmd(slot0.http_port), "interval": HEALTH_INTERVAL,
                                "timeout": HEALTH_TIMEOUT, "retries": HEALTH_RETRIES,
                                "start_period": TRITON_START_PERIOD},
                "restart": "unless-stopped",
            }
            deploy: dict = {}
            if len(names) == 1 and sp.replicas > 1:
                deploy["replicas"] = sp.replicas
            if gpus:
                deploy["resources"] = {"reservations": {"devices": [
                    {"driver": "nvidia", "device_ids": [str(g) for g in gpus], "capabilities": ["gpu"]}]}}
            if deploy:
                svc["deploy"] = deploy
            services[name] = svc
            gateway_depends[name] = {"condition": "service_healthy"}
        gateway_env[stage(stage_name).urls_env] = ",".join(f"{n}:{slot0.grpc_port}" for n in names)

    services["redis"] = {
        "image": REDIS_IMAGE,
        "command": ["redis-server", "--appendonly", "yes", *REDIS_BOUND_ARGS],
        "volumes": ["redis-data:/data"],
        "expose": [str(REDIS_PORT)],
        "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": HEALTH_INTERVAL,
                        "timeout": HEALTH_TIMEOUT, "retries": HEALTH_RETRIES},
        "restart": "unless-stopped",
    }
    services["gateway"] = {
        "image": _image("gateway"),
        "build": {"context": ".", "dockerfile": GATEWAY_DOCKERFILE},
        "environment": {**gateway_env, **GATEWAY_HOST_ENV},
        "volumes": [model_volume],        # the gateway's text tokenizer reads MODEL_DIR/CosyVoice-BlankEN
        "ports": [f"{COMPOSE_PUBLISH_HOST}:${{GATEWAY_GRPC_HOST_PORT:-{GATEWAY_GRPC_PORT}}}:{GATEWAY_GRPC_PORT}",
                  f"{COMPOSE_PUBLISH_HOST}:${{GATEWAY_HTTP_HOST_PORT:-{GATEWAY_HTTP_PORT}}}:{GATEWAY_HTTP_PORT}"],
        "depends_on": gateway_depends,
        "healthcheck": {"test": GATEWAY_HEALTH_CMD, "interval": HEALTH_INTERVAL, "timeout": HEALTH_TIMEOUT,
                        "retries": HEALTH_RETRIES, "start_period": "30s"},
        "restart": "unless-stopped",
    }
    # The seed-compatible fronts: the gateway image running tritonserver over the rendered `cosyvoice2`
    # repository (deploy/docker/seed_front.py). They call the stages and Redis themselves, not the gateway.
    for name, decoupled, (http_port, grpc_port, metrics_port) in SEED_FRONTS:
        env = {k: gateway_env[k] for k in ("MODEL_DIR", "REDIS_URL", *(s.urls_env for s in STAGES))}
        env.update(seed_front_env(decoupled, http_port, grpc_port, metrics_port))
        env.update({k: f"${{{k}:-{v}}}" for k, v in SEED_SPEAKER_ENV.items()})   # `SEED_SPEAKER=... docker compose up`
        services[name] = {
            "image": _image("gateway"),
            "build": {"context": ".", "dockerfile": GATEWAY_DOCKERFILE},
            "command": ["python", SEED_FRONT_ENTRYPOINT],
            "environment": env,
            "volumes": [model_volume],    # text tokenizer + model revision, as the gateway (same spk2info keys)
            "ports": [f"{COMPOSE_PUBLISH_HOST}:{p}:{p}" for p in (http_port, grpc_port, metrics_port)],
            "shm_size": COMPOSE_SHM_SIZE,
            "depends_on": {k: dict(v) for k, v in gateway_depends.items()},   # every stage and Redis, healthy
            "healthcheck": {"test": _triton_health_cmd(http_port), "interval": HEALTH_INTERVAL,
                            "timeout": HEALTH_TIMEOUT, "retries": HEALTH_RETRIES, "start_period": SEED_START_PERIOD},
            "restart": "unless-stopped",
        }
    return {"name": "cosyvoice2", "services": services, "volumes": {"redis-data": {}}}
