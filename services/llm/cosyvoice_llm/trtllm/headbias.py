"""Carry the export's `lm_head.bias` into a converted TensorRT-LLM checkpoint (no tensorrt_llm needed).

    python -m cosyvoice_llm.trtllm.headbias --hf-dir HF_DIR --ckpt-dir TRTLLM_CKPT_DIR

TensorRT-LLM's Qwen converter (`convert_checkpoint.py`, `QWenForCausalLM.from_hugging_face`) builds `lm_head`
without a bias and never reads `lm_head.bias`. This step adds it to every `rank<N>.safetensors` that holds
`lm_head.weight` (the tensor-parallel slice of that rank: ColumnLinear splits the vocabulary rows evenly) and marks
config.json with HEAD_BIAS_MARKER. build_engine.sh then runs `trtllm-build --model_cls_file
services/llm/trtllm/cosyvoice2_qwen.py` (a QWenForCausalLM whose lm_head has a bias), so the engine computes exactly
`W h + b`. `--check` only tests for the marker (exit 1 without it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .convert import HEAD_BIAS_KEY, HEAD_WEIGHT_KEY
from .hf import read_head_bias

HEAD_BIAS_MARKER = "cosyvoice2_lm_head_bias"     # key in the TRT-LLM checkpoint's config.json
TRTLLM_CONFIG_NAME = "config.json"
RANK_FILE_FORMAT = "rank{}.safetensors"


class HeadBiasError(ValueError):
    """The TRT-LLM checkpoint cannot take the bias (layout not understood); the message says why."""


def _mapping(config: dict) -> tuple[int, int]:
    """(world_size, tp_size) of a TRT-LLM checkpoint config; rank = pp_rank * tp_size + tp_rank."""
    mapping = config.get("mapping", {})
    tp = int(mapping.get("tp_size", 1))
    pp = int(mapping.get("pp_size", 1))
    if int(mapping.get("cp_size", 1)) != 1:
        # Context parallelism changes the rank layout; CosyVoice2-0.5B never needs it.
        raise HeadBiasError(f"mapping cp_size={mapping['cp_size']} is not supported")
    return int(mapping.get("world_size", tp * pp)), tp


def add_head_bias(ckpt_dir: str | Path, hf_dir: str | Path) -> list[Path]:
    """Adds `lm_head.bias` slices to the rank files holding `lm_head.weight`; returns the files changed."""
    from safetensors.torch import load_file, save_file

    ckpt_dir = Path(ckpt_dir)
    config_path = ckpt_dir / TRTLLM_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no TensorRT-LLM checkpoint config at {config_path}")
    config = json.loads(config_path.read_text())
    world, tp = _mapping(config)
    bias = read_head_bias(hf_dir).float()
    changed: list[Path] = []
    for rank in range(world):
        path = ckpt_dir / RANK_FILE_FORMAT.format(rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing (world_size {world})")
        tensors = load_file(str(path))
        if HEAD_WEIGHT_KEY not in tensors:
            continue    # not a last pipeline stage
        weight = tensors[HEAD_WEIGHT_KEY]
        rows = weight.shape[0]
        tp_rank = rank % tp
        if rows * tp != bias.shape[0]:
            raise HeadBiasError(f"{path}: lm_head.weight has {rows} rows x tp {tp} != {bias.shape[0]} bias entries "
                                "(was the checkpoint converted from a different export?)")
        tensors[HEAD_BIAS_KEY] = bias[tp_rank * rows:(tp_rank + 1) * rows].to(weight.dtype).contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        changed.append(path)
    if not changed:
        raise HeadBiasError(f"no rank file in {ckpt_dir} holds {HEAD_WEIGHT_KEY}")
    config[HEAD_BIAS_MARKER] = True
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    return changed


def has_head_bias(ckpt_dir: str | Path) -> bool:
    path = Path(ckpt_dir) / TRTLLM_CONFIG_NAME
    return path.is_file() and bool(json.loads(path.read_text()).get(HEAD_BIAS_MARKER, False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cosyvoice_llm.trtllm.headbias", description=__doc__.split("\n")[0])
    p.add_argument("--hf-dir", type=Path, help="export of cosyvoice_llm.trtllm.convert")
    p.add_argument("--ckpt-dir", required=True, type=Path, help="output dir of TensorRT-LLM's convert_checkpoint.py")
    p.add_argument("--check", action="store_true", help="only check that the checkpoint carries the bias")
    args = p.parse_args(argv)
    if args.check:
        ok = has_head_bias(args.ckpt_dir)
        print(f"{args.ckpt_dir}: lm_head.bias {'present' if ok else 'MISSING'}", file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if args.hf_dir is None:
        p.error("--hf-dir is required unless --check")
    changed = add_head_bias(args.ckpt_dir, args.hf_dir)
    print(f"added {HEAD_BIAS_KEY} to {', '.join(c.name for c in changed)}; marked {args.ckpt_dir / TRTLLM_CONFIG_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
