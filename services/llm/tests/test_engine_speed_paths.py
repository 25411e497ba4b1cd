"""The engine's speed paths (batched and bucketed prefill, kv-length buckets, fused projections, host/device
overlap, the compiled step) give the same tokens as the plain engine, with requests joining and leaving mid-run."""

import pytest
import torch

from cosyvoice_common.constants import FLAT_SOS_ID
from cosyvoice_llm.engine import EngineConfig, FinishReason, LLMEngine, LLMRequest
from cosyvoice_llm.model import Qwen2LM, build_prompt_flat_ids
from cosyvoice_llm.sampling import SamplingParams

GREEDY = SamplingParams.greedy()
RAS = SamplingParams(top_p=0.9, top_k=50, win_size=10, tau_r=0.1)
PLAIN = dict(fuse_projections=False, batched_prefill=False, kv_buckets=(64,))


def _prompts(n: int) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        text = torch.randint(0, 97, (2 + 3 * i % 11,), generator=gen).tolist()
        speech = torch.randint(0, 6561, (i % 4 * 3,), generator=gen).tolist()
        out.append(tuple(build_prompt_flat_ids(text, [], speech)))
    return out


_PLAIN_RESULTS: dict[str, dict] = {}


def _plain_run(model: Qwen2LM, sampling: SamplingParams) -> dict:
    """The plain engine's results (the tiny model is the same seeded model in every test)."""
    key = repr(sampling)
    if key not in _PLAIN_RESULTS:
        _PLAIN_RESULTS[key] = _scripted_run(model, sampling, **PLAIN)
    return _PLAIN_RESULTS[key]


def _scripted_run(model: Qwen2LM, sampling: SamplingParams, **cfg) -> dict[str, tuple[list[int], FinishReason]]:
    """6 requests over 3 slots: two join at step 0, three more at step 3, one more at step 7; one cancelled at
    step 5 (while running) and one cancelled while waiting. Returns tokens and finish reason per request."""
    engine = LLMEngine(model, EngineConfig(max_batch_slots=3, max_seq_len=64, **cfg))
    prompts = _prompts(7)
    lengths = [9, 30, 5, 14, 20, 11, 6]
    handles = {}

    def submit(i: int) -> None:
        handles[f"r{i}"] = engine.submit(LLMRequest(f"r{i}", prompts[i], max_new_tokens=lengths[i],
                                                    min_new_tokens=lengths[i], sampling=sampling, seed=100 + i))

    for step in range(400):
        if step == 0:
            submit(0), submit(1)
        if step == 3:
            submit(2), submit(3), submit(4)
        if step == 5:
            engine.cancel("r1")
        if step == 7:
            submit(5), submit(6)
            engine.cancel("r6")
        if step > 7 and not engine.has_work():
            break
        engine.step()
    assert engine.num_free_slots == 3 and not engine.has_work()
    out = {}
    for rid, h in handles.items():
        toks = h.result(timeout_s=0)
        out[rid] = (toks, h.finish_reason)
    return out


@pytest.mark.parametrize("variant", [
    dict(),                                                   # all defaults: fused, batched prefill, kv buckets
    dict(kv_buckets=(8, 16, 32)),                             # crosses several kv buckets while decoding
    dict(kv_buckets=(16,), max_prefill_tokens=20),            # admission split over several prefill forwards
    dict(fuse_projections=False, kv_buckets=(8, 24)),
    dict(batched_prefill=False, kv_buckets=(8, 16, 32)),
])
@pytest.mark.parametrize("sampling", [GREEDY, RAS], ids=["greedy", "ras"])
def test_speed_paths_give_the_plain_engines_tokens_with_joins_and_cancels(tiny_model: Qwen2LM, variant,
                                                                          sampling):
    want = _plain_run(tiny_model, sampling)
    got = _scripted_run(tiny_model, sampling, **variant)
    assert got == want
    assert want["r1"][1] is FinishReason.CANCELLED and 0 < len(want["r1"][0]) < 30
    assert want["r6"] == ([], FinishReason.CANCELLED)
    assert all(want[f"r{i}"][1] is FinishReason.LENGTH for i in (0, 2, 3, 4, 5))


def test_cancel_frees_the_slot_for_the_next_batched_admission(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, EngineConfig(max_batch_slots=2, max_seq_len=64, kv_buckets=(16,)))
    prompts = _prompts(3)
    hs = [engine.submit(LLMRequest(f"c{i}", p, max_new_tokens=40, min_new_tokens=40, sampling=GREEDY))
          for i, p in enumerate(prompts)]
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    engine.cancel("c0")
    engine.step()   # c0's slot is freed, then c2 is prefilled into it in the same step
    assert engine.num_running == 2 and engine.num_waiting == 0
    assert engine._running[0].request.request_id == "c2"
    engine.cancel("c1")
    engine.cancel("c2")
    engine.step()
    assert engine.num_free_slots == 2 and not engine.has_work()
    for h in hs:
        assert 0 < len(h.result(timeout_s=0)) < 40 and h.finish_reason is FinishReason.CANCELLED


def test_kv_bucket_covers_every_running_position(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, EngineConfig(max_batch_slots=2, max_seq_len=64, kv_buckets=(8, 16)))
    assert engine.config.kv_lens == (8, 16, 64)
    seen = []
    real = engine._step_fn

    def spy(n, kv_len):
        need = max(s.next_position for s in engine._running.values()) + 1
        seen.append((need, kv_len))
        return real(n, kv_len)

    engine._step_fn = spy
    h = engine.submit(LLMRequest("k", _prompts(1)[0], max_new_tokens=20, min_new_tokens=20, sampling=GREEDY))
    while engine.has_work():
        engine.step()
    assert len(h.result(timeout_s=0)) == 20
    assert all(need <= kv for need, kv in seen)
    assert {kv for _, kv in seen} == {8, 16, 64}
    assert all(kv == min(b for b in (8, 16, 64) if b >= need) for need, kv in seen)


def test_default_kv_buckets_double_from_128_to_max_seq_len():
    assert EngineConfig(max_seq_len=1000).kv_lens == (128, 256, 512, 1000)
    assert EngineConfig(max_seq_len=64).kv_lens == (64,)
    with pytest.raises(ValueError, match="kv_buckets"):
        EngineConfig(max_seq_len=64, kv_buckets=(128,))
    with pytest.raises(ValueError, match="compile_mode"):
        EngineConfig(compile_mode="reduce-overhead")


@torch.inference_mode()
def test_fused_projections_keep_keys_alias_weights_and_survive_dtype_moves(tiny_model: Qwen2LM):
    keys = {k: tuple(v.shape) for k, v in tiny_model.state_dict().items()}
    ids = torch.tensor([_prompts(2)[1]])
    want = tiny_model.forward_hidden(ids)
    backbone = tiny_model.llm.backbone
    backbone.fuse_projections()
    assert {k: tuple(v.shape) for k, v in tiny_model.state_dict().items()} == keys
    attn = backbone.layers[0].self_attn
    assert attn._fused_weights() is not None
    assert attn.q_proj.weight.data_ptr() == attn._fused_weights()[0].data_ptr()
    torch.testing.assert_close(tiny_model.forward_hidden(ids), want, atol=1e-5, rtol=0)
    # In-place loading writes through the views into the fused matrices.
    state = {k: v.clone() * 1.01 for k, v in tiny_model.state_dict().items()}
    with torch.inference_mode(False):
        tiny_model.load_state_dict(state)
    scaled = tiny_model.forward_hidden(ids)
    assert not torch.allclose(scaled, want)
    # .to() converts parameters one by one; the module re-fuses so the fused path sees the new dtype.
    tiny_model.to(torch.float64)
    assert attn._fused_weights()[0].dtype == torch.float64
    assert attn.k_proj.weight.data_ptr() == attn._fused_weights()[0][attn.q_proj.weight.shape[0]:].data_ptr()
    torch.testing.assert_close(tiny_model.forward_hidden(ids).float(), scaled, atol=1e-5, rtol=0)
    # Swapping parameter objects (load_state_dict(assign=True)) falls back to the unfused path, still right.
    with torch.inference_mode(False):
        tiny_model.load_state_dict({k: v.to(torch.float64) for k, v in state.items()}, assign=True)
    assert attn._fused_weights() is None
    torch.testing.assert_close(tiny_model.forward_hidden(ids).float(), scaled, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_bounded_kv_decode_and_fresh_prefill_match_the_full_cache_path(tiny_model: Qwen2LM):
    backbone = tiny_model.llm.backbone
    tiny_model.setup_caches(max_batch_slots=3, max_seq_len=48)
    prompts = _prompts(3)[:2]
    slots = torch.tensor([0, 1])
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([list(p) + [0] * (longest - len(p)) for p in prompts])
    positions = torch.arange(longest).expand(2, -1)
    fresh = backbone(tiny_model.embed_flat(ids), positions, slots, fresh=True)
    for b, p in enumerate(prompts):
        alone = tiny_model.forward_hidden(torch.tensor([p]))[0]
        torch.testing.assert_close(fresh[b, :len(p)], alone, atol=1e-5, rtol=0)
    pos = torch.tensor([len(p) for p in prompts])
    emb = tiny_model.speech_embedding(torch.tensor([7, 8]))[:, None]
    bounded = backbone(emb, pos[:, None], slice(0, 2), kv_len=16)
    full = backbone(emb, pos[:, None], slice(0, 2))
    torch.testing.assert_close(bounded, full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="kv_len"):
        backbone(emb, pos[:, None], slice(0, 2), kv_len=49)


PADDED = dict(pad_prefill_to_buckets=True, prefill_len_buckets=(8, 16, 32), prefill_batch_buckets=(1, 2, 4))


@pytest.mark.parametrize("variant", [
    PADDED,                                                   # every prefill padded to (rows, length) buckets
    dict(PADDED, prefill_len_buckets=(8,)),                   # prompts past the last length bucket: unpadded
    dict(overlap_host=True),                                  # step N+1 launched before step N's bookkeeping
    dict(PADDED, overlap_host=True, kv_buckets=(8, 16, 32)),
    dict(overlap_host=True, prefill_groups_per_step=0),       # old admission: every waiting group at once
    dict(sampling_top_k_cap=0),                               # full sort (the plain run samples with the cap)
], ids=["padded", "padded-long", "overlap", "padded-overlap-kv", "overlap-all-groups", "full-sort"])
@pytest.mark.parametrize("sampling", [GREEDY, RAS], ids=["greedy", "ras"])
def test_padded_prefill_and_overlap_give_the_plain_engines_tokens(tiny_model: Qwen2LM, variant, sampling):
    assert _scripted_run(tiny_model, sampling, **variant) == _plain_run(tiny_model, sampling)


@torch.inference_mode()
def test_padded_prefill_rows_give_the_unpadded_first_token_logp_and_state(tiny_model: Qwen2LM):
    """The static-shape prefill (what a graph captures) with padding rows/columns writes the same slot state and
    draws the same first ids as the exact-shape call; the hidden states it samples from agree to fp32 rounding."""
    engine = LLMEngine(tiny_model, EngineConfig(max_batch_slots=3, max_seq_len=64, **PADDED))
    prompts = _prompts(5)[2:5]
    lens = [len(p) for p in prompts]

    def staged(rows: int, length: int):
        ids = torch.full((rows, length), FLAT_SOS_ID)
        ints = torch.ones(rows, 7, dtype=torch.int64)
        ints[:, 3:5] = 0
        ints[:, 6] = engine._scratch_slot
        floats = torch.ones(rows, 2)
        for i, p in enumerate(prompts):
            ids[i, :lens[i]] = torch.tensor(p)
            ints[i] = torch.tensor([RAS.top_k, RAS.win_size, RAS.min_repeats, 40 + i, 3, lens[i], i])
            floats[i] = torch.tensor([RAS.top_p, RAS.temperature])
        return ids, ints, floats

    state = lambda: [t[:3].clone() for t in (engine._tokens, engine._positions, engine._generated,
                                            engine._active, engine._history, engine._min_new, engine._params.top_k,
                                            engine._params.top_p, engine._params.seeds)]
    exact = engine._prefill_rows(*staged(3, max(lens))).clone()
    exact_state = state()
    k_exact = tiny_model.llm.backbone.layers[-1].self_attn.kv_cache.k_cache[:3].clone()
    padded = engine._prefill_rows(*staged(4, 32))[:3]
    assert padded.tolist() == exact.tolist()
    for a, b in zip(state(), exact_state):
        assert torch.equal(a, b)
    k_padded = tiny_model.llm.backbone.layers[-1].self_attn.kv_cache.k_cache[:3]
    for i, n in enumerate(lens):
        torch.testing.assert_close(k_padded[i, :, :n], k_exact[i, :, :n], atol=1e-6, rtol=0)
    # The log-probs of the first token: padded forward vs each prompt alone.
    backbone = tiny_model.llm.backbone
    ids, _, _ = staged(4, 32)
    hidden = backbone(tiny_model.embed_flat(ids), torch.arange(32).expand(4, 32), torch.tensor([0, 1, 2, 3]),
                      fresh=True)
    for i, p in enumerate(prompts):
        alone = tiny_model.prefill(torch.tensor(p), torch.tensor([i]))
        torch.testing.assert_close(tiny_model.speech_logp(hidden[i, lens[i] - 1]), alone, atol=1e-5, rtol=0)


def test_one_prefill_group_per_step_under_the_rows_cap(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, EngineConfig(max_batch_slots=8, max_seq_len=64, prefill_batch_buckets=(1, 2)))
    hs = [engine.submit(LLMRequest(f"g{i}", p, max_new_tokens=6, min_new_tokens=6, sampling=GREEDY))
          for i, p in enumerate(_prompts(5))]
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 3
    engine.step()   # the running two got one token each, then two more were admitted
    assert engine.num_running == 4 and engine.num_waiting == 1
    while engine.has_work():
        engine.step()
    assert all(len(h.result(timeout_s=0)) == 6 for h in hs)


@pytest.mark.parametrize("overlap", [False, True])
def test_request_filling_max_seq_len_finishes_and_its_slot_is_reused(tiny_model: Qwen2LM, overlap: bool):
    """With overlap the finished row advances once more past its last position: still inside the cache, never
    emitted, and the next request in that slot gets the tokens it gets alone."""
    prompts = _prompts(3)
    max_seq = 40
    cfg = EngineConfig(max_batch_slots=1, max_seq_len=max_seq, kv_buckets=(16, 32), overlap_host=overlap)
    alone = {}
    for i in (0, 1):
        e = LLMEngine(tiny_model, EngineConfig(max_batch_slots=1, max_seq_len=max_seq))
        n = max_seq - len(prompts[i])
        h = e.submit(LLMRequest(f"a{i}", prompts[i], max_new_tokens=n, min_new_tokens=n, sampling=RAS, seed=i))
        while e.has_work():
            e.step()
        alone[i] = h.result(timeout_s=0)
    engine = LLMEngine(tiny_model, cfg)
    hs = [engine.submit(LLMRequest(f"a{i}", prompts[i], max_new_tokens=max_seq - len(prompts[i]),
                                   min_new_tokens=max_seq - len(prompts[i]), sampling=RAS, seed=i)) for i in (0, 1)]
    while engine.has_work():
        engine.step()
    assert [h.result(timeout_s=0) for h in hs] == [alone[0], alone[1]]
    assert all(h.finish_reason is FinishReason.LENGTH for h in hs)


def test_overlap_launches_ahead_only_without_pending_admissions(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, EngineConfig(max_batch_slots=2, max_seq_len=64, overlap_host=True))
    prompts = _prompts(3)
    engine.submit(LLMRequest("o0", prompts[0], max_new_tokens=30, min_new_tokens=30, sampling=GREEDY))
    engine.step()
    assert engine._inflight is not None          # nothing waits: the next step is already on the device
    h1 = engine.submit(LLMRequest("o1", prompts[1], max_new_tokens=5, min_new_tokens=5, sampling=GREEDY))
    engine.step()                                # admits o1, reads the step launched before it
    assert engine.num_running == 2
    engine.cancel("o0")
    engine.step()
    engine.step()
    while engine.has_work():
        engine.step()
    assert engine._inflight is None and engine.num_free_slots == 2
    assert len(h1.result(timeout_s=0)) == 5


def test_requests_wider_than_the_top_k_cap_get_the_full_sorts_draws(tiny_model: Qwen2LM):
    """A running request with top_k above sampling_top_k_cap switches the batch to the full sort (eagerly): every
    request's draws stay those of an always-full-sort engine."""
    wide = SamplingParams(top_p=0.95, top_k=200, win_size=10, tau_r=0.1)

    def run(cap: int) -> list[list[int]]:
        engine = LLMEngine(tiny_model, EngineConfig(max_batch_slots=2, max_seq_len=64, sampling_top_k_cap=cap,
                                                    overlap_host=True))
        prompts = _prompts(3)
        hs = [engine.submit(LLMRequest("n0", prompts[0], 25, 25, RAS, seed=1))]
        for _ in range(4):
            engine.step()
        hs.append(engine.submit(LLMRequest("w1", prompts[1], 8, 8, wide, seed=2)))
        while engine.has_work():
            engine.step()
        assert engine._wide_top_k == 0
        return [h.result(timeout_s=0) for h in hs]

    assert run(16) == run(0)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_plain_engines_tokens(tiny_model: Qwen2LM):
    """`compile_decode` (LLM_COMPILE_DECODE): the Inductor-compiled step gives the same tokens, joins and cancels
    included. One kv bucket, so one compilation: about 3 minutes on a loaded 2-core CPU, run in CI."""
    want = _plain_run(tiny_model, GREEDY)
    assert _scripted_run(tiny_model, GREEDY, compile_decode=True, kv_buckets=(64,)) == want
