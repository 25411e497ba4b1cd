"""HiFT vocoder (spec 6): F0 predictor, harmonic-plus-noise source, NSF + iSTFT generator.

State-dict keys are those of the reference ``hift.pt`` with parametrised weight norm
(``<m>.parametrizations.weight.original0/1``); :func:`load_hift_state` also accepts the legacy
``weight_g``/``weight_v`` spelling and a ``generator.`` prefix.

Randomness: the source module draws, per call and in the reference's order, ``rand(B, H)`` (initial
harmonic phases), ``randn(B, L, H)`` (additive noise) and ``randn(B, L, 1)`` (a noise branch the
generator discards). Draws come from an explicit ``torch.Generator`` so requests are reproducible and
isolated; :class:`SourceDraws` injects stored draws instead (parity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from cosyvoice_common.checkpoint import check_state_dict
from cosyvoice_common.modelconfig import load_model_config
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

# Snake keeps 1/alpha finite for a zero alpha (reference value).
SNAKE_EPS = 1e-9
# The reference applies F.leaky_relu with torch's default slope before conv_post, not lrelu_slope.
POST_LRELU_SLOPE = 0.01
# iSTFT magnitudes are clipped here before synthesis (reference value).
ISTFT_MAX_MAGNITUDE = 1e2
ISTFT_MIN_ENVELOPE = 1e-11   # torch.istft's own validity bound on the window envelope
# SineGen2 is the reference's source for every rate except this one (which uses the older SineGen).
SINEGEN1_SAMPLE_RATE_HZ = 22050
# Unvoiced noise std is sine_amp / 3 so that its peak is about the sine amplitude.
UNVOICED_NOISE_DIVISOR = 3.0
# Prefix some checkpoints carry on every hift key.
GENERATOR_KEY_PREFIX = "generator."
WEIGHT_NORM_G, WEIGHT_NORM_V = "parametrizations.weight.original0", "parametrizations.weight.original1"
LEGACY_G, LEGACY_V = "weight_g", "weight_v"


@dataclass(frozen=True, slots=True)
class HiFTConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate_hz: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold_hz: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop_len_samples: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_in_channels: int = 80
    f0_cond_channels: int = 512

    def __post_init__(self) -> None:
        n_up = len(self.upsample_rates)
        if n_up == 0 or len(self.upsample_kernel_sizes) != n_up:
            raise ValueError("upsample_rates and upsample_kernel_sizes must be non-empty and of equal length")
        if len(self.source_resblock_kernel_sizes) != n_up or len(self.source_resblock_dilation_sizes) != n_up:
            raise ValueError("one source resblock per upsampling stage is required")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.base_channels % (2 ** n_up):
            raise ValueError(f"base_channels {self.base_channels} must be divisible by 2**{n_up}")
        if self.sampling_rate_hz == SINEGEN1_SAMPLE_RATE_HZ:
            raise ValueError("the 22050 Hz SineGen source variant is not implemented (CosyVoice2 uses 24 kHz)")
        if self.istft_n_fft % 2 or self.istft_hop_len_samples <= 0:
            raise ValueError("istft n_fft must be even and hop positive")
        if self.f0_num_class != 1:
            raise ValueError("the F0 predictor must have exactly one output class")
        if not 0 < self.audio_limit <= 1:
            raise ValueError("audio_limit must be in (0, 1]")

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.istft_hop_len_samples

    @property
    def n_harmonic_channels(self) -> int:
        return self.nb_harmonics + 1

    @property
    def spectrum_channels(self) -> int:
        return self.istft_n_fft + 2  # real + imaginary halves of the one-sided spectrum

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "HiFTConfig":
        """From the "hift" section of a golden config.json / load_model_config() dict."""
        f0 = cfg.get("f0_predictor", {}) or {}
        istft = cfg.get("istft_params", {}) or {}
        d = cls()
        return cls(
            in_channels=int(cfg.get("in_channels", d.in_channels)),
            base_channels=int(cfg.get("base_channels", d.base_channels)),
            nb_harmonics=int(cfg.get("nb_harmonics", d.nb_harmonics)),
            sampling_rate_hz=int(cfg.get("sampling_rate", d.sampling_rate_hz)),
            nsf_alpha=float(cfg.get("nsf_alpha", d.nsf_alpha)),
            nsf_sigma=float(cfg.get("nsf_sigma", d.nsf_sigma)),
            nsf_voiced_threshold_hz=float(cfg.get("nsf_voiced_threshold", d.nsf_voiced_threshold_hz)),
            upsample_rates=tuple(int(v) for v in cfg.get("upsample_rates", d.upsample_rates)),
            upsample_kernel_sizes=tuple(int(v) for v in cfg.get("upsample_kernel_sizes", d.upsample_kernel_sizes)),
            istft_n_fft=int(istft.get("n_fft", d.istft_n_fft)),
            istft_hop_len_samples=int(istft.get("hop_len", d.istft_hop_len_samples)),
            resblock_kernel_sizes=tuple(int(v) for v in cfg.get("resblock_kernel_sizes", d.resblock_kernel_sizes)),
            resblock_dilation_sizes=tuple(tuple(int(x) for x in v)
                                          for v in cfg.get("resblock_dilation_sizes", d.resblock_dilation_sizes)),
            source_resblock_kernel_sizes=tuple(
                int(v) for v in cfg.get("source_resblock_kernel_sizes", d.source_resblock_kernel_sizes)),
            source_resblock_dilation_sizes=tuple(
                tuple(int(x) for x in v)
                for v in cfg.get("source_resblock_dilation_sizes", d.source_resblock_dilation_sizes)),
            lrelu_slope=float(cfg.get("lrelu_slope", d.lrelu_slope)),
            audio_limit=float(cfg.get("audio_limit", d.audio_limit)),
            f0_num_class=int(f0.get("num_class", d.f0_num_class)),
            f0_in_channels=int(f0.get("in_channels", d.f0_in_channels)),
            f0_cond_channels=int(f0.get("cond_channels", d.f0_cond_channels)),
        )


@dataclass(frozen=True, slots=True)
class SourceDraws:
    """The source module's random draws for one call (injected instead of sampling; parity).

    rand_ini: [B, H] uniform initial phases (column 0 is zeroed by the module).
    noise_randn: [B, L, H] standard normal additive noise, L = samples_per_frame * frames.
    """
    rand_ini: torch.Tensor
    noise_randn: torch.Tensor


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha with a per-channel, linear-scale alpha."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Three (Snake, dilated conv, Snake, conv) residual units, dilations from the config."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d,
                                  padding=_same_padding(kernel_size, d)))
            for d in dilations)
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1,
                                  padding=_same_padding(kernel_size)))
            for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    """Five weight-normed k3 convs with ELU, a Linear to one class, absolute value -> f0 [B, F] in Hz."""

    N_CONVS = 5
    KERNEL_SIZE = 3

    def __init__(self, in_channels: int, cond_channels: int, num_class: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(self.N_CONVS):
            layers.append(weight_norm(nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels,
                                                self.KERNEL_SIZE, padding=_same_padding(self.KERNEL_SIZE))))
            layers.append(nn.ELU())
        # Sequential indices 0, 2, 4, 6, 8 are the convs: the checkpoint's condnet.{i} names.
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


class SourceModuleHnNSF(nn.Module):
    """SineGen2 harmonics (non-causal) + noise, merged by Linear(H, 1) + tanh.

    Only ``l_linear`` has parameters; the sine generation mirrors the reference's operation order so
    float32 phases match (phase = float32 cumsum * 2pi * samples_per_frame; sensitivity is inherent).
    """

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.sampling_rate_hz = float(cfg.sampling_rate_hz)
        self.upsample_scale = cfg.samples_per_frame
        self.n_harmonic_channels = cfg.n_harmonic_channels
        self.sine_amp = cfg.nsf_alpha
        self.voiced_noise_std = cfg.nsf_sigma
        self.unvoiced_noise_std = cfg.nsf_alpha / UNVOICED_NOISE_DIVISOR
        self.voiced_threshold_hz = cfg.nsf_voiced_threshold_hz
        self.l_linear = nn.Linear(self.n_harmonic_channels, 1)
        # Harmonic multipliers 1..H, a constant built once (non-persistent: not a checkpoint key).
        self.register_buffer("harmonic_multipliers",
                             torch.arange(1, self.n_harmonic_channels + 1, dtype=torch.float32)[None, None, :],
                             persistent=False)

    def draw(self, batch: int, n_samples: int, device: torch.device,
             generator: torch.Generator | None) -> SourceDraws:
        """The reference's three draws, in its order; the third (noise branch) is discarded."""
        rand_ini = torch.rand(batch, self.n_harmonic_channels, device=device, generator=generator)
        # The reference's randn_like() fills a harmonic-major ([B, H, L] memory, viewed [B, L, H]) tensor;
        # torch's CPU sampler yields different numbers for that layout, so fill the same layout.
        noise = torch.empty(batch, self.n_harmonic_channels, n_samples, device=device).transpose(1, 2)
        noise.normal_(generator=generator)
        # Consumed only so a generator seeded like the reference's global RNG stays in step across calls.
        torch.randn(batch, n_samples, 1, device=device, generator=generator)
        return SourceDraws(rand_ini=rand_ini, noise_randn=noise)

    def forward(self, f0_up: torch.Tensor, draws: SourceDraws) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f0_up [B, L, 1] (Hz, per sample) -> (excitation [B, L, 1], sine_waves [B, L, H], uv [B, L, 1])."""
        fn = f0_up * self.harmonic_multipliers.to(f0_up.dtype)
        rad = torch.remainder(fn / self.sampling_rate_hz, 1.0)
        rand_ini = draws.rand_ini.to(rad.dtype).clone()
        rand_ini[:, 0] = 0
        # No effect on the output (frame-rate interpolation never reads sample 0) but kept for fidelity.
        rad[:, 0, :] = rad[:, 0, :] + rand_ini
        rad_frames = F.interpolate(rad.transpose(1, 2), scale_factor=1.0 / self.upsample_scale,
                                   mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad_frames, dim=1) * 2 * math.pi
        phase = F.interpolate(phase.transpose(1, 2) * self.upsample_scale, scale_factor=float(self.upsample_scale),
                              mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * self.sine_amp
        uv = (f0_up > self.voiced_threshold_hz).to(sines.dtype)
        noise_amp = uv * self.voiced_noise_std + (1 - uv) * self.unvoiced_noise_std
        sine_waves = sines * uv + noise_amp * draws.noise_randn.to(sines.dtype)
        excitation = torch.tanh(self.l_linear(sine_waves))
        return excitation, sine_waves, uv


class HiFTGenerator(nn.Module):
    """Neural source filter + iSTFT vocoder: mel [B, 80, F] -> 24 kHz speech [B, samples_per_frame * F]."""

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_up = len(cfg.upsample_rates)
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        # Module creation order follows the reference so state_dict() order matches hift.pt.
        self.m_source = SourceModuleHnNSF(cfg)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.in_channels, cfg.base_channels, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(cfg.base_channels // 2 ** i, cfg.base_channels // 2 ** (i + 1),
                                           k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        # Source path: the STFT frames (rate hop) are brought down to each stage's rate; the stage
        # i rate is the product of the later upsample rates.
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i in range(n_up):
            stride = math.prod(cfg.upsample_rates[i + 1:])
            ch = cfg.base_channels // 2 ** (i + 1)
            if stride == 1:
                self.source_downs.append(nn.Conv1d(cfg.spectrum_channels, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(cfg.spectrum_channels, ch, stride * 2, stride,
                                                   padding=stride // 2))
            self.source_resblocks.append(ResBlock(ch, cfg.source_resblock_kernel_sizes[i],
                                                  cfg.source_resblock_dilation_sizes[i]))
        self.resblocks = nn.ModuleList(
            ResBlock(cfg.base_channels // 2 ** (i + 1), k, d)
            for i in range(n_up) for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(cfg.base_channels // 2 ** n_up, cfg.spectrum_channels, 7, 1,
                                               padding=3))
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_in_channels, cfg.f0_cond_channels, cfg.f0_num_class)
        # Periodic Hann, built once; non-persistent so it is not a checkpoint key but follows .to().
        self.register_buffer("stft_window", torch.hann_window(cfg.istft_n_fft, periodic=True, dtype=torch.float32),
                             persistent=False)

    @classmethod
    def from_config(cls, hift_cfg: Mapping[str, Any] | HiFTConfig) -> "HiFTGenerator":
        cfg = hift_cfg if isinstance(hift_cfg, HiFTConfig) else HiFTConfig.from_dict(hift_cfg)
        return cls(cfg)

    # --- weight norm --------------------------------------------------------------------------------
    def fold_weight_norm(self) -> "HiFTGenerator":
        """Replace every weight-norm parametrisation by its plain effective weight (faster inference).

        After this the state_dict carries plain ``.weight`` keys; load checkpoints before folding.
        """
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self

    # --- pieces -------------------------------------------------------------------------------------
    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, n_fft + 2, L / hop + 1]: real then imaginary parts, centred (reflect) STFT."""
        n_fft = self.cfg.istft_n_fft
        spec = torch.stft(x, n_fft, self.cfg.istft_hop_len_samples, n_fft, window=self.stft_window.to(x.dtype),
                          return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        n_fft = self.cfg.istft_n_fft
        magnitude = torch.clamp(magnitude, max=ISTFT_MAX_MAGNITUDE)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, n_fft, self.cfg.istft_hop_len_samples, n_fft,
                           window=self.stft_window.to(magnitude.dtype))

    def upsample_f0(self, f0: torch.Tensor) -> torch.Tensor:
        """f0 [B, F] -> [B, F * samples_per_frame, 1] by repetition (nearest)."""
        return torch.repeat_interleave(f0, self.cfg.samples_per_frame, dim=1).unsqueeze(-1)

    def source(self, mel: torch.Tensor, generator: torch.Generator | None = None,
               draws: SourceDraws | None = None) -> torch.Tensor:
        """mel [B, 80, F] -> excitation [B, 1, F * samples_per_frame]."""
        f0_up = self.upsample_f0(self.f0_predictor(mel))
        if draws is None:
            draws = self.m_source.draw(f0_up.shape[0], f0_up.shape[1], f0_up.device, generator)
        excitation, _, _ = self.m_source(f0_up, draws)
        return excitation.transpose(1, 2)

    def decode(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """mel x [B, 80, F], excitation s [B, 1, F * samples_per_frame] -> speech [B, F * samples_per_frame]."""
        s_stft = self._stft(s.squeeze(1))
        x = self.conv_pre(x)
        n_up = len(self.ups)
        for i in range(n_up):
            x = F.leaky_relu(x, self.cfg.lrelu_slope)
            x = self.ups[i](x)
            if i == n_up - 1:
                # One reflected sample on the left aligns the last stage with the L / hop + 1 STFT frames.
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = F.leaky_relu(x, POST_LRELU_SLOPE)
        x = self.conv_post(x)
        n_bins = self.cfg.istft_n_fft // 2 + 1
        magnitude = torch.exp(x[:, :n_bins, :])
        phase = torch.sin(x[:, n_bins:, :])  # the reference's (redundant) sin
        speech = self._istft(magnitude, phase)
        return torch.clamp(speech, -self.cfg.audio_limit, self.cfg.audio_limit)

    @torch.inference_mode()
    def inference(self, speech_feat: torch.Tensor, cache_source: torch.Tensor | None = None,
                  generator: torch.Generator | None = None,
                  draws: SourceDraws | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """speech_feat [B, 80, F]; cache_source [B, 1, K] (K may be 0) overwrites the first K excitation
        samples (phase continuity across chunks). Returns (speech [B, 480F], source [B, 1, 480F])."""
        s = self.source(speech_feat, generator=generator, draws=draws)
        if cache_source is not None and cache_source.shape[-1] > 0:
            s[:, :, :cache_source.shape[-1]] = cache_source.to(s.dtype)
        return self.decode(speech_feat, s), s

    # --- a padded batch of calls --------------------------------------------------------------------
    @staticmethod
    def _length_mask(n: int, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (torch.arange(n, device=valid.device)[None, :] < valid).unsqueeze(1).to(dtype)     # [B, 1, n]

    @staticmethod
    def _resblock_masked(rb: ResBlock, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(rb.convs1, rb.convs2, rb.activations1, rb.activations2):
            x = x + conv2(act2(conv1(act1(x) * mask)) * mask)
        return x

    def forward_padded(self, mel: torch.Tensor, frames: torch.Tensor, cache_source: torch.Tensor,
                       cache_samples: torch.Tensor, rand_ini: torch.Tensor,
                       noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`inference` for rows of different lengths in one batch, each row as if alone (weight norm folded).

        mel [B, 80, M] zero past each row's `frames` [B, 1]; cache_source [B, K] overwrites a row's first
        `cache_samples` [B, 1] (0 or K) excitation samples; rand_ini [B, H], noise [B, M * spf, H]: the
        source's draws. Returns (speech [B, M * spf], excitation [B, M * spf]), float32.

        Every conv input is zeroed past the row's valid length (what the unpadded call's zero padding gives),
        the STFT reflects each row at its own end, the phase is held at the row's last frame before the
        linear up-sampling, and the iSTFT overlap-adds only the row's frames and divides by its own envelope.
        """
        cfg = self.cfg
        dt = mel.dtype
        spf = cfg.samples_per_frame
        fmask = self._length_mask(mel.size(2), frames, dt)
        # F0 predictor: five convs, each input zeroed past the row's frames.
        h = mel
        condnet = self.f0_predictor.condnet
        for i in range(0, len(condnet), 2):
            h = condnet[i + 1](condnet[i](h * fmask))
        f0 = self.f0_predictor.classifier(h.transpose(1, 2)).squeeze(-1).abs()      # [B, M]
        # Source (SineGen2), as SourceModuleHnNSF.forward, holding the phase past each row's last frame.
        ms = self.m_source
        f0_up = torch.repeat_interleave(f0, spf, dim=1).unsqueeze(-1)                # [B, L, 1]
        fn = f0_up * ms.harmonic_multipliers.to(dt)
        rad = torch.remainder(fn / ms.sampling_rate_hz, 1.0)
        rad[:, 0, :] = rad[:, 0, :] + rand_ini
        rad_frames = F.interpolate(rad.transpose(1, 2), scale_factor=1.0 / spf, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad_frames, dim=1) * 2 * math.pi
        n_fr = phase.size(1)
        hold = torch.minimum(torch.arange(n_fr, device=mel.device)[None, :], frames.clamp(max=n_fr) - 1)
        phase = phase.gather(1, hold.unsqueeze(-1).expand(-1, -1, phase.size(2)))
        phase = F.interpolate(phase.transpose(1, 2) * spf, scale_factor=float(spf), mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * ms.sine_amp
        uv = (f0_up > ms.voiced_threshold_hz).to(dt)
        noise_amp = uv * ms.voiced_noise_std + (1 - uv) * ms.unvoiced_noise_std
        sine_waves = sines * uv + noise_amp * noise
        s = torch.tanh(ms.l_linear(sine_waves)).squeeze(-1)                          # [B, L]
        n_len = s.size(1)
        k = cache_source.size(1)
        head = torch.where(torch.arange(k, device=mel.device)[None, :] < cache_samples, cache_source.to(dt), s[:, :k])
        s = torch.cat([head, s[:, k:]], 1)
        # STFT, centred, each row reflected at its own end.
        n_fft, hop = cfg.istft_n_fft, cfg.istft_hop_len_samples
        half = n_fft // 2
        l_len = frames * spf
        q = (torch.arange(n_len + n_fft, device=mel.device) - half).abs()[None, :]
        q = torch.where(q >= l_len, 2 * (l_len - 1) - q, q).clamp(0, n_len - 1)
        window = self.stft_window.to(dt)
        spec = torch.stft(s.gather(1, q), n_fft, hop, n_fft, window=window, center=False, return_complex=True)
        smask = self._length_mask(spec.size(-1), l_len // hop + 1, dt)
        s_stft = torch.cat([spec.real, spec.imag], dim=1) * smask
        # Generator.
        x = self.conv_pre(mel)
        valid = frames
        n_up = len(self.ups)
        nk = self.num_kernels
        for i in range(n_up):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x = self.ups[i](x * self._length_mask(x.size(2), valid, dt))
            valid = valid * cfg.upsample_rates[i]
            if i == n_up - 1:
                x = F.pad(x, (1, 0), mode="reflect")
                valid = valid + 1
            xmask = self._length_mask(x.size(2), valid, dt)
            x = x + self._resblock_masked(self.source_resblocks[i], self.source_downs[i](s_stft), xmask)
            xs = self._resblock_masked(self.resblocks[i * nk], x, xmask)
            for j in range(1, nk):
                xs = xs + self._resblock_masked(self.resblocks[i * nk + j], x, xmask)
            x = xs / nk
        x = self.conv_post(F.leaky_relu(x, POST_LRELU_SLOPE) * xmask)
        n_bins = n_fft // 2 + 1
        magnitude = torch.clamp(torch.exp(x[:, :n_bins, :]), max=ISTFT_MAX_MAGNITUDE)
        ph = torch.sin(x[:, n_bins:, :])
        stft_frames = torch.fft.irfft(torch.complex(magnitude * torch.cos(ph), magnitude * torch.sin(ph))
                                      .transpose(1, 2), n=n_fft, dim=-1)               # [B, N, n_fft]
        fr_mask = xmask.transpose(1, 2)                                              # [B, N, 1]
        n_out = n_fft + hop * (stft_frames.size(1) - 1)
        y = F.fold((stft_frames * window * fr_mask).transpose(1, 2), (1, n_out), (1, n_fft), stride=(1, hop))
        env = F.fold((window * window * fr_mask).transpose(1, 2), (1, n_out), (1, n_fft), stride=(1, hop))
        y, env = y.flatten(1)[:, half:n_out - half], env.flatten(1)[:, half:n_out - half]
        speech = torch.where(env > ISTFT_MIN_ENVELOPE, y / torch.where(env > ISTFT_MIN_ENVELOPE, env, 1.0), 0.0)
        return torch.clamp(speech, -cfg.audio_limit, cfg.audio_limit).float(), s.float()


# --- checkpoint loading --------------------------------------------------------------------------------
def normalize_hift_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``generator.`` and map legacy ``weight_g``/``weight_v`` to parametrised names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(GENERATOR_KEY_PREFIX):
            key = key[len(GENERATOR_KEY_PREFIX):]
        if key.endswith("." + LEGACY_G):
            key = key[: -len(LEGACY_G)] + WEIGHT_NORM_G
        elif key.endswith("." + LEGACY_V):
            key = key[: -len(LEGACY_V)] + WEIGHT_NORM_V
        out[key] = value
    return out


def load_hift_state(module: HiFTGenerator, state: Mapping[str, torch.Tensor], what: str = "hift.pt") -> None:
    state = normalize_hift_keys(state)
    check_state_dict(module, state, what)
    module.load_state_dict(state, strict=True)


def build_hift(hift_cfg: Mapping[str, Any] | HiFTConfig, checkpoint: str | Path, device: torch.device | str = "cpu",
               fold: bool = True) -> HiFTGenerator:
    """Build from a config section, load ``checkpoint`` strictly, optionally fold weight norm, eval mode."""
    model = HiFTGenerator.from_config(hift_cfg)
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    load_hift_state(model, state, what=str(checkpoint))
    if fold:
        model.fold_weight_norm()
    return model.to(device).eval()


def load_hift(model_dir: str | Path, device: torch.device | str = "cpu", fold: bool = True) -> HiFTGenerator:
    """HiFT of a CosyVoice2 model directory (``cosyvoice2.yaml`` + ``hift.pt``), float32."""
    cfg = load_model_config(model_dir)["hift"]
    return build_hift(cfg, Path(model_dir) / "hift.pt", device=device, fold=fold)
