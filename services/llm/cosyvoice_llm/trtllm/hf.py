"""Load the exported checkpoint with transformers' stock Qwen2ForCausalLM, lm-head bias included.

Stock Qwen2 builds `lm_head` without a bias, so `from_pretrained` reports `lm_head.bias` as unexpected and drops
it. `load_exported_causal_lm` loads the stock model, then swaps in a biased head holding the checkpoint's weight and
bias: the exported speech logits are then exactly `llm_decoder(h)` and every other row is -inf.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from .convert import HEAD_BIAS_KEY, SAFETENSORS_NAME


def _hide_broken_torchvision() -> None:
    """transformers' model code imports torchvision whenever it is installed; where the installed build does not
    match torch (its C++ ops fail to register) that import raises. Qwen2 needs no torchvision, so mark it absent
    (`sys.modules[name] = None` makes find_spec report it missing and `import` raise ImportError)."""
    try:
        # What transformers imports; a half-initialised torchvision left by an earlier failed import can pass a
        # bare `import torchvision` and still fail here.
        import torchvision.transforms  # noqa: F401
    except Exception:   # RuntimeError "operator torchvision::nms does not exist", ImportError, ...
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None
        # transformers caches its availability answer (lru_cache); forget one computed before the hiding.
        from transformers.utils import import_utils
        for name in ("is_torchvision_available", "is_torchvision_v2_available"):
            cache_clear = getattr(getattr(import_utils, name, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()


def read_head_bias(hf_dir: str | Path) -> torch.Tensor:
    from safetensors import safe_open

    path = Path(hf_dir) / SAFETENSORS_NAME
    with safe_open(str(path), framework="pt") as f:
        if HEAD_BIAS_KEY not in f.keys():
            raise KeyError(f"{path} has no {HEAD_BIAS_KEY}: not a CosyVoice2 export (cosyvoice_llm.trtllm.convert)")
        return f.get_tensor(HEAD_BIAS_KEY)


def load_exported_causal_lm(hf_dir: str | Path, dtype: torch.dtype = torch.float32):
    """transformers Qwen2ForCausalLM (eval, CPU) with `lm_head` replaced by a biased Linear from the checkpoint."""
    _hide_broken_torchvision()
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(read_head_bias(hf_dir).to(dtype))
    model.lm_head = head
    return model.eval()
