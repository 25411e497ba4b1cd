"""Token2WavEngine on the tiny random model: a padded mixed batch gives each request exactly its own
Token2Wav.chunk result (fp32, eager), whatever the order and company; caches stay per request."""
import pytest
import torch
from cosyvoice_tools.modelgen import random_flow_and_hift

from cosyvoice_common.constants import MEL_BINS, SAMPLES_PER_TOKEN, SPEAKER_EMBEDDING_DIM
from cosyvoice_token2wav.engine import Token2WavEngine
from cosyvoice_token2wav.sequence import ChunkRequest
from cosyvoice_token2wav.token2wav import Token2Wav

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")   # 2 shared CI cores

ATOL = 1e-4
# The waveform matches to ~1e-4..5e-4, not 1e-4: HiFT's phase is a float32 cumsum of F0 reaching ~1e5 rad over a
# second (ulp ~8e-3 rad), so 1e-6 rounding differences from another batch shape (in the mel, or in HiFT's own F0
# convs) grow ~100x along the chunk (the parity runner allows 5e-3 for speech). The mel is held to ATOL, and the
# padded HiFT on a short chunk to ATOL (test_padded_hift_matches_unpadded_hift).
WAVE_ATOL = 1e-3
PROMPT_TOKENS = 20






@pytest.fixture(scope="module")
def models():
    torch.backends.cudnn.allow_tf32 = False
    flow, hift = random_flow_and_hift()
    return flow, hift, Token2Wav(flow, hift)


def _prompt(g: torch.Generator, n_tokens: int = PROMPT_TOKENS):
    return dict(prompt_tokens=torch.randint(0, 6561, (1, n_tokens), generator=g),
                prompt_feat=torch.randn(1, 2 * n_tokens, MEL_BINS, generator=g) - 4.0,
                embedding=torch.randn(1, SPEAKER_EMBEDDING_DIM, generator=g))


@pytest.fixture(scope="module")
def mixed(models):
    """Three requests: a streaming first chunk (15 + 3 tokens), a middle chunk with a cache, an offline call;
    with their unbatched Token2Wav.chunk results."""
    _, _, t2w = models
    g = torch.Generator().manual_seed(5)
    a, b, c = _prompt(g), _prompt(g, 14), _prompt(g, 23)
    tok_a = torch.randint(0, 6561, (1, 18), generator=g)
    tok_b = torch.randint(0, 6561, (1, 46), generator=g)
    tok_c = torch.randint(0, 6561, (1, 37), generator=g)
    # b's first chunk makes the cache its middle chunk needs
    _, cache_b = t2w.chunk(tok_b[:, :18], token_offset=0, finalize=False, streaming=True, cache=None,
                           generator=torch.Generator().manual_seed(99), **b)
    reqs = [ChunkRequest(tokens=tok_a, token_offset=0, finalize=False, streaming=True, cache=None, seed=11, **a),
            ChunkRequest(tokens=tok_b, token_offset=15, finalize=False, streaming=True, cache=cache_b, seed=12, **b),
            ChunkRequest(tokens=tok_c, token_offset=0, finalize=True, streaming=False, cache=None, seed=13, **c)]
    want = []
    for r in reqs:
        wav, cache = t2w.chunk(r.tokens, r.prompt_tokens, r.prompt_feat, r.embedding, token_offset=r.token_offset,
                               finalize=r.finalize, streaming=r.streaming, cache=r.cache,
                               generator=torch.Generator().manual_seed(r.seed))
        mel = t2w.flow_mel(r.tokens, r.prompt_tokens, r.prompt_feat, r.embedding, streaming=r.streaming,
                           finalize=r.finalize)[:, :, 2 * r.token_offset:]
        want.append((wav, cache, mel))
    return reqs, want


def _check(got, want, request=None, t2w=None):
    wav, cache, mel = want
    assert got.error is None
    assert got.mel.shape == mel.shape
    torch.testing.assert_close(got.mel, mel, atol=ATOL, rtol=0)
    assert got.waveform.shape == wav.shape
    torch.testing.assert_close(got.waveform, wav, atol=WAVE_ATOL, rtol=0)
    if cache is None:
        assert got.cache is None
    else:
        for name in ("mel", "source", "speech"):
            g, w = getattr(got.cache, name), getattr(cache, name)
            assert g.shape == w.shape, name
            torch.testing.assert_close(g, w, atol=WAVE_ATOL if name != "mel" else ATOL, rtol=0)
    if t2w is not None:   # the padded HiFT + joining itself is exact: same mel in, same audio and cache out
        wav2, cache2 = t2w.vocode(got.mel, request.finalize, request.cache,
                                  generator=torch.Generator().manual_seed(request.seed))
        torch.testing.assert_close(got.waveform, wav2, atol=WAVE_ATOL, rtol=0)
        if cache2 is not None:
            for name in ("mel", "source", "speech"):
                torch.testing.assert_close(getattr(got.cache, name), getattr(cache2, name),
                                           atol=WAVE_ATOL if name != "mel" else ATOL, rtol=0)


def test_mixed_batch_matches_each_unbatched_chunk_call(models, mixed):
    flow, hift, t2w = models
    reqs, want = mixed
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=4)
    got = engine.run_chunks(reqs, keep_mel=True)
    for g, w, r in zip(got, want, reqs):
        _check(g, w, r, t2w)
    # first chunk of 15 + 3 tokens on a 20-token prompt: 15 tokens of audio less the withheld tail
    assert got[0].waveform.shape[1] == 15 * SAMPLES_PER_TOKEN - engine.config.source_cache_samples


def test_graph_bucket_padding_does_not_change_results(models, mixed):
    """What the CUDA-graph path adds: rows padded to the batch bucket (dummy rows); Euler-step windows padded to
    their block bucket; HiFT mel frames to theirs."""
    flow, hift, _ = models
    reqs, want = mixed
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=8)
    engine.runner.pad_to_buckets = True
    got = engine.run_chunks(reqs, keep_mel=True)     # 3 rows -> 4; mel frames -> bucket multiples
    for g, w in zip(got, want):
        _check(g, w)


def test_request_order_and_batch_split_do_not_change_results(models, mixed):
    flow, hift, _ = models
    reqs, want = mixed
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=2)
    order = [2, 0, 1]
    got = engine.run_chunks([reqs[i] for i in order], keep_mel=True)
    for g, i in zip(got, order):
        _check(g, want[i])


def test_caches_are_per_request_and_inputs_untouched(models, mixed):
    flow, hift, _ = models
    reqs, want = mixed
    before = reqs[1].cache.speech.clone()
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=4)
    got = engine.run_chunks(reqs)
    assert torch.equal(reqs[1].cache.speech, before)
    assert got[0].cache is not None and got[1].cache is not None and got[2].cache is None
    assert got[0].cache.speech.data_ptr() != got[1].cache.speech.data_ptr()
    assert not torch.allclose(got[0].cache.speech, got[1].cache.speech)


def test_invalid_request_fails_only_itself(models, mixed):
    flow, hift, _ = models
    reqs, want = mixed
    bad = ChunkRequest(tokens=reqs[0].tokens, prompt_tokens=reqs[0].prompt_tokens, prompt_feat=reqs[0].prompt_feat,
                       embedding=reqs[0].embedding, token_offset=5, finalize=False, streaming=True, cache=None)
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=4)
    got = engine.run_chunks([bad, reqs[2]], keep_mel=True)
    assert got[0].error is not None and "cache" in str(got[0].error)
    _check(got[1], want[2])


def test_padded_hift_matches_unpadded_hift(models):
    """Right padding (frames and batch rows) leaves a row's audio unchanged: masked convs, per-row STFT
    reflection, held phase, per-row iSTFT envelope; a cached row gets the source overwrite and cross-fade.
    F0 is made constant (150 Hz) so that the phase, a float32 cumsum that amplifies any rounding difference of
    another batch shape ~100x, is bit-identical and only the padding logic is under test."""
    import copy
    flow, hift, _ = models
    hift = copy.deepcopy(hift)
    with torch.no_grad():
        hift.f0_predictor.classifier.weight.zero_()
        hift.f0_predictor.classifier.bias.fill_(150.0)
    t2w = Token2Wav(flow, hift)
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    frames, pad = 22, 40
    mel = torch.randn(1, MEL_BINS, frames, generator=g) - 4.0
    spf = hift.cfg.samples_per_frame
    _, cache = t2w.vocode(torch.randn(1, MEL_BINS, 12, generator=g) - 4.0, False, None,
                          generator=torch.Generator().manual_seed(1))
    for with_cache in (False, True):
        c = cache if with_cache else None
        draws_gen = torch.Generator().manual_seed(3)
        m_in = mel if c is None else torch.cat([c.mel, mel], dim=2)
        n = m_in.size(2)
        want, _ = t2w.vocode(mel, True, c, generator=torch.Generator().manual_seed(3))
        d = hift.m_source.draw(1, n * spf, torch.device("cpu"), draws_gen)
        mk = n + pad
        hmel = torch.zeros(2, MEL_BINS, mk)
        hmel[0, :, :n] = m_in
        hmel[1] = torch.randn(MEL_BINS, mk, generator=g) - 4.0          # another, longer row
        noise = torch.randn(2, mk * spf, hift.cfg.n_harmonic_channels, generator=g)
        noise[0, :n * spf] = d.noise_randn[0]
        rand_ini = torch.rand(2, hift.cfg.n_harmonic_channels, generator=g)
        rand_ini[0] = d.rand_ini[0]
        rand_ini[:, 0] = 0
        k = engine.config.source_cache_samples
        c_src, c_sp = torch.zeros(2, k), torch.zeros(2, k)
        if c is not None:
            c_src[0], c_sp[0] = c.source.reshape(-1), c.speech.reshape(-1)
        frames_in = torch.tensor([[n], [mk]])
        cached = torch.tensor([[k if c is not None else 0], [0]])
        speech, _ = engine.runner._hift_joined(hmel, frames_in, c_src, cached, c_sp, rand_ini, noise)
        torch.testing.assert_close(speech[:1, :n * spf], want, atol=ATOL, rtol=0)


def test_speed_stretches_the_offline_mel_before_the_vocoder(models, mixed):
    """speed 2 (the reference's offline speed): half the mel frames, half the samples, and the audio is HiFT on the
    speed-1 flow mel interpolated linearly to int(F / 2) frames, with the same source noise; batched with other
    calls, the engine gives the same."""
    import torch.nn.functional as F
    flow, hift, t2w = models
    reqs, _ = mixed
    offline = reqs[2]
    args = (offline.tokens, offline.prompt_tokens, offline.prompt_feat, offline.embedding)
    normal = t2w.offline(*args, generator=torch.Generator().manual_seed(offline.seed))
    fast = t2w.offline(*args, generator=torch.Generator().manual_seed(offline.seed), speed=2.0)
    frames = 2 * offline.tokens.size(1)
    assert normal.shape[1] == frames * hift.cfg.samples_per_frame
    assert fast.shape[1] == (frames // 2) * hift.cfg.samples_per_frame
    mel = t2w.flow_mel(*args, streaming=False, finalize=True)
    stretched = F.interpolate(mel, size=frames // 2, mode="linear")
    want, _ = t2w.vocode(stretched, True, None, generator=torch.Generator().manual_seed(offline.seed))
    torch.testing.assert_close(fast, want, atol=0, rtol=0)

    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=4)
    slow = ChunkRequest(tokens=offline.tokens, prompt_tokens=offline.prompt_tokens, prompt_feat=offline.prompt_feat,
                        embedding=offline.embedding, seed=offline.seed, speed=0.5)
    quick = ChunkRequest(tokens=offline.tokens, prompt_tokens=offline.prompt_tokens, prompt_feat=offline.prompt_feat,
                         embedding=offline.embedding, seed=offline.seed, speed=2.0)
    got = engine.run_chunks([reqs[0], quick, slow, reqs[1]])
    assert all(g.error is None for g in got)
    torch.testing.assert_close(got[1].waveform, fast, atol=WAVE_ATOL, rtol=0)
    assert got[2].waveform.shape[1] == 2 * frames * hift.cfg.samples_per_frame
    want_slow = t2w.offline(*args, generator=torch.Generator().manual_seed(offline.seed), speed=0.5)
    torch.testing.assert_close(got[2].waveform, want_slow, atol=WAVE_ATOL, rtol=0)


def test_speed_is_refused_on_streaming_chunks_and_outside_its_range(models, mixed):
    flow, hift, _ = models
    reqs, want = mixed
    first, _, offline = reqs
    streamed = ChunkRequest(tokens=first.tokens, prompt_tokens=first.prompt_tokens, prompt_feat=first.prompt_feat,
                            embedding=first.embedding, finalize=False, streaming=True, speed=1.5)
    absurd = ChunkRequest(tokens=offline.tokens, prompt_tokens=offline.prompt_tokens, prompt_feat=offline.prompt_feat,
                          embedding=offline.embedding, speed=0.001)
    engine = Token2WavEngine((flow, hift), "cpu", torch.float32, max_batch=4)
    got = engine.run_chunks([streamed, absurd, offline], keep_mel=True)
    assert "offline" in str(got[0].error)
    assert "outside [0.5, 2.0]" in str(got[1].error)
    _check(got[2], want[2])
