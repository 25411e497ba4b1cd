"""The stage registry: every fact about a model stage that more than one program needs, defined once.

Tools (launcher, placement, bench, profiler, stage load), the compose generator, the deploy tests (which check the
Helm chart against it), the gateway and the container entrypoints all read it; none keeps its own stage list,
port base or `${...}` filler.

    from cosyvoice_common.stages import LLM, STAGES, STAGE_NAMES, stage
    stage(LLM).triton_model            # "llm"
    stage(LLM).inputs                  # contracts.LLM_INPUTS: what the gateway may send it
    stage(LLM).ports(replica=1)        # StagePorts(http=8310, grpc=8311, metrics=8312)
    stage(LLM).urls_env                # "LLM_URLS"

Whatever is kept per stage elsewhere (the gateway's stage clients and timings, the launcher's processes, the
Helm values) is keyed by these names and built by iterating STAGES, never by a list of its own.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cosyvoice_common import contracts
from cosyvoice_common.contracts import TensorSpec

# Stage tritonservers: HTTP on the base, gRPC base+1, metrics base+2; replica r adds r * stride.
# Bases 100 apart leave room for 10 replicas per stage on one host before ports collide (placement checks).
GRPC_PORT_DELTA = 1
METRICS_PORT_DELTA = 2
REPLICA_PORT_STRIDE = 10

# Public addresses (BRIEF section 1); stage ports must not collide with them.
GATEWAY_GRPC_PORT = 50051
GATEWAY_HTTP_PORT = 8080
SEED_STREAMING_PORTS = (8000, 8001, 8002)   # Triton HTTP, gRPC, metrics of the decoupled `cosyvoice2`
SEED_OFFLINE_PORTS = (8010, 8011, 8012)     # the same model name, non-decoupled
REDIS_PORT = 6379
PUBLIC_PORTS = (GATEWAY_GRPC_PORT, GATEWAY_HTTP_PORT, *SEED_STREAMING_PORTS, *SEED_OFFLINE_PORTS, REDIS_PORT)

DEFAULT_REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"
DEFAULT_SPEAKER_ID = "001"                   # the key of the seed recipe's spk2info.pt; generated models have it
# Where `make download` puts the released CosyVoice2-0.5B: the default MODEL_DIR of every server. Generated
# random-weight models (models/cosyvoice2-tiny, -full) are always named explicitly (`make up`, tests).
RELEASED_MODEL_DIR = "models/cosyvoice2-0.5b"


@dataclass(frozen=True)
class StagePorts:
    http: int
    grpc: int
    metrics: int


@dataclass(frozen=True)
class Stage:
    name: str                 # "tokenizer": compose service, Helm component, CLI and metrics label
    triton_model: str         # the model it serves (contracts.*_MODEL)
    inputs: tuple[TensorSpec, ...]    # what a caller may send it (contracts.*_INPUTS)
    outputs: tuple[TensorSpec, ...]
    http_port_base: int       # replica 0's Triton HTTP port on a shared host
    package: str              # its Python package under services/<name>/
    uses_gpu: bool            # placed on a GPU by default (the tokenizer's ONNX path runs on the CPU too)

    @property
    def env_prefix(self) -> str:
        return self.name.upper()

    def env(self, suffix: str) -> str:
        """This stage's environment variable `{STAGE}_{suffix}` (e.g. LLM_URLS, TOKEN2WAV_REPLICAS)."""
        return f"{self.env_prefix}_{suffix}"

    @property
    def urls_env(self) -> str:
        """Where the gateway and the seed fronts read the stage's replicas: a comma list of host:grpc_port; a host
        may resolve to several addresses (compose --scale, a Kubernetes headless Service), re-resolved."""
        return self.env("URLS")

    @property
    def service_dir(self) -> str:
        return f"services/{self.name}"

    @property
    def model_repository_dir(self) -> str:
        """Its Triton model repository of config.pbtxt templates, relative to the repository root."""
        return f"{self.service_dir}/model_repository"

    def ports(self, replica: int = 0, http_port_base: int | None = None) -> StagePorts:
        http = (self.http_port_base if http_port_base is None else http_port_base) + replica * REPLICA_PORT_STRIDE
        return StagePorts(http=http, grpc=http + GRPC_PORT_DELTA, metrics=http + METRICS_PORT_DELTA)


# The stage names, for code that addresses one stage (the gateway's pipeline calls each by name).
TOKENIZER, SPEAKER, LLM, TOKEN2WAV = "tokenizer", "speaker", "llm", "token2wav"

STAGES: tuple[Stage, ...] = (
    Stage(TOKENIZER, contracts.TOKENIZER_MODEL, contracts.TOKENIZER_INPUTS, contracts.TOKENIZER_OUTPUTS, 8100,
          "cosyvoice_tokenizer", uses_gpu=True),
    Stage(SPEAKER, contracts.SPEAKER_MODEL, contracts.SPEAKER_INPUTS, contracts.SPEAKER_OUTPUTS, 8200,
          "cosyvoice_speaker", uses_gpu=True),
    Stage(LLM, contracts.LLM_MODEL, contracts.LLM_INPUTS, contracts.LLM_OUTPUTS, 8300, "cosyvoice_llm",
          uses_gpu=True),
    Stage(TOKEN2WAV, contracts.TOKEN2WAV_MODEL, contracts.TOKEN2WAV_INPUTS, contracts.TOKEN2WAV_OUTPUTS, 8400,
          "cosyvoice_token2wav", uses_gpu=True),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)   # pipeline order
_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}") from None


# --- the one `${name}` template filler (config.pbtxt templates of every stage, seed fronts, TensorRT-LLM) ---

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(ValueError):
    """A template names a value nobody gave (unlike string.Template.safe_substitute, never silently unset)."""


def fill_template(text: str, values: Mapping[str, object], source: str = "<template>") -> str:
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text) if m.group(1) not in values})
    if missing:
        raise TemplateError(f"{source}: no value for {', '.join('${' + m + '}' for m in missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def template_names(text: str) -> set[str]:
    """The `${name}`s a template asks for."""
    return {m.group(1) for m in _PLACEHOLDER.finditer(text)}
