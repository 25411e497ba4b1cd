"""Golden-parity cases of the LLM stage against `<golden_dir>/llm.npz` (see the golden README)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from cosyvoice_common.constants import SPEECH_EOS, SPEECH_ID_OFFSET
from cosyvoice_common.parity import ParityResult, compare, compare_exact

from .model import Qwen2LM, build_prompt_flat_ids, load_llm
from .sampling import SamplingParams

LOGP_ATOL = 1e-4          # README: float32 re-implementation tolerance for hidden states and log-probs
EMBEDDING_ATOL = 1e-6     # embedding lookup is a copy: only representation noise allowed


def load_golden_llm(golden_dir: Path, dtype: torch.dtype = torch.float32) -> Qwen2LM:
    """Qwen2LM built from the golden config.json's `llm` section + CosyVoice-BlankEN/config.json, llm.pt strict,
    cast to `dtype` by `load_llm` (the engine's load path)."""
    llm_cfg = json.loads((golden_dir / "config.json").read_text())["llm"]
    return load_llm(golden_dir, device="cpu", dtype=dtype, llm_cfg=llm_cfg)


@torch.inference_mode()
def _teacher_forced_step_logp(model: Qwen2LM, prefix: list[int], fed_codes: np.ndarray) -> np.ndarray:
    """Cached path: prefill `prefix`, then feed `fed_codes` one at a time; log-probs before every prediction
    [len(fed_codes) + 1, 6564]."""
    model.setup_caches(1, len(prefix) + len(fed_codes) + 1)
    slot = torch.zeros(1, dtype=torch.int64)
    rows = [model.prefill(torch.tensor(prefix, dtype=torch.int64), slot)]
    for i, code in enumerate(fed_codes):
        rows.append(model.decode_step(torch.tensor([int(code)]), torch.tensor([len(prefix) + i]), slot)[0])
    return torch.stack(rows).numpy()


def cases(golden_dir: Path) -> list[ParityResult]:
    golden_dir = Path(golden_dir)
    z = np.load(golden_dir / "llm.npz")
    model = load_golden_llm(golden_dir)
    prompt_text = z["prompt_text"][0].tolist()
    text = z["text"][0].tolist()
    prompt_speech = z["prompt_speech_token"][0].tolist()
    target = z["tf_target_speech_token"][0].tolist()
    results: list[ParityResult] = []

    # Teacher forcing over the whole sequence, cache-free path.
    tf_ids = build_prompt_flat_ids(text, prompt_text, prompt_speech) + [c + SPEECH_ID_OFFSET for c in target]
    with torch.inference_mode():
        ids = torch.tensor([tf_ids], dtype=torch.int64)
        embeds = model.embed_flat(ids)
        hidden = model.forward_hidden(ids)
        logp = model.speech_logp(hidden)
    results.append(compare("llm.tf_lm_input", embeds.numpy(), z["tf_lm_input"], EMBEDDING_ATOL))
    results.append(compare("llm.tf_hidden", hidden.numpy(), z["tf_hidden"], LOGP_ATOL))
    results.append(compare("llm.tf_logp", logp.numpy(), z["tf_logp"], LOGP_ATOL))

    # Greedy continuation: log-probs on the cached path, tokens through the public inference API.
    prefix = build_prompt_flat_ids(text, prompt_text, prompt_speech)
    greedy_want = z["greedy_tokens"]
    n_greedy = len(greedy_want)
    greedy_logp = _teacher_forced_step_logp(model, prefix, greedy_want[:-1])
    results.append(compare("llm.greedy_logp", greedy_logp, z["greedy_logp"], LOGP_ATOL))
    tokens = list(itertools.islice(
        model.inference(text, prompt_text, prompt_speech, min_len=int(z["min_len"]), max_len=int(z["max_len"]),
                        sampling=SamplingParams.greedy()), n_greedy))
    results.append(compare_exact("llm.greedy_tokens", np.asarray(tokens, dtype=np.int32), greedy_want))
    # Same rule applied to our own log-probs (eos masked since min_len exceeds the recorded steps).
    masked = greedy_logp.copy()
    masked[:, SPEECH_EOS] = -np.inf
    results.append(compare_exact("llm.greedy_argmax", masked.argmax(-1).astype(np.int32), greedy_want))

    # RAS run: teacher-force the sampled path (the stop id is never fed back) and compare per-step log-probs.
    ras_ids = z["ras_sampled_ids_incl_stop"]
    ras_logp = _teacher_forced_step_logp(model, prefix, ras_ids[:-1])
    results.append(compare("llm.ras_logp", ras_logp, z["ras_logp"], LOGP_ATOL))
    return results
