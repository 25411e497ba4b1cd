"""The state cache is exact: a stream's chunks with the cache on equal the same chunks recomputed from the whole
prefix (the reference's way), for our chunk schedule and the seed's fixed hop, prompts on and off the block grid,
after a prompt prefill, with pages evicted mid-stream, and with streams of different lengths batched together.

Bounds (fp32, CPU): the mel of every chunk within 1e-4 (the cache changes only the order of float sums; seen:
~2e-6). The waveform within WAVE_ATOL: HiFT's sine source integrates F0 in a float32 cumulative sum (~1e5 rad over
a second, ulp ~8e-3 rad), so mel rounding differences show as a small phase drift (seen: up to ~5e-4); a wrong
state gives differences of order one (the last test shows one)."""
import pytest
import torch
from cosyvoice_tools.modelgen import random_flow_and_hift

from cosyvoice_common.constants import MEL_BINS, SPEAKER_EMBEDDING_DIM
from cosyvoice_gateway.schedule import ScheduleConfig, plan
from cosyvoice_token2wav.engine import Token2WavEngine
from cosyvoice_token2wav.sequence import ChunkRequest

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")   # 2 shared CI cores

MEL_ATOL = 1e-4
WAVE_ATOL = 2e-3
SEED_FIXED_HOP = ScheduleConfig(first_hop_tokens=15, hop_tokens=15, max_hop_tokens=15, growth_factor=1)
CACHE_BYTES = 1 << 30


@pytest.fixture(scope="module")
def models():
    torch.backends.cudnn.allow_tf32 = False
    return random_flow_and_hift()


def _voice(seed: int, n_prompt: int):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_tokens=torch.randint(0, 6561, (1, n_prompt), generator=g),
                prompt_feat=torch.randn(1, 2 * n_prompt, MEL_BINS, generator=g) - 4.0,
                embedding=torch.randn(1, SPEAKER_EMBEDDING_DIM, generator=g))


def _tokens(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 6561, (1, n), generator=torch.Generator().manual_seed(seed + 1000))


class Stream:
    """One stream's chunk calls, made one at a time as the gateway makes them (each carries the previous answer's
    vocoder cache)."""

    def __init__(self, voice: dict, tokens: torch.Tensor, schedule: ScheduleConfig = ScheduleConfig(), seed: int = 7):
        self.voice, self.tokens, self.seed = voice, tokens, seed
        self.chunks = plan(tokens.size(1), schedule)
        self.next = 0
        self.cache = None
        self.results = []

    @property
    def done(self) -> bool:
        return self.next == len(self.chunks)

    def request(self) -> ChunkRequest:
        c = self.chunks[self.next]
        return ChunkRequest(tokens=self.tokens[:, :c.end], token_offset=c.token_offset, finalize=c.finalize,
                            streaming=not c.finalize, cache=self.cache, seed=self.seed + c.index, **self.voice)

    def take(self, result) -> None:
        assert result.error is None, result.error
        self.results.append(result)
        self.cache = result.cache
        self.next += 1


def prefill(voice: dict) -> ChunkRequest:
    return ChunkRequest(tokens=torch.zeros(1, 0, dtype=torch.long), prefill=True, finalize=False, streaming=True,
                        **voice)


def run_streams(engine: Token2WavEngine, streams: list[Stream], prefills: list[ChunkRequest] = ()) -> list[Stream]:
    """All streams advanced together: each round submits every unfinished stream's next chunk at once."""
    for r in engine.run_chunks(list(prefills)):
        assert r.error is None and r.waveform.numel() == 0
    while not all(s.done for s in streams):
        live = [s for s in streams if not s.done]
        for s, result in zip(live, engine.run_chunks([s.request() for s in live], keep_mel=True)):
            s.take(result)
    return streams


def assert_same_audio(got: Stream, want: Stream) -> None:
    assert len(got.results) == len(want.results)
    for g, w in zip(got.results, want.results):
        assert g.mel.shape == w.mel.shape and g.waveform.shape == w.waveform.shape
        torch.testing.assert_close(g.mel, w.mel, atol=MEL_ATOL, rtol=0)
        torch.testing.assert_close(g.waveform, w.waveform, atol=WAVE_ATOL, rtol=0)


def recomputed(models, voice, tokens, schedule=ScheduleConfig()) -> Stream:
    """The reference's way: every call computes its whole prefix (state cache off)."""
    return run_streams(Token2WavEngine(models, "cpu", torch.float32), [Stream(voice, tokens, schedule)])[0]


@pytest.mark.parametrize("n_prompt", [50, 61], ids=["prompt-on-grid", "prompt-off-grid"])
@pytest.mark.parametrize("schedule", [ScheduleConfig(), SEED_FIXED_HOP], ids=["our-schedule", "seed-fixed-hop"])
def test_a_stream_with_the_state_cache_equals_full_recompute(models, n_prompt, schedule):
    voice, tokens = _voice(n_prompt, n_prompt), _tokens(n_prompt, 140)
    want = recomputed(models, voice, tokens, schedule)
    engine = Token2WavEngine(models, "cpu", torch.float32, cache_bytes=CACHE_BYTES)
    got = run_streams(engine, [Stream(voice, tokens, schedule)])[0]
    assert_same_audio(got, want)
    assert engine.frames_reused > 0 and engine.frames_computed < sum(
        2 * (n_prompt + c.end - (0 if c.finalize else 3)) for c in got.chunks)
    engine.cache.check()


def test_a_prefill_computes_the_prompt_blocks_and_the_first_chunk_only_its_own_frames(models):
    n_prompt = 61                       # 58 tokens with real look-ahead: blocks of 25 tokens -> 2 complete
    voice, tokens = _voice(3, n_prompt), _tokens(3, 120)
    want = recomputed(models, voice, tokens)
    engine = Token2WavEngine(models, "cpu", torch.float32, cache_bytes=CACHE_BYTES)
    (r,) = engine.run_chunks([prefill(voice)])
    assert r.error is None and r.waveform.numel() == 0 and r.cache is None
    assert engine.frames_computed == 2 * 50 and engine.frames_reused == 0
    stream = Stream(voice, tokens)
    (first,) = engine.run_chunks([stream.request()], keep_mel=True)
    # the first chunk (15 + 3 tokens): frames from the prompt's last complete block on
    assert engine.frames_reused == 100 and engine.frames_computed == 100 + 2 * (n_prompt + 15) - 100
    stream.take(first)
    run_streams(engine, [stream])
    assert_same_audio(stream, want)
    (again,) = engine.run_chunks([prefill(voice)])          # everything cached: nothing computed
    computed = engine.frames_computed
    assert again.error is None and engine.frames_computed == computed


def test_a_prefill_with_the_state_cache_off_is_answered_at_once_and_computes_nothing(models):
    engine = Token2WavEngine(models, "cpu", torch.float32)
    (r,) = engine.run_chunks([prefill(_voice(4, 61))])
    assert r.error is None and r.waveform.numel() == 0 and engine.frames_computed == 0


def test_a_voice_s_prompt_blocks_serve_every_stream_with_that_voice_and_no_other(models):
    voice, other = _voice(5, 75), _voice(6, 75)
    engine = Token2WavEngine(models, "cpu", torch.float32, cache_bytes=CACHE_BYTES)
    run_streams(engine, [], [prefill(voice)])
    reused = engine.frames_reused
    a = Stream(voice, _tokens(7, 60))
    engine.run_chunks([a.request()], keep_mel=True)
    assert engine.frames_reused - reused == 2 * 50           # (75 - 3) // 25 = 2 complete prompt blocks
    reused = engine.frames_reused
    b = Stream(other, _tokens(7, 60))                        # same tokens, another speaker: nothing to reuse
    engine.run_chunks([b.request()], keep_mel=True)
    assert engine.frames_reused == reused


@pytest.mark.parametrize("buckets", [False, True], ids=["exact-sizes", "graph-buckets"])
def test_streams_of_different_lengths_batched_together_equal_each_alone(models, buckets):
    """graph-buckets: padded as the CUDA graphs are (rows to a power of two, window and cached blocks to their
    buckets: padding rows, masked blocks, writes of blocks not kept to the trash page)."""
    specs = [(11, 40, 90), (12, 61, 150), (13, 75, 60)]
    voices = {seed: _voice(seed, n) for seed, n, _ in specs}
    wants = [recomputed(models, voices[seed], _tokens(seed, n_tok)) for seed, _, n_tok in specs]
    engine = Token2WavEngine(models, "cpu", torch.float32, cache_bytes=CACHE_BYTES, max_batch=4)
    engine.runner.pad_to_buckets = buckets
    streams = [Stream(voices[seed], _tokens(seed, n_tok)) for seed, _, n_tok in specs]
    run_streams(engine, streams, [prefill(voices[seed]) for seed, _, _ in specs[:2]])
    for got, want in zip(streams, wants):
        assert_same_audio(got, want)
    engine.cache.check()


def test_pages_evicted_mid_stream_are_recomputed_with_the_same_output(models):
    voice_a, voice_b = _voice(21, 61), _voice(22, 70)
    want_a = recomputed(models, voice_a, _tokens(21, 130))
    want_b = recomputed(models, voice_b, _tokens(22, 130))
    engine = Token2WavEngine(models, "cpu", torch.float32)
    engine = Token2WavEngine(models, "cpu", torch.float32, cache_bytes=4 * engine.cache.layout.page_bytes)
    assert engine.cache.n_pages == 4
    a, b = Stream(voice_a, _tokens(21, 130)), Stream(voice_b, _tokens(22, 130))
    # interleaved one call at a time: each stream's pages push the other's out of the 4-page pool
    while not (a.done and b.done):
        for s in (a, b):
            if not s.done:
                (r,) = engine.run_chunks([s.request()], keep_mel=True)
                s.take(r)
    assert engine.cache.evictions > 0
    assert_same_audio(a, want_a)
    assert_same_audio(b, want_b)
    engine.cache.check()


def test_bf16_with_the_state_cache_holds_the_quality_gate_against_fp32_recompute(models):
    from cosyvoice_token2wav.quality import BF16_BOUNDS, compare

    voice, tokens = _voice(31, 61), _tokens(31, 120)
    want = recomputed(models, voice, tokens)
    got = run_streams(Token2WavEngine(models, "cpu", torch.bfloat16, cache_bytes=CACHE_BYTES),
                      [Stream(voice, tokens)], [prefill(voice)])[0]
    report = compare(got.results, want.results, BF16_BOUNDS)
    assert report.passed, report.line()


def test_a_wrong_state_is_not_subtle(models):
    """What the bounds above rule out: reading another prompt's blocks changes the audio by order one."""
    voice, tokens = _voice(41, 61), _tokens(41, 60)
    want = recomputed(models, voice, tokens)
    engine = Token2WavEngine(models, "cpu", torch.float32, cache_bytes=CACHE_BYTES)
    run_streams(engine, [], [prefill(_voice(42, 61))])
    wrong_keys = list(engine.cache._valid)
    stream = Stream(voice, tokens)
    seq_hashes = []
    original = engine.scheduler._reserve

    def reserve_with_the_other_voice(seq):        # as if the keys ignored the prompt
        seq.block_hashes = wrong_keys + [b"x" * 16] * 8
        seq_hashes.append(seq)
        return original(seq)
    engine.scheduler._reserve = reserve_with_the_other_voice
    (r,) = engine.run_chunks([stream.request()], keep_mel=True)
    assert seq_hashes and (r.mel - want.results[0].mel).abs().max() > 0.1


def test_a_first_chunk_follows_its_running_prefill_one_step_behind(models):
    """The first chunk arrives while its prompt's prefill is still running: it joins at once, reads each Euler
    step's keys and values of the prompt blocks after the prefill wrote them, and computes none of them again."""
    n_prompt = 61
    voice, tokens = _voice(51, n_prompt), _tokens(51, 60)
    want = recomputed(models, voice, tokens)
    engine = Token2WavEngine(models, "cpu", torch.float32, cache_bytes=CACHE_BYTES)
    answered = {}
    engine.submit(prefill(voice), lambda r, s: answered.setdefault("prefill", (r, s)))
    engine.step()
    engine.step()                                    # the prefill is two steps in
    stream = Stream(voice, tokens)
    engine.submit(stream.request(), lambda r, s: answered.setdefault("first", (r, s)), keep_mel=True)
    engine.step()                                    # admitted: following, not waiting
    (first,) = [s for s in engine.scheduler.running if s.kind == "first"]
    assert first.leader is not None and first.leader.kind == "prefill" and first.cached_blocks == 2
    while "first" not in answered:
        engine.step()
        assert first.leader is None or first.leader.step > first.step
    assert "prefill" in answered and answered["prefill"][1].frames_computed == 100
    result, stats = answered["first"]
    assert stats.frames_reused == 100 and stats.frames_computed == 2 * (n_prompt + 15) - 100
    stream.take(result)
    run_streams(engine, [stream])
    assert_same_audio(stream, want)
    engine.cache.check()


def test_a_failed_writer_fails_its_followers_and_frees_its_pages(models):
    voice, tokens = _voice(52, 61), _tokens(52, 40)
    engine = Token2WavEngine(models, "cpu", torch.float32, cache_bytes=CACHE_BYTES)
    answered = {}
    engine.submit(prefill(voice), lambda r, s: answered.setdefault("prefill", r))
    engine.step()
    engine.submit(Stream(voice, tokens).request(), lambda r, s: answered.setdefault("first", r))
    engine.step()
    (leader,) = [s for s in engine.scheduler.running if s.kind == "prefill"]
    assert leader.followers
    engine._answer_error(leader, RuntimeError("a device fault"))
    assert "a device fault" in str(answered["prefill"].error) and "a device fault" in str(answered["first"].error)
    assert engine.scheduler.is_idle() and engine.cache.bytes_held == 0
    engine.cache.check()
