"""What the serving options of Token2WavRunner change and what they must not: bf16 holds the quality gate
against fp32; length-grouped scheduling runs first chunks first without changing any result; the compiled
step is configured for one dynamic-shape compilation; start-up capture covers a bounded set of buckets."""
import pytest
import torch
from cosyvoice_tools.modelgen import random_flow_and_hift

from cosyvoice_token2wav.quality import BF16_BOUNDS, FLOAT32_BOUNDS, compare, quality_gate
from cosyvoice_token2wav.runner import (MAX_GRAPH_MEL_ROWS, MAX_GRAPH_TOKEN_ROWS, MEL_FRAME_BUCKETS, TOKEN_BUCKETS,
                                        ChunkRequest, Token2WavRunner, bucket)
from cosyvoice_common.constants import MEL_BINS, SPEAKER_EMBEDDING_DIM
from cosyvoice_token2wav.token2wav import Token2Wav

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")   # 2 shared CI cores

ATOL = 1e-4
# as test_runner.py, and 5e-3 as the parity runner: the 6.4 s offline call's float32 phase cumsum grows the
# rounding difference of another batch shape along the call
WAVE_ATOL = 5e-3




def _prompt(g: torch.Generator, n_tokens: int):
    return dict(prompt_tokens=torch.randint(0, 6561, (1, n_tokens), generator=g),
                prompt_feat=torch.randn(1, 2 * n_tokens, MEL_BINS, generator=g) - 4.0,
                embedding=torch.randn(1, SPEAKER_EMBEDDING_DIM, generator=g))




@pytest.fixture(scope="module")
def models():
    flow, hift = random_flow_and_hift()
    return flow, hift


@pytest.fixture(scope="module")
def load(models):
    """A mixed load: three first chunks (short prompts), a middle chunk, a long offline call."""
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    g = torch.Generator().manual_seed(21)
    reqs = []
    for i in range(3):
        reqs.append(ChunkRequest(tokens=torch.randint(0, 6561, (1, 18), generator=g), token_offset=0, finalize=False,
                                 streaming=True, seed=40 + i, **_prompt(g, 12 + 4 * i)))
    p = _prompt(g, 16)
    toks = torch.randint(0, 6561, (1, 46), generator=g)
    _, cache = t2w.chunk(toks[:, :18], token_offset=0, finalize=False, streaming=True, cache=None,
                         generator=torch.Generator().manual_seed(3), **p)
    reqs.insert(1, ChunkRequest(tokens=toks, token_offset=15, finalize=False, streaming=True, cache=cache, seed=50,
                                **p))
    reqs.insert(0, ChunkRequest(tokens=torch.randint(0, 6561, (1, 160), generator=g), token_offset=0, finalize=True,
                                streaming=False, seed=60, **_prompt(g, 30)))
    return reqs


@pytest.fixture(scope="module")
def fp32_alone(models, load):
    """Each request run alone (fp32): the results every schedule must reproduce."""
    flow, hift = models
    runner = Token2WavRunner((flow, hift), "cpu", torch.float32, max_batch=1)
    return [runner.run_chunks([r], keep_mel=True)[0] for r in load]


def test_bf16_flow_holds_the_quality_gate_against_fp32(models, load, fp32_alone):
    flow, hift = models
    report = quality_gate(Token2WavRunner((flow, hift), "cpu", torch.bfloat16, max_batch=8), fp32_alone, load)
    assert report.passed, report.line()
    assert report.mel_rel_l2 > 1e-5    # bf16 really ran


def test_quality_gate_rejects_a_changed_mel(models, load, fp32_alone):
    flow, hift = models
    got = Token2WavRunner((flow, hift), "cpu", torch.float32, max_batch=8).run_chunks(load, keep_mel=True)
    assert compare(got, fp32_alone, FLOAT32_BOUNDS).passed
    got[2].mel = got[2].mel * 1.05
    report = compare(got, fp32_alone, BF16_BOUNDS)
    assert not report.passed and report.mel_rel_l2 > BF16_BOUNDS.mel_rel_l2_max
    with pytest.raises(ValueError, match="seed"):
        quality_gate(Token2WavRunner((flow, hift), "cpu"), fp32_alone,
                     [ChunkRequest(**{**{f: getattr(load[0], f) for f in ChunkRequest.__slots__}, "seed": None})])


def test_first_chunks_run_first_and_apart_from_a_long_offline_call(models, load, fp32_alone):
    flow, hift = models
    runner = Token2WavRunner((flow, hift), "cpu", torch.float32, max_batch=8)
    runner.pad_to_buckets = True          # the padding the graph path adds, under the budget
    groups = []
    got = runner.run_chunks(load, keep_mel=True, on_group=lambda idx, res, timing: groups.append((idx, timing)))
    kinds = [r.kind for r in load]
    assert kinds == ["offline", "first", "middle", "first", "first"]
    assert sorted(groups[0][0]) == [i for i, k in enumerate(kinds) if k == "first"]   # first chunks: own group, first
    assert 0 in groups[-1][0]                        # the long offline call last
    assert sorted(i for idx, _ in groups for i in idx) == list(range(len(load)))
    assert all(t.compute_ms > 0 and t.rows == len(idx) for idx, t in groups)
    assert groups[1][1].wait_ms >= groups[0][1].compute_ms * 0.9
    for g, w in zip(got, fp32_alone):
        torch.testing.assert_close(g.mel, w.mel, atol=ATOL, rtol=0)
        torch.testing.assert_close(g.waveform, w.waveform, atol=WAVE_ATOL, rtol=0)


def test_requests_that_fail_validation_are_reported_before_any_group_runs(models, load):
    flow, hift = models
    bad = ChunkRequest(**{**{f: getattr(load[1], f) for f in ChunkRequest.__slots__}, "token_offset": 5})
    seen = []
    Token2WavRunner((flow, hift), "cpu", max_batch=8).run_chunks(
        [load[1], bad], on_group=lambda idx, res, timing: seen.append((idx, [r.error for r in res], timing.rows)))
    assert seen[0][0] == [1] and "cache" in str(seen[0][1][0]) and seen[0][2] == 0
    assert seen[1][0] == [0] and seen[1][1] == [None]


def test_padding_budget_splits_and_merges_by_length(models, load):
    flow, hift = models
    plans = [Token2WavRunner((flow, hift), "cpu")._plan(i, r) for i, r in enumerate(load)]
    tight = Token2WavRunner((flow, hift), "cpu", max_batch=8, padding_budget=1.0)
    loose = Token2WavRunner((flow, hift), "cpu", max_batch=8, padding_budget=100.0)
    assert [len(g) for g in loose.schedule(plans)] == [3, 2]      # first chunks apart from the rest
    one_batch = Token2WavRunner((flow, hift), "cpu", max_batch=8, padding_budget=100.0, first_chunks_apart=False)
    assert [len(g) for g in one_batch.schedule(plans)] == [5]
    assert len(tight.schedule(plans)) == len({(p.t_enc, max(p.mel_frames, 8)) for p in plans})
    assert len(Token2WavRunner((flow, hift), "cpu", max_batch=2, padding_budget=100.0).schedule(plans)) == 3
    with pytest.raises(ValueError):
        Token2WavRunner((flow, hift), "cpu", padding_budget=0.5)


def test_compiled_step_is_one_dynamic_shape_compilation(models, load, fp32_alone, monkeypatch):
    flow, hift = models
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    runner = Token2WavRunner((flow, hift), "cpu", torch.float32, max_batch=8, compile_estimator=True)
    assert calls == [{"mode": None, "dynamic": True}] and runner.compile_mode == "default"
    Token2WavRunner((flow, hift), "cpu", compile_estimator=True, compile_mode="max-autotune-no-cudagraphs")
    assert calls[-1] == {"mode": "max-autotune-no-cudagraphs", "dynamic": True}
    with pytest.raises(ValueError, match="compile mode"):
        Token2WavRunner((flow, hift), "cpu", compile_estimator=True, compile_mode="reduce-overhead")
    assert Token2WavRunner((flow, hift), "cpu").compile_mode is None
    # capture_all without graphs runs the (compiled) flow once per token bucket, and results stay the same
    runner.graph_keys = lambda: ([(1, 48), (2, 64)], [])
    assert runner.capture_all() >= 0.0 and runner.graph_count == 0
    got = runner.run_chunks(load[1:3], keep_mel=True)
    for g, w in zip(got, fp32_alone[1:3]):
        torch.testing.assert_close(g.mel, w.mel, atol=ATOL, rtol=0)


def test_graph_buckets_cover_serving_lengths_within_the_pool_bound(models):
    flow, hift = models
    runner = Token2WavRunner((flow, hift), "cpu", max_batch=16)
    flow_keys, hift_keys = runner.graph_keys()
    assert {b for b, _ in flow_keys} == {1, 2, 4, 8, 16} == {b for b, _ in hift_keys}
    assert all(b * t <= MAX_GRAPH_TOKEN_ROWS for b, t in flow_keys)
    assert all(b * m <= MAX_GRAPH_MEL_ROWS for b, m in hift_keys)
    assert len(flow_keys) + len(hift_keys) <= 120
    # a first chunk with a 3-30 s prompt (75-750 tokens + 15) has a B=1 flow graph; 3-10 s prompts up to B=16
    assert all((1, bucket(p + 15, TOKEN_BUCKETS)) in flow_keys for p in (75, 250, 750))
    assert all((16, bucket(p + 15, TOKEN_BUCKETS)) in flow_keys for p in (75, 150, 250))
    # HiFT: first chunk (30 new frames), a 25-token hop (8 + 50), a 6 s offline call (300), at B=16
    assert all((16, bucket(m, MEL_FRAME_BUCKETS)) in hift_keys for m in (30, 58, 300))
    assert Token2WavRunner((flow, hift), "cpu", max_batch=6).graph_keys()[0][-1][0] == 6
