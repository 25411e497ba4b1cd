"""What the serving engine changes and what it must not: bf16 holds the quality gate against fp32; urgent calls
(prompt prefills, first chunks) run first and apart from long calls without changing any result; a first chunk
that arrives during a long call waits for at most one Euler step of it; refusals are per call; the waiting queue
is bounded; HiFT's graph buckets cover serving lengths within the pool bound."""
import threading

import pytest
import torch
from cosyvoice_tools.modelgen import random_flow_and_hift

from cosyvoice_common.constants import MEL_BINS, SPEAKER_EMBEDDING_DIM
from cosyvoice_token2wav.engine import EngineFullError, Token2WavEngine
from cosyvoice_token2wav.model_runner import MAX_GRAPH_MEL_ROWS, MEL_FRAME_BUCKETS, bucket
from cosyvoice_token2wav.quality import BF16_BOUNDS, FLOAT32_BOUNDS, compare, quality_gate
from cosyvoice_token2wav.scheduler import Scheduler, SchedulerConfig
from cosyvoice_token2wav.sequence import ChunkRequest, Sequence, plan_sequence
from cosyvoice_token2wav.token2wav import Token2Wav

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")   # 2 shared CI cores

ATOL = 1e-4
# 5e-3 as the parity runner: the 6.4 s offline call's float32 phase cumsum grows the rounding difference of
# another batch shape along the call
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
    """A mixed load: a long offline call, three first chunks (short prompts), a middle chunk."""
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
    """Each request run alone (fp32, no state cache): the results every schedule must reproduce."""
    flow, hift = models
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=1)
    return [engine.run_chunks([r], keep_mel=True)[0] for r in load]


def test_bf16_flow_holds_the_quality_gate_against_fp32(models, load, fp32_alone):
    flow, hift = models
    report = quality_gate(Token2WavEngine((flow, hift), "cpu", torch.bfloat16, max_batch=8, cache_bytes=1 << 30),
                          fp32_alone, load)
    assert report.passed, report.line()
    assert report.mel_rel_l2 > 1e-5    # bf16 really ran


def test_quality_gate_rejects_a_changed_mel(models, load, fp32_alone):
    flow, hift = models
    got = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=8).run_chunks(load, keep_mel=True)
    assert compare(got, fp32_alone, FLOAT32_BOUNDS).passed
    got[2].mel = got[2].mel * 1.05
    report = compare(got, fp32_alone, BF16_BOUNDS)
    assert not report.passed and report.mel_rel_l2 > BF16_BOUNDS.mel_rel_l2_max
    with pytest.raises(ValueError, match="seed"):
        quality_gate(Token2WavEngine((flow, hift), "cpu"), fp32_alone,
                     [ChunkRequest(**{**{f: getattr(load[0], f) for f in ChunkRequest.__slots__}, "seed": None})])


def test_first_chunks_are_answered_before_a_long_offline_call_with_the_same_results(models, load, fp32_alone):
    flow, hift = models
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=8)
    engine.runner.pad_to_buckets = True          # the HiFT padding the graph path adds
    order = []
    results = [None] * len(load)

    def on_done(i):
        def done(result, stats):
            order.append(stats.kind)
            results[i] = result
        return done
    for i, r in enumerate(load):
        engine.submit(r, on_done(i), keep_mel=True)
    while any(r is None for r in results):
        engine.step()
    assert [r.kind for r in load] == ["offline", "first", "middle", "first", "first"]
    assert order[:3] == ["first"] * 3 and sorted(order[3:]) == ["middle", "offline"]
    for g, w in zip(results, fp32_alone):
        torch.testing.assert_close(g.mel, w.mel, atol=ATOL, rtol=0)
        torch.testing.assert_close(g.waveform, w.waveform, atol=WAVE_ATOL, rtol=0)


@pytest.mark.parametrize("later_max_wait_s", [float("inf"), 0.0])
def test_a_first_chunk_arriving_during_a_long_call_waits_for_at_most_one_step(models, load, later_max_wait_s):
    """Iteration-level batching: the first chunk joins between Euler steps and finishes in its own n_steps
    iterations, while the offline call that was already running is still running. The offline call sits out those
    steps for at most `later_max_wait_s` at a time: with no bound it waits for the first chunk, with 0 it steps
    beside it every iteration."""
    flow, hift = models
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=8, later_max_wait_s=later_max_wait_s)
    answered = {}
    engine.submit(load[0], lambda r, s: answered.setdefault("offline", (r, s)))
    engine.step()                     # admitted, encoded, first step
    engine.step()
    steps_before = engine.scheduler.running[0].step
    engine.submit(load[1], lambda r, s: answered.setdefault("first", (r, s)))
    iterations = 0
    while "first" not in answered:
        engine.step()
        iterations += 1
    assert iterations == engine.runner.n_steps      # admitted at once, one step per iteration
    if later_max_wait_s == float("inf"):           # the long call is still running and sat out every step
        assert "offline" not in answered and engine.scheduler.running[0].step == steps_before
    else:                                          # it stepped beside the first chunk and finished its steps
        assert "offline" in answered
    result, stats = answered["first"]
    assert result.error is None and stats.kind == "first" and stats.frames_computed > 0
    while "offline" not in answered:
        engine.step()
    assert answered["offline"][0].error is None


def test_later_calls_sit_out_urgent_steps_for_at_most_the_bound(models, load):
    """step_groups: with urgent work running, a later call's group steps only once it has sat out
    `later_max_wait_s` since its last step; with no urgent work, every group steps."""
    flow, hift = models
    engine = Token2WavEngine((flow, hift), "cpu")
    runner = engine.runner
    seqs = [Sequence(r, plan_sequence(r, runner.lookahead, runner.ratio, runner.flow.cfg.vocab_size, engine.config,
                                      runner.block_tokens), None) for r in load]
    for s in seqs:
        s.last_step_s = 10.0
    sched = Scheduler(SchedulerConfig(max_batch=8, padding_budget=100.0, later_max_wait_s=0.1), engine.cache,
                      runner.block_frames, engine._cacheable)
    kinds = lambda groups: sorted(s.kind for g in groups for s in g)    # noqa: E731
    assert kinds(sched.step_groups(seqs, now=10.05)) == ["first"] * 3
    assert kinds(sched.step_groups(seqs, now=10.2)) == sorted(s.kind for s in seqs)
    later = [s for s in seqs if not s.urgent]
    assert kinds(sched.step_groups(later, now=10.0)) == sorted(s.kind for s in later)
    with pytest.raises(ValueError):
        SchedulerConfig(later_max_wait_s=-1.0)


def test_requests_that_fail_validation_are_answered_at_once_and_alone(models, load):
    flow, hift = models
    bad = ChunkRequest(**{**{f: getattr(load[1], f) for f in ChunkRequest.__slots__}, "token_offset": 5})
    engine = Token2WavEngine((flow, hift), "cpu", max_batch=8)
    seen = []
    engine.submit(bad, lambda r, s: seen.append(r))
    assert len(seen) == 1 and "cache" in str(seen[0].error)     # before any step ran
    got = engine.run_chunks([load[1], bad])
    assert got[0].error is None and "cache" in str(got[1].error)


def test_the_waiting_queue_is_bounded_and_refuses_with_a_clear_error(models, load):
    flow, hift = models
    engine = Token2WavEngine((flow, hift), "cpu", max_batch=1, max_running=1, max_waiting=1)
    got = engine.run_chunks([load[1], load[2], load[3]])
    errors = [r.error for r in got]
    assert errors[0] is None
    assert any(isinstance(e, EngineFullError) and "queue is full" in str(e) for e in errors[1:])


def test_the_engine_thread_answers_submissions_from_other_threads(models, load, fp32_alone):
    flow, hift = models
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=8).start()
    try:
        results = {}
        done = threading.Event()

        def on_done(i):
            def answer(result, stats):
                results[i] = result
                if len(results) == 3:
                    done.set()
            return answer
        threads = [threading.Thread(target=engine.submit, args=(load[i], on_done(i))) for i in (1, 2, 3)]
        for t in threads:
            t.start()
        assert done.wait(120)
    finally:
        engine.stop()
    for i in (1, 2, 3):
        torch.testing.assert_close(results[i].mel if results[i].mel is not None else fp32_alone[i].mel,
                                   fp32_alone[i].mel, atol=ATOL, rtol=0)
        torch.testing.assert_close(results[i].waveform, fp32_alone[i].waveform, atol=WAVE_ATOL, rtol=0)


def test_padding_budget_splits_and_merges_by_length(models, load):
    flow, hift = models
    engine = Token2WavEngine((flow, hift), "cpu")
    runner = engine.runner
    seqs = [Sequence(r, plan_sequence(r, runner.lookahead, runner.ratio, runner.flow.cfg.vocab_size, engine.config,
                                      runner.block_tokens), None) for r in load]

    def groups(**kw):
        return Scheduler(SchedulerConfig(**{"max_batch": 8, **kw}), engine.cache, runner.block_frames,
                         engine._cacheable).groups(seqs)
    assert [len(g) for g in groups(padding_budget=100.0)] == [3, 2]      # urgent (first chunks) apart, first
    assert [len(g) for g in groups(padding_budget=100.0, urgent_apart=False)] == [5]
    tight = groups(padding_budget=1.0)
    assert all(len({s.window_frames(runner.block_frames) for s in g}) == 1 for g in tight)
    assert len(groups(max_batch=2, max_running=2, padding_budget=100.0)) == 3
    with pytest.raises(ValueError):
        SchedulerConfig(padding_budget=0.5)


def test_hift_graph_buckets_cover_serving_lengths_within_the_pool_bound(models):
    flow, hift = models
    keys = Token2WavEngine((flow, hift), "cpu", max_batch=16).runner.hift_graph_keys()
    assert {b for b, _ in keys} == {1, 2, 4, 8, 16}
    assert all(b * m <= MAX_GRAPH_MEL_ROWS for b, m in keys)
    assert len(keys) <= 60
    # HiFT: first chunk (30 new frames), a 25-token hop (8 + 50), a 6 s offline call (300), at B=16
    assert all((16, bucket(m, MEL_FRAME_BUCKETS)) in keys for m in (30, 58, 300))


def test_euler_step_graph_buckets_cover_streaming_chunks_within_the_pool_bound(models):
    from cosyvoice_token2wav.model_runner import MAX_GRAPH_STEP_ROW_FRAMES

    flow, hift = models
    runner = Token2WavEngine((flow, hift), "cpu", max_batch=16, cache_bytes=1 << 30).runner
    keys = set(runner.step_graph_keys())
    assert {b for b, _, _ in keys} == {1, 2, 4, 8, 16}
    assert all(b * (w + p) * runner.block_frames <= MAX_GRAPH_STEP_ROW_FRAMES for b, w, p in keys)
    assert len(keys) <= 260
    # first chunks (window 2-3 blocks) over a 3-10 s prompt (4-15 blocks cached) at B=1..16, and a 30 s prompt at B=1
    for b in (1, 5, 16):
        for window, cached in ((2, 4), (3, 15), (4, 6)):
            assert runner.step_graph_key(b, window, cached) in keys
    assert runner.step_graph_key(1, 3, 30) in keys
    # a final chunk's or offline call's whole window (no cached blocks), up to 32 blocks, at the batches that fit
    assert runner.step_graph_key(1, 14, 0) == (1, 16, 0) and runner.step_graph_key(4, 30, 0) == (4, 32, 0)
    assert runner.step_graph_key(16, 32, 0) == (16, 32, 0) and runner.step_graph_key(1, 33, 0) is None
    assert runner.step_graph_key(1, 12, 4) is None          # a long window over cached blocks: eager
    assert all(runner.step_graph_key(*k) == k for k in keys)
    no_cache = Token2WavEngine((flow, hift), "cpu", max_batch=16).runner
    assert {p for _, _, p in no_cache.step_graph_keys()} == {0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_of_steps_and_hift_give_the_eager_results(models, load):
    """On a GPU: every Euler-step and HiFT graph captured at start-up, then the mixed load and a stream with the
    state cache through the graphs equal the same engine run eagerly (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    flow, hift = models
    graphed = Token2WavEngine((flow, hift), "cuda", torch.float32, max_batch=8, cache_bytes=1 << 30,
                              use_cuda_graphs=True)
    graphed.capture_graphs()
    eager = Token2WavEngine((flow, hift), "cuda", torch.float32, max_batch=8, cache_bytes=1 << 30)
    assert len(graphed.runner._step_graphs) > 0 and len(graphed.runner._hift_graphs) > 0
    g = torch.Generator().manual_seed(23)   # + an offline call of 13 blocks: a no-cache window past the stream buckets
    long_call = ChunkRequest(tokens=torch.randint(0, 6561, (1, 300), generator=g), token_offset=0, finalize=True,
                             streaming=False, seed=61, **_prompt(g, 20))
    assert graphed.runner.step_graph_key(1, 13, 0) == (1, 16, 0)
    calls = [*load, long_call]
    for got, want in zip(graphed.run_chunks(calls, keep_mel=True), eager.run_chunks(calls, keep_mel=True)):
        torch.testing.assert_close(got.mel, want.mel, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.waveform, want.waveform, atol=WAVE_ATOL, rtol=0)
