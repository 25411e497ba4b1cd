"""CausalConditionalCFM: Euler ODE solve of the estimator's vector field with classifier-free guidance (spec 5.3).

Batched: B requests become 2B estimator rows per step (rows [0, B) conditional, [B, 2B) with mu/spks/cond zeroed).
The starting noise is the reference's fixed buffer, indexed by absolute frame position, so every chunk call and
every request gets the same noise for the same frame.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import CFMConfig
from .estimator import CausalConditionalDecoder


def fixed_noise(mel_bins: int, frames: int, seed: int) -> torch.Tensor:
    """The reference's `set_all_random_seed(0); torch.randn([1, 80, 15000])`, from a private CPU generator
    (identical values, and the global RNG is left alone)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(1, mel_bins, frames, generator=gen, device="cpu", dtype=torch.float32)


def cosine_t_schedule(n_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, dt), each [n_timesteps] float32 on the CPU: the time each Euler step is evaluated at and its step size.

    Mirrors the reference's float32 recurrence exactly (t += dt; dt = t_span[k+1] - t) rather than the closed form,
    so t matches it bit for bit.
    """
    span = torch.linspace(0, 1, n_timesteps + 1, dtype=torch.float32, device="cpu")
    span = 1 - torch.cos(span * 0.5 * math.pi)
    t, dt = span[0], span[1] - span[0]
    ts, dts = [], []
    for step in range(1, n_timesteps + 1):
        ts.append(t)
        dts.append(dt)
        t = t + dt
        if step < n_timesteps:
            dt = span[step + 1] - t
    return torch.stack(ts), torch.stack(dts)


class CausalConditionalCFM(nn.Module):
    def __init__(self, cfg: CFMConfig, estimator: CausalConditionalDecoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.estimator = estimator
        # Not in flow.pt: regenerated here, never saved.
        self.register_buffer("rand_noise", fixed_noise(cfg.mel_bins, cfg.noise_frames, cfg.noise_seed),
                             persistent=False)
        self._schedules: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def t_schedule(self, n_timesteps: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n_timesteps, device, dtype)
        sched = self._schedules.get(key)
        if sched is None:
            t, dt = cosine_t_schedule(n_timesteps)
            sched = (t.to(device=device, dtype=dtype), dt.to(device=device, dtype=dtype))
            self._schedules[key] = sched
        return sched

    def forward(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                n_timesteps: int | None = None, streaming: bool = False) -> torch.Tensor:
        """mu, cond [B, 80, F]; mask [B, 1, F]; spks [B, 80] -> mel [B, 80, F] (float32)."""
        b, _, frames = mu.shape
        if frames > self.rand_noise.size(-1):
            raise ValueError(f"flow input of {frames} mel frames exceeds the fixed noise ({self.rand_noise.size(-1)})")
        n_steps = self.cfg.n_timesteps if n_timesteps is None else n_timesteps
        dtype = spks.dtype   # the reference builds the CFG batch in the speaker embedding's dtype
        t_sched, dt_sched = self.t_schedule(n_steps, mu.device, mu.dtype)
        x = self.rand_noise[:, :, :frames].to(device=mu.device, dtype=mu.dtype).expand(b, -1, -1)

        # Constant for the whole solve: built once, not per step.
        mask_in = torch.cat([mask, mask], dim=0).to(dtype)
        mu_in = torch.cat([mu, torch.zeros_like(mu)], dim=0).to(dtype)
        spks_in = torch.cat([spks, torch.zeros_like(spks)], dim=0).to(dtype)
        cond_in = torch.cat([cond, torch.zeros_like(cond)], dim=0).to(dtype)
        x_in = torch.empty((2 * b, mu.size(1), frames), device=mu.device, dtype=dtype)
        guided, unguided = 1.0 + self.cfg.inference_cfg_rate, self.cfg.inference_cfg_rate
        for step in range(n_steps):
            x_in[:b] = x
            x_in[b:] = x
            v = self.estimator(x_in, mask_in, mu_in, t_sched[step].to(dtype).expand(2 * b), spks_in, cond_in,
                               streaming=streaming)
            x = x + dt_sched[step] * (guided * v[:b] - unguided * v[b:])
        return x.float()
