"""Render the Triton repository that serves a TensorRT-LLM engine as the `llm` model (`make trtllm-repo`).

    python -m cosyvoice_llm.trtllm.repo --engine-dir ENGINE_DIR --out REPO_DIR [--max-batch-size 16 ...]

Copies services/llm/trtllm/model_repository/tensorrt_llm/ to REPO_DIR/llm/ (Triton wants the folder named as the
model, and the gateway calls `llm`), fills `${...}` in config.pbtxt (an unfilled one is an error, unlike the seed's
safe_substitute where it silently meant "unset") and creates the empty version folder `1/` the backend requires.
Then: `tritonserver --model-repository REPO_DIR` on the TensorRT-LLM machine, and point the gateway's LLM_URLS at it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from cosyvoice_common.contracts import LLM_MODEL
from cosyvoice_common.stages import TemplateError, fill_template  # noqa: F401 (TemplateError: callers catch it here)

# services/llm/cosyvoice_llm/trtllm/repo.py -> services/llm
SERVICE_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_ROOT = SERVICE_ROOT / "trtllm" / "model_repository"
TEMPLATE_MODEL = "tensorrt_llm"
CONFIG_NAME = "config.pbtxt"
VERSION_DIR = "1"


@dataclass(frozen=True, slots=True)
class TrtllmRepoConfig:
    """Template values; defaults are the seed's (runtime/triton_trtllm/run.sh stage 2)."""

    engine_dir: str                               # trtllm-build --output_dir; an absolute path on the serving host
    triton_max_batch_size: int = 16               # = the engine's --max_batch_size
    max_queue_delay_us: int = 0
    max_beam_width: int = 1
    max_tokens_in_paged_kv_cache: int = 2560
    max_attention_window_size: int = 2560
    kv_cache_free_gpu_mem_fraction: float = 0.5
    batching_strategy: str = "inflight_fused_batching"
    batch_scheduler_policy: str = "guaranteed_no_evict"   # the backend's default: never preempt a started request
    enable_kv_cache_reuse: bool = False
    enable_chunked_context: bool = False
    gpu_device_ids: str = "0"

    def __post_init__(self) -> None:
        if not self.engine_dir:
            raise ValueError("engine_dir is required")
        if self.triton_max_batch_size < 1 or self.max_beam_width != 1:
            raise ValueError("triton_max_batch_size must be >= 1 and max_beam_width 1 (the gateway reads beam 0)")
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise ValueError(f"kv_cache_free_gpu_mem_fraction {self.kv_cache_free_gpu_mem_fraction} not in (0, 1]")

    def params(self) -> dict[str, str]:
        # The backend parses booleans from lower-case strings.
        return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in asdict(self).items()}




def render_config(params: Mapping[str, object], template_root: Path = TEMPLATE_ROOT) -> str:
    path = template_root / TEMPLATE_MODEL / CONFIG_NAME
    return fill_template(path.read_text(), params, source=str(path))


def render_repo(cfg: TrtllmRepoConfig, out_root: str | Path, template_root: Path = TEMPLATE_ROOT) -> Path:
    """Writes out_root/llm/{config.pbtxt, 1/}; replaces an existing out_root/llm. Returns the model folder."""
    text = render_config(cfg.params(), template_root)   # before touching out_root: a bad template changes nothing
    model_dir = Path(out_root) / LLM_MODEL
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / VERSION_DIR).mkdir(parents=True)
    (model_dir / CONFIG_NAME).write_text(text)
    return model_dir


def parse_model_config(text: str):
    """config.pbtxt text -> tritonclient's ModelConfig protobuf (the parser Triton itself uses)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cosyvoice_llm.trtllm.repo", description=__doc__.split("\n")[0])
    p.add_argument("--engine-dir", required=True, help="TensorRT-LLM engine dir as seen by tritonserver")
    p.add_argument("--out", required=True, type=Path, help="model repository root to write (llm/ inside)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-queue-delay-us", type=int, default=0)
    p.add_argument("--max-tokens-in-paged-kv-cache", type=int, default=2560)
    p.add_argument("--max-attention-window-size", type=int, default=2560)
    p.add_argument("--kv-cache-free-gpu-mem-fraction", type=float, default=0.5)
    p.add_argument("--gpu-device-ids", default="0")
    args = p.parse_args(argv)
    cfg = TrtllmRepoConfig(
        engine_dir=str(Path(args.engine_dir).absolute()), triton_max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us, max_tokens_in_paged_kv_cache=args.max_tokens_in_paged_kv_cache,
        max_attention_window_size=args.max_attention_window_size,
        kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction, gpu_device_ids=args.gpu_device_ids)
    model_dir = render_repo(cfg, args.out)
    print(f"wrote {model_dir} (tensorrtllm backend, engine {cfg.engine_dir}); "
          f"serve with: tritonserver --model-repository {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
