import math

import pytest
import torch

from cosyvoice_common.constants import SPEECH_EOS
from cosyvoice_llm.sampling import (
    BatchSamplingParams, SamplingParams, exponential_noise, mask_eos, push_history, ras_sample, sample_batched,
)

VOCAB = 64


def _logp(probs: list[float]) -> torch.Tensor:
    p = torch.tensor(probs + [0.0] * (VOCAB - len(probs)), dtype=torch.float32)
    return torch.log(p)   # zeros become -inf: never drawn


def _empty_history(rows: int, width: int = 10) -> torch.Tensor:
    return torch.full((rows, width), -1, dtype=torch.int64)


def test_top_k_one_is_argmax_in_both_samplers():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(8, VOCAB, generator=gen).log_softmax(-1)
    greedy = SamplingParams.greedy()
    single = [ras_sample(logp[b], [], greedy, torch.Generator().manual_seed(b)) for b in range(8)]
    bp = BatchSamplingParams.from_params([greedy] * 8, list(range(8)))
    batched = sample_batched(logp, _empty_history(8), torch.zeros(8, dtype=torch.int64), bp)
    assert single == logp.argmax(-1).tolist()
    assert batched.tolist() == logp.argmax(-1).tolist()


def test_ties_go_to_the_lowest_id():
    logp = _logp([0.1, 0.3, 0.3, 0.3])
    greedy = SamplingParams.greedy()
    assert ras_sample(logp, [], greedy) == 1
    bp = BatchSamplingParams.from_params([greedy], [5])
    assert sample_batched(logp[None], _empty_history(1), torch.zeros(1, dtype=torch.int64), bp).item() == 1


def test_nucleus_keeps_the_crossing_token_then_stops():
    # top_p 0.7: 0.5 is kept (0 < 0.7), 0.25 is kept (0.5 < 0.7) and crosses, 0.25 is dropped (0.75 >= 0.7).
    logp = _logp([0.5, 0.25, 0.25])
    params = SamplingParams(top_p=0.7, top_k=25, win_size=10, tau_r=1.1)
    gen = torch.Generator().manual_seed(0)
    single = [ras_sample(logp, [], params, gen) for _ in range(600)]
    n = 2000
    bp = BatchSamplingParams.from_params([params] * n, list(range(n)))
    batched = sample_batched(logp.expand(n, -1), _empty_history(n), torch.zeros(n, dtype=torch.int64), bp).tolist()
    for draws in (single, batched):
        assert set(draws) == {0, 1}
        share0 = draws.count(0) / len(draws)
        assert abs(share0 - 2 / 3) < 0.06, share0   # unnormalised 0.5 : 0.25


def test_top_k_limits_the_nucleus():
    logp = _logp([0.2, 0.2, 0.2, 0.2, 0.2])
    params = SamplingParams(top_p=1.0, top_k=2, win_size=10, tau_r=1.1)
    n = 500
    bp = BatchSamplingParams.from_params([params] * n, list(range(n)))
    draws = sample_batched(logp.expand(n, -1), _empty_history(n), torch.zeros(n, dtype=torch.int64), bp)
    assert set(draws.tolist()) == {0, 1}
    gen = torch.Generator().manual_seed(1)
    assert {ras_sample(logp, [], params, gen) for _ in range(200)} == {0, 1}


def test_repetition_in_window_falls_back_to_the_full_distribution_without_that_token():
    logp = _logp([0.9, 0.05, 0.05])
    params = SamplingParams(top_p=0.8, top_k=1, win_size=3, tau_r=0.1)   # one repeat fires
    gen = torch.Generator().manual_seed(0)
    assert {ras_sample(logp, [0, 7], params, gen) for _ in range(50)} == {1, 2}
    # Outside the window (4 tokens back with win_size 3) it does not fire.
    assert ras_sample(logp, [0, 7, 7, 7], params, gen) == 0
    hist = push_history(push_history(_empty_history(2, 5), torch.tensor([0, 0])), torch.tensor([7, 7]))
    hist[1] = torch.tensor([0, 7, 7, 7, 7])   # row 1: the repeat is out of its 3-token window
    bp = BatchSamplingParams.from_params([params] * 2, [3, 3])
    got = sample_batched(logp.expand(2, -1), hist, torch.zeros(2, dtype=torch.int64), bp).tolist()
    assert got[0] in (1, 2) and got[1] == 0


def test_min_repeats_is_computed_in_double_like_the_reference():
    assert SamplingParams(win_size=10, tau_r=0.1).min_repeats == 1
    assert SamplingParams(win_size=10, tau_r=0.25).min_repeats == 3
    assert SamplingParams.greedy().min_repeats > SamplingParams.greedy().win_size   # unreachable


def test_batched_draws_depend_only_on_seed_and_step():
    logp = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2)).log_softmax(-1)
    params = SamplingParams(top_p=0.95, top_k=50, win_size=10, tau_r=1.1)
    other = torch.randn(3, VOCAB).log_softmax(-1)
    alone = sample_batched(logp, _empty_history(1), torch.tensor([7]),
                           BatchSamplingParams.from_params([params], [42]))
    mixed = sample_batched(torch.cat([other, logp]), _empty_history(4), torch.tensor([0, 1, 2, 7]),
                           BatchSamplingParams.from_params([params] * 4, [1, 2, 3, 42]))
    assert mixed[3] == alone[0]
    steps = torch.arange(64)
    seqs = sample_batched(logp.expand(64, -1), _empty_history(64), steps,
                          BatchSamplingParams.from_params([params] * 64, [42] * 64))
    assert len(set(seqs.tolist())) > 3   # the step counter changes the draw


def test_exponential_noise_has_unit_mean_and_is_finite():
    e = exponential_noise(torch.tensor([0, 1, 2**40 + 5]), torch.tensor([0, 0, 9]), 0, 4096)
    assert torch.isfinite(e).all() and (e > 0).all()
    assert abs(e.mean().item() - 1.0) < 0.05
    assert not torch.equal(e[0], e[1])


def test_temperature_sharpens_and_flattens():
    logp = _logp([0.6, 0.4])
    n = 2000
    cold = SamplingParams(top_p=1.0, top_k=25, win_size=10, tau_r=1.1, temperature=0.05)
    hot = SamplingParams(top_p=1.0, top_k=25, win_size=10, tau_r=1.1, temperature=20.0)
    zeros = torch.zeros(n, dtype=torch.int64)
    c = sample_batched(logp.expand(n, -1), _empty_history(n), zeros,
                       BatchSamplingParams.from_params([cold] * n, range(n)))
    h = sample_batched(logp.expand(n, -1), _empty_history(n), zeros,
                       BatchSamplingParams.from_params([hot] * n, range(n)))
    assert (c == 0).float().mean() > 0.99
    assert abs((h == 0).float().mean().item() - 0.5) < 0.05


def test_mask_eos_only_masks_eos_rows_that_are_blocked():
    logp = torch.zeros(2, SPEECH_EOS + 3)
    out = mask_eos(logp, torch.tensor([True, False]))
    assert math.isinf(out[0, SPEECH_EOS].item()) and out[1, SPEECH_EOS] == 0
    assert (out[:, SPEECH_EOS + 1:] == 0).all()


@pytest.mark.parametrize("kwargs", [dict(top_p=0.0), dict(top_k=0), dict(win_size=0), dict(temperature=0.0),
                                    dict(tau_r=-1.0)])
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("cap", [1, 8, 25, 64])
def test_top_k_capped_sampler_draws_the_full_sorts_ids_with_ties(cap):
    """One top-k over (p, -id) keys gives the stable sort's candidates: same draws, ties included (bf16 logits
    have many equal values), fallback included (a full history window)."""
    gen = torch.Generator().manual_seed(3)
    n, vocab = 64, 6564
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(torch.bfloat16).float()
    logits[:8, :40] = logits[:8, :1]          # many exact ties at the top
    logp = logits.log_softmax(dim=-1)
    top_k = torch.randint(1, cap + 1, (n,), generator=gen)
    params = [SamplingParams(top_p=float(tp), top_k=int(k), win_size=10, tau_r=0.1)
              for tp, k in zip(torch.rand(n, generator=gen) * 0.9 + 0.1, top_k)]
    bp = BatchSamplingParams.from_params(params, list(range(n)))
    history = torch.randint(0, 50, (n, 16), generator=gen)
    steps = torch.arange(n, dtype=torch.int64) * 7
    full = sample_batched(logp, history, steps, bp)
    capped = sample_batched(logp, history, steps, bp, top_k_cap=cap)
    assert torch.equal(full, capped)
