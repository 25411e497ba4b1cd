"""Golden parity of the flow: every flow.npz case, its intermediates, single estimator calls, t schedule, noise.

Works for any golden dir of the tiny-seed1 format: sizes come from its config.json "flow" section and flow.pt is
loaded strictly. Tolerances are the golden README's (float32).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

from cosyvoice_common.parity import ParityResult, compare, compare_exact
from cosyvoice_common.runtime import exact_fp32

from .flow import build_flow, cosine_t_schedule, load_flow_state

FLOW_ATOL = 1e-4                    # README: flow mel / decoder_out / mu / encoder_out / est*_out
_INTERMEDIATES = ("encoder_out", "encoder_proj_out", "spks", "mu", "cond", "decoder_out", "mel")
_EST_INPUTS = ("x", "mask", "mu", "t", "spks", "cond")


def _case_names(z: np.lib.npyio.NpzFile) -> list[str]:
    return sorted({k.split("__", 1)[0] for k in z.files if k.endswith("__mel")})


def _estimator_steps(z: np.lib.npyio.NpzFile, case: str) -> list[str]:
    """e.g. ["est0", "est3"] for keys "<case>__est0_out" ..."""
    prefix = f"{case}__"
    return sorted({k[len(prefix):-len("_out")] for k in z.files
                   if k.startswith(prefix + "est") and k.endswith("_out")})


def load_golden_flow(golden_dir: pathlib.Path, device: str = "cpu"):
    flow_cfg = json.loads((golden_dir / "config.json").read_text())["flow"]
    return load_flow_state(build_flow(flow_cfg), golden_dir / "flow.pt", device)


def cases(golden_dir: pathlib.Path, device: str = "cpu") -> list[ParityResult]:
    # TF32 convs alone move the flow mel by ~3e-3 on H100 (fails 1e-4); true fp32 stays within 5e-6.
    with exact_fp32():
        return _cases(pathlib.Path(golden_dir), device)


def _cases(golden_dir: pathlib.Path, device: str) -> list[ParityResult]:
    flow = load_golden_flow(golden_dir, device)
    z = np.load(golden_dir / "flow.npz")
    results: list[ParityResult] = []

    noise_path = golden_dir / "rand_noise.npy"
    if noise_path.exists():
        results.append(compare_exact("flow.rand_noise", flow.decoder.rand_noise.cpu().numpy(), np.load(noise_path)))

    def dev(name: str) -> torch.Tensor:
        return torch.from_numpy(z[name]).to(device)

    token, prompt_token = dev("token"), dev("prompt_token")
    prompt_feat, embedding = dev("prompt_feat"), dev("embedding")
    for case in _case_names(z):
        used = int(z[f"{case}__token_len_used"])
        # inference() returns trace.mel through the same code path (tests check it against the golden mel too)
        trace = flow.inference_trace(token[:, :used], prompt_token, prompt_feat, embedding,
                                     streaming=bool(z[f"{case}__streaming"]), finalize=bool(z[f"{case}__finalize"]))
        for name in _INTERMEDIATES:
            key = f"{case}__{name}"
            if key in z.files:
                results.append(compare(f"flow.{case}.{name}", getattr(trace, name).cpu().numpy(), z[key], FLOW_ATOL))
        for est in _estimator_steps(z, case):
            args = [dev(f"{case}__{est}_{n}") for n in _EST_INPUTS]
            with torch.inference_mode():
                out = flow.decoder.estimator(*args, streaming=bool(z[f"{case}__streaming"]))
            results.append(compare(f"flow.{case}.{est}_out", out.cpu().numpy(), z[f"{case}__{est}_out"], FLOW_ATOL))

        t_key = f"{case}__est_t_all"
        if t_key in z.files:
            t_all, _ = cosine_t_schedule(len(z[t_key]))
            results.append(compare_exact(f"flow.{case}.est_t_all", t_all.numpy(), z[t_key]))
    return results


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m cosyvoice_token2wav.parity_flow GOLDEN_DIR [DEVICE]")
    for r in cases(pathlib.Path(sys.argv[1]), *sys.argv[2:]):
        print(f"{'PASS' if r.passed else 'FAIL'} {r.case}: {r.max_abs_err:.3g} (tol {r.tolerance})")
