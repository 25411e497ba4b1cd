"""The engine's tokens are those the engine gave before it was split into scheduler / slots / model runner / loop,
for every geometry (kv-length buckets, prefill buckets and budgets, the top-k cap, the compiled step), with requests
joining and leaving mid-run.

data/engine_tokens_5f4333b.json holds the tokens of the scenarios below as the engine of commit 5f4333b produced
them with the llm stage's CPU configuration (overlap_host on, exact-shape batched prefill), on the `tiny_model`
fixture; its one-request-at-a-time prefill, its bucket-padded prefill and its non-overlapped schedule gave the same
tokens in that run."""
import json
from pathlib import Path

import pytest
import torch

from cosyvoice_common.constants import FLAT_SOS_ID
from cosyvoice_common.stage_params import LLMParams
from cosyvoice_llm.engine import LLMEngine
from cosyvoice_llm.model import Qwen2LM, build_prompt_flat_ids
from cosyvoice_llm.model_runner import kv_lengths
from cosyvoice_llm.sampling import SamplingParams
from cosyvoice_llm.sequence import FinishReason, LLMRequest

SAMPLINGS = {"greedy": SamplingParams.greedy(), "ras": SamplingParams(top_p=0.9, top_k=50, win_size=10, tau_r=0.1)}
GREEDY, RAS = SAMPLINGS["greedy"], SAMPLINGS["ras"]
RECORDED = json.loads((Path(__file__).parent / "data" / "engine_tokens_5f4333b.json").read_text())


def _prompts(n: int, seed: int, text_len, speech_len) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        text = torch.randint(0, 97, (text_len(i),), generator=gen).tolist()
        speech = torch.randint(0, 6561, (speech_len(i),), generator=gen).tolist()
        out.append(tuple(build_prompt_flat_ids(text, [], speech)))
    return out


SCENARIOS = {
    # 7 requests over 3 slots: joins at steps 0, 3 and 7; r1 cancelled while running, r6 while waiting
    "joins": dict(slots=3, max_seq_len=64, prompts=_prompts(7, 5, lambda i: 2 + 3 * i % 11, lambda i: i % 4 * 3),
                  lengths=[9, 30, 5, 14, 20, 11, 6],
                  at={0: [("submit", 0), ("submit", 1)], 3: [("submit", 2), ("submit", 3), ("submit", 4)],
                      5: [("cancel", 1)], 7: [("submit", 5), ("submit", 6), ("cancel", 6)]}),
    # prompts of 4..75 ids (several prefill length buckets), 12 requests over 5 slots, up to 80 tokens each
    "long": dict(slots=5, max_seq_len=160, prompts=_prompts(12, 9, lambda i: 2 + 5 * i % 29, lambda i: 6 * i % 45),
                 lengths=[80, 33, 47, 12, 60, 25, 71, 40, 18, 55, 30, 64],
                 at={0: [("submit", i) for i in range(7)], 10: [("submit", i) for i in range(7, 10)],
                     20: [("cancel", 2)], 40: [("submit", 10), ("submit", 11)]}),
}


def _scripted_run(model: Qwen2LM, scenario: str, sampling: str, **geometry) -> dict[str, list]:
    """Runs one scenario step by step; {request id: [tokens, finish reason]} as the recording holds them."""
    sc = SCENARIOS[scenario]
    engine = LLMEngine(model, LLMParams(max_seq_len=sc["max_seq_len"], **geometry), batch_slots=sc["slots"])
    handles = {}
    for step in range(2000):
        for kind, i in sc["at"].get(step, []):
            if kind == "submit":
                handles[f"r{i}"] = engine.submit(LLMRequest(
                    f"r{i}", sc["prompts"][i], max_new_tokens=sc["lengths"][i], min_new_tokens=sc["lengths"][i],
                    sampling=SAMPLINGS[sampling], seed=100 + i))
            else:
                engine.cancel(f"r{i}")
        if step > max(sc["at"]) and not engine.has_work():
            break
        engine.step()
    assert engine.num_free_slots == sc["slots"] and not engine.has_work()
    return {rid: [h.result(timeout_s=0), h.finish_reason.value] for rid, h in handles.items()}


@pytest.mark.parametrize("geometry", [
    dict(),                                                   # the defaults
    dict(kv_buckets=(8, 16, 32)),                             # crosses several kv buckets while decoding
    dict(kv_buckets=(16,), max_prefill_tokens=20),            # admission split over several prefill forwards
    dict(prefill_len_buckets=(8, 16, 32), prefill_batch_buckets=(1, 2, 4)),   # smaller prefill buckets
    dict(prefill_len_buckets=(8,)),                           # prompts past the last length bucket: unpadded
    dict(sampling_top_k_cap=0),                               # the full sort always
], ids=["defaults", "kv-buckets", "prefill-budget", "prefill-buckets", "past-last-bucket", "full-sort"])
@pytest.mark.parametrize("sampling", ["greedy", "ras"])
@pytest.mark.parametrize("scenario", ["joins", "long"])
def test_engine_gives_the_recorded_tokens_with_joins_and_cancels(tiny_model: Qwen2LM, scenario, sampling, geometry):
    want = RECORDED[f"{scenario}/{sampling}"]
    got = _scripted_run(tiny_model, scenario, sampling, **geometry)
    if "max_prefill_tokens" in geometry:
        # Admission spread over more steps: a request cancelled at a given step has made fewer tokens by then.
        assert {rid: got[rid] for rid, (_, reason) in want.items() if reason != "cancelled"} == {
            rid: value for rid, value in want.items() if value[1] != "cancelled"}
        assert all(got[rid][1] == "cancelled" and tokens[:len(got[rid][0])] == got[rid][0]
                   for rid, (tokens, reason) in want.items() if reason == "cancelled")
    else:
        assert got == want
    assert any(reason == "cancelled" and 0 < len(tokens) for tokens, reason in want.values())
    assert all(len(tokens) == SCENARIOS[scenario]["lengths"][int(rid[1:])]
               for rid, (tokens, reason) in want.items() if reason == "length")


def _prompts_short(n: int) -> list[tuple[int, ...]]:
    return _prompts(n, 5, lambda i: 2 + 3 * i % 11, lambda i: i % 4 * 3)


def test_cancel_frees_the_slot_for_the_next_admission(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64, kv_buckets=(16,)), batch_slots=2)
    hs = [engine.submit(LLMRequest(f"c{i}", p, max_new_tokens=40, min_new_tokens=40, sampling=GREEDY))
          for i, p in enumerate(_prompts_short(3))]
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    engine.cancel("c0")
    engine.step()   # c0's slot is freed, then c2 is prefilled into it in the same step
    assert engine.num_running == 2 and engine.num_waiting == 0
    assert engine.slots.running[0].request_id == "c2"
    engine.cancel("c1")
    engine.cancel("c2")
    engine.step()
    assert engine.num_free_slots == 2 and not engine.has_work()
    for h in hs:
        assert 0 < len(h.result(timeout_s=0)) < 40 and h.finish_reason is FinishReason.CANCELLED


def test_kv_bucket_is_the_smallest_covering_every_running_position(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64, kv_buckets=(8, 16)), batch_slots=2)
    runner = engine.runner
    assert runner.kv_lens == (8, 16, 64)
    seen = []
    real = runner._step_fn

    def spy(n, kv_len):
        # the positions the step writes at, on the device (a step launched ahead is one past the host's mirror)
        need = int((runner._positions[:n] * runner._active[:n]).max()) + 1
        seen.append((need, kv_len))
        return real(n, kv_len)

    runner._step_fn = spy
    h = engine.submit(LLMRequest("k", _prompts_short(1)[0], max_new_tokens=20, min_new_tokens=20, sampling=GREEDY))
    while engine.has_work():
        engine.step()
    assert len(h.result(timeout_s=0)) == 20
    assert {kv for _, kv in seen} == {8, 16, 64}
    assert all(kv == min(b for b in (8, 16, 64) if b >= need) for need, kv in seen)


def test_default_buckets_double_from_128_to_max_seq_len():
    assert kv_lengths(1000) == (128, 256, 512, 1000)
    assert kv_lengths(64) == (64,)
    with pytest.raises(ValueError, match="kv_buckets"):
        LLMParams(max_seq_len=64, kv_buckets=(128,))


@torch.inference_mode()
def test_fused_projections_keep_keys_alias_weights_and_survive_dtype_moves(tiny_model: Qwen2LM):
    keys = {k: tuple(v.shape) for k, v in tiny_model.state_dict().items()}
    ids = torch.tensor([_prompts_short(2)[1]])
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
    prompts = _prompts_short(3)[:2]
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


@torch.inference_mode()
def test_padded_prefill_rows_give_the_unpadded_first_token_logp_and_state(tiny_model: Qwen2LM):
    """The static-shape prefill with padding rows/columns (what every prefill runs as) writes the same slot state
    and draws the same first ids as the exact-shape call; the hidden states it samples from agree to fp32
    rounding."""
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64, prefill_len_buckets=(8, 16, 32),
                                             prefill_batch_buckets=(1, 2, 4)), batch_slots=3)
    runner = engine.runner
    prompts = _prompts_short(5)[2:5]
    lens = [len(p) for p in prompts]

    def staged(rows: int, length: int):
        ids = torch.full((rows, length), FLAT_SOS_ID)
        ints = torch.ones(rows, 7, dtype=torch.int64)
        ints[:, 3:5] = 0
        ints[:, 6] = runner.scratch_slot
        floats = torch.ones(rows, 2)
        for i, p in enumerate(prompts):
            ids[i, :lens[i]] = torch.tensor(p)
            ints[i] = torch.tensor([RAS.top_k, RAS.win_size, RAS.min_repeats, 40 + i, 3, lens[i], i])
            floats[i] = torch.tensor([RAS.top_p, RAS.temperature])
        return ids, ints, floats

    state = lambda: [t[:3].clone() for t in (runner._tokens, runner._positions, runner._generated,  # noqa: E731
                                            runner._active, runner._history, runner._min_new, runner._params.top_k,
                                            runner._params.top_p, runner._params.seeds)]
    exact = runner._prefill_rows(*staged(3, max(lens))).clone()
    exact_state = state()
    k_exact = tiny_model.llm.backbone.layers[-1].self_attn.kv_cache.k_cache[:3].clone()
    padded = runner._prefill_rows(*staged(4, 32))[:3]
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
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64, prefill_batch_buckets=(1, 2)), batch_slots=8)
    hs = [engine.submit(LLMRequest(f"g{i}", p, max_new_tokens=6, min_new_tokens=6, sampling=GREEDY))
          for i, p in enumerate(_prompts_short(5))]
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 3
    engine.step()   # the running two got one token each, then two more were admitted
    assert engine.num_running == 4 and engine.num_waiting == 1
    while engine.has_work():
        engine.step()
    assert all(len(h.result(timeout_s=0)) == 6 for h in hs)


def test_request_filling_max_seq_len_finishes_and_its_slot_is_reused(tiny_model: Qwen2LM):
    """The step launched ahead advances the finished row once more past its last position: still inside the cache,
    never emitted, and the next request in that slot gets the tokens it gets alone."""
    prompts = _prompts_short(3)
    max_seq = 40
    settings = LLMParams(max_seq_len=max_seq, kv_buckets=(16, 32))
    alone = {}
    for i in (0, 1):
        e = LLMEngine(tiny_model, LLMParams(max_seq_len=max_seq), batch_slots=1)
        n = max_seq - len(prompts[i])
        h = e.submit(LLMRequest(f"a{i}", prompts[i], max_new_tokens=n, min_new_tokens=n, sampling=RAS, seed=i))
        while e.has_work():
            e.step()
        alone[i] = h.result(timeout_s=0)
    engine = LLMEngine(tiny_model, settings, batch_slots=1)
    hs = [engine.submit(LLMRequest(f"a{i}", prompts[i], max_new_tokens=max_seq - len(prompts[i]),
                                   min_new_tokens=max_seq - len(prompts[i]), sampling=RAS, seed=i)) for i in (0, 1)]
    while engine.has_work():
        engine.step()
    assert [h.result(timeout_s=0) for h in hs] == [alone[0], alone[1]]
    assert all(h.finish_reason is FinishReason.LENGTH for h in hs)


def test_the_next_step_is_launched_ahead_only_without_pending_admissions(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64), batch_slots=2)
    prompts = _prompts_short(3)
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
        engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64, sampling_top_k_cap=cap), batch_slots=2)
        prompts = _prompts_short(3)
        hs = [engine.submit(LLMRequest("n0", prompts[0], 25, 25, RAS, seed=1))]
        for _ in range(4):
            engine.step()
        hs.append(engine.submit(LLMRequest("w1", prompts[1], 8, 8, wide, seed=2)))
        while engine.has_work():
            engine.step()
        assert engine.slots.num_full_sort == 0
        return [h.result(timeout_s=0) for h in hs]

    assert run(16) == run(0)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_recorded_tokens(tiny_model: Qwen2LM):
    """`compile_decode` (LLM_COMPILE_DECODE): the Inductor-compiled step gives the same tokens, joins and cancels
    included. One kv bucket, so one compilation: about 3 minutes on a loaded 2-core CPU, run in CI."""
    got = _scripted_run(tiny_model, "joins", "greedy", compile_decode=True, kv_buckets=(64,))
    assert got == RECORDED["joins/greedy"]
