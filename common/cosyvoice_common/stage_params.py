"""The settings of each stage server, the one list of what a deployment may set per stage.

Each field is an environment variable `{STAGE}_{NAME}` (prefix from the stage registry) and, under the
field's own name, a `${name}` of that stage's config.pbtxt template. Both fillers read them from here:
the launcher (`make up`, cosyvoice_launcher.stack) and the container entrypoint (deploy/docker/triton_stage.py).
The stage's model.py then reads the filled config.pbtxt back into the same class (`from_model_config`; no
environment reads there).

    params = stage_params("llm", os.environ)       # LLMParams, validated; ConfigError names a bad variable
    template_values(params)                        # {"max_batch_size": "16", "dtype": "auto", ...}
    LLMParams.from_model_config(model_config)      # in the stage: the same LLMParams again
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cosyvoice_common.constants import LLM_MAX_SEQ_LEN
from cosyvoice_common.settings import ConfigError, check_knobs, from_env, from_template_values, knob
from cosyvoice_common.stages import STAGE_NAMES, stage

DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("onnx", "torch")
AUTO = "auto"
# token2wav's state cache when TOKEN2WAV_STREAM_CACHE_GIB is auto: on a GPU this much, at most this share of the
# device's free memory at start-up (the LLM stage may share the device); on the CPU a small fixed budget.
STREAM_CACHE_AUTO_CUDA_GIB = 16.0
STREAM_CACHE_AUTO_CUDA_FREE_FRACTION = 0.4
STREAM_CACHE_AUTO_CPU_GIB = 0.5
# token2wav scheduling: how long later chunks may sit out Euler steps while urgent ones run (the engine's default too)
LATER_MAX_WAIT_MS = 100.0
_GIB = 1 << 30


def _check_stream_cache(text: str) -> None:
    if text != AUTO:
        try:
            ok = float(text) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"TOKEN2WAV_STREAM_CACHE_GIB={text!r}: expected auto, 0 (off) or a number of GiB")


def stream_cache_bytes(text: str, device: str) -> int:
    """The token2wav state cache's budget in bytes for the knob's value on `device` (see Token2WavParams)."""
    _check_stream_cache(text)
    if text != AUTO:
        return int(float(text) * _GIB)
    if not device.startswith("cuda"):
        return int(STREAM_CACHE_AUTO_CPU_GIB * _GIB)
    import torch   # here: the launcher reads this module without torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(min(STREAM_CACHE_AUTO_CUDA_GIB * _GIB, STREAM_CACHE_AUTO_CUDA_FREE_FRACTION * free))


@dataclass(frozen=True, slots=True)
class StageParams:
    """Triton batching, every stage."""
    max_batch_size: int = knob("MAX_BATCH_SIZE", 16, "Triton max_batch_size: requests one execute() may get",
                               low=1)
    max_queue_delay_us: int = knob("MAX_QUEUE_DELAY_US", 0,
                                   "Triton dynamic batcher: how long a request may wait for others", low=0)

    def __post_init__(self) -> None:
        check_knobs(self)

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any]):
        """The settings the stage's config.pbtxt was filled from, read back from Triton's model config: the
        `parameters` by field name, the batching fields from where the template puts them."""
        values = {key: value.get("string_value") for key, value in model_config.get("parameters", {}).items()}
        values["max_batch_size"] = str(model_config.get("max_batch_size"))
        # JSON leaves out a zero delay (proto3 default)
        values["max_queue_delay_us"] = str(model_config.get("dynamic_batching", {})
                                           .get("max_queue_delay_microseconds", 0))
        return from_template_values(cls, values)


@dataclass(frozen=True, slots=True)
class TokenizerParams(StageParams):
    backend: str = knob("BACKEND", "onnx", "speech tokenizer runtime: onnx (speech_tokenizer_v2.onnx) or torch",
                        choices=BACKENDS)


@dataclass(frozen=True, slots=True)
class SpeakerParams(StageParams):
    backend: str = knob("BACKEND", "onnx", "speaker embedding runtime: onnx (campplus.onnx) or torch",
                        choices=BACKENDS)


@dataclass(frozen=True, slots=True)
class LLMParams(StageParams):
    """The llm stage's settings: the knobs (LLM_* variables, through config.pbtxt), then the engine's bucket
    geometry, which is no knob: deployments keep its defaults, tests and benchmarks set it directly."""
    dtype: str = knob("DTYPE", AUTO, "LLM weights and KV cache (auto: bfloat16 on CUDA, float32 on CPU)",
                      choices=DTYPES)
    max_seq_len: int = knob("MAX_SEQ_LEN", LLM_MAX_SEQ_LEN, "positions per slot: prompt + generated tokens", low=2)
    max_batch_slots: str = knob("BATCH_SLOTS", AUTO, "requests decoding at once: auto (sized from GPU memory "
                                "after warm-up; 8 on CPU) or a number")
    max_auto_batch_slots: int = knob("MAX_AUTO_BATCH_SLOTS", 128, "auto batch slots: at most this many", low=1)
    kv_cache_memory_fraction: float = knob("KV_CACHE_MEMORY_FRACTION", 0.2,
                                           "auto batch slots: share of the GPU's memory the KV cache may take",
                                           low=0.01, high=1.0)
    cuda_graphs: bool = knob("CUDA_GRAPHS", True, "CUDA graphs for decode and prefill (0: eager, for debugging)")
    prefill_graphs: bool = knob("PREFILL_GRAPHS", True, "CUDA graphs for prefill too (0: graphs for decode only)")
    compile_decode: bool = knob("COMPILE_DECODE", False,
                                "torch.compile the decode step before capturing it (start-up takes minutes)")
    repetition: str = knob("REPETITION", "on", "loop stop: on, off, or max_period=20,min_repeats=4,min_span=100")
    # Engine geometry (cosyvoice_llm.model_runner): empty = the runner's defaults.
    batch_buckets: tuple[int, ...] = ()          # decode batch sizes (the slot count is always one)
    kv_buckets: tuple[int, ...] = ()             # attended cache lengths (max_seq_len is always one)
    prefill_batch_buckets: tuple[int, ...] = (1, 2, 4, 8)   # rows of one prefill forward; the largest caps a group
    prefill_len_buckets: tuple[int, ...] = ()    # padded prompt lengths; a longer prompt runs unpadded, eagerly
    max_prefill_tokens: int = 8192               # padded tokens (rows x length) of one prefill forward; >= 1 request
    sampling_top_k_cap: int = 64                 # nucleus looked for among this many likeliest ids; 0 = full sort

    def __post_init__(self) -> None:
        StageParams.__post_init__(self)
        if self.max_batch_slots != AUTO and not (self.max_batch_slots.isdigit() and int(self.max_batch_slots) > 0):
            raise ConfigError(f"LLM_BATCH_SLOTS={self.max_batch_slots!r}: expected auto or a positive number")
        if any(b <= 0 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets {self.batch_buckets} must be positive")
        if any(b <= 0 or b > self.max_seq_len for b in self.kv_buckets + self.prefill_len_buckets):
            raise ValueError(f"kv_buckets {self.kv_buckets} and prefill_len_buckets {self.prefill_len_buckets} "
                             f"must lie in [1, max_seq_len={self.max_seq_len}]")
        if not self.prefill_batch_buckets or any(b <= 0 for b in self.prefill_batch_buckets):
            raise ValueError(f"prefill_batch_buckets {self.prefill_batch_buckets} must be positive (and not empty)")
        if self.max_prefill_tokens <= 0 or self.sampling_top_k_cap < 0:
            raise ValueError(f"max_prefill_tokens must be positive and sampling_top_k_cap >= 0, got "
                             f"{self.max_prefill_tokens} and {self.sampling_top_k_cap}")

    @property
    def batch_slots(self) -> int | None:
        """The slot count asked for; None = auto (the stage sizes it: cosyvoice_llm.engine.build_engine)."""
        return None if self.max_batch_slots == AUTO else int(self.max_batch_slots)

    def torch_dtype_name(self, device: str) -> str:
        """`dtype` with auto resolved: bfloat16 on CUDA, float32 elsewhere."""
        if self.dtype != AUTO:
            return self.dtype
        return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass(frozen=True, slots=True)
class Token2WavParams(StageParams):
    dtype: str = knob("DTYPE", AUTO, "flow dtype (auto: bfloat16 on CUDA, float32 on CPU; HiFT is always float32)",
                      choices=DTYPES)
    cuda_graphs: bool = knob("CUDA_GRAPHS", True, "CUDA graphs per batch bucket on a GPU (0: eager)")
    padding_budget: float = knob("PADDING_BUDGET", 2.0,
                                 "batch grouping: padded length may be at most this times the real length", low=1.0)
    later_max_wait_ms: float = knob("LATER_MAX_WAIT_MS", LATER_MAX_WAIT_MS,
                                    "while first chunks and prefills run, later chunks and offline calls sit out "
                                    "Euler steps for at most this long at a time (0: every call steps every "
                                    "iteration)", low=0.0)
    stream_cache_gib: str = knob("STREAM_CACHE_GIB", AUTO,
                                 "state cache of streaming calls (keys/values of completed blocks, so a chunk "
                                 f"computes only its new frames): GiB, 0 = off (every call recomputes its whole "
                                 f"prefix), auto = {STREAM_CACHE_AUTO_CUDA_GIB:g} GiB on a GPU (at most "
                                 f"{STREAM_CACHE_AUTO_CUDA_FREE_FRACTION:.0%} of its free memory), "
                                 f"{STREAM_CACHE_AUTO_CPU_GIB:g} GiB on the CPU")

    def __post_init__(self) -> None:
        StageParams.__post_init__(self)
        _check_stream_cache(self.stream_cache_gib)


STAGE_PARAMS: dict[str, type[StageParams]] = {
    "tokenizer": TokenizerParams, "speaker": SpeakerParams, "llm": LLMParams, "token2wav": Token2WavParams}
assert tuple(STAGE_PARAMS) == STAGE_NAMES, "one settings class per registered stage, in pipeline order"


def env_prefix(name: str) -> str:
    return stage(name).env("")    # "LLM_"


def stage_params(name: str, env: Mapping[str, str]) -> StageParams:
    """The settings of stage `name` from `{STAGE}_*` variables (unset = defaults)."""
    return from_env(STAGE_PARAMS[name], env, prefix=env_prefix(name))
