import threading

import numpy as np
import pytest
import torch

from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_common.stage_params import LLMParams
from cosyvoice_llm.engine import LLMEngine
from cosyvoice_llm.sequence import FinishReason, LLMOutput, LLMRequest, coalesce_outputs
from cosyvoice_llm.model import Qwen2LM, build_prompt_flat_ids
from cosyvoice_llm.sampling import SamplingParams

GREEDY = SamplingParams.greedy()


def _prompts(n: int) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        text = torch.randint(0, 97, (3 + 2 * i,), generator=gen).tolist()
        speech = torch.randint(0, 6561, (i % 3 * 4,), generator=gen).tolist()
        out.append(tuple(build_prompt_flat_ids(text, [], speech)))
    return out


def _run_to_completion(engine: LLMEngine, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not drain")


def test_concurrent_greedy_requests_match_each_run_alone(tiny_model: Qwen2LM):
    prompts = _prompts(5)
    lengths = [7, 12, 3, 9, 12]
    cfg = LLMParams(max_seq_len=64)

    alone = []
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine = LLMEngine(tiny_model, cfg, batch_slots=3)
        h = engine.submit(LLMRequest(f"a{i}", p, max_new_tokens=n, min_new_tokens=n, sampling=GREEDY))
        _run_to_completion(engine)
        alone.append(h.result(timeout_s=0))

    engine = LLMEngine(tiny_model, cfg, batch_slots=3)
    handles = [engine.submit(LLMRequest(f"b{i}", p, max_new_tokens=n, min_new_tokens=n, sampling=GREEDY))
               for i, (p, n) in enumerate(zip(prompts, lengths))]
    _run_to_completion(engine)
    together = [h.result(timeout_s=0) for h in handles]
    assert together == alone
    assert [len(t) for t in together] == lengths
    assert all(h.finish_reason is FinishReason.LENGTH for h in handles)
    assert engine.num_free_slots == 3


def test_engine_greedy_matches_single_request_inference(tiny_model: Qwen2LM):
    text = [5, 17, 33, 2]
    want = list(tiny_model.inference(text, [9], [100, 200], min_len=10, max_len=10, sampling=GREEDY))
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64), batch_slots=2)
    h = engine.submit(LLMRequest("r", tuple(build_prompt_flat_ids(text, [9], [100, 200])), max_new_tokens=10,
                                 min_new_tokens=10, sampling=GREEDY))
    _run_to_completion(engine)
    assert h.result(timeout_s=0) == want


def test_seeded_sampling_is_independent_of_batch_company(tiny_model: Qwen2LM):
    params = SamplingParams(top_p=0.9, top_k=50, win_size=10, tau_r=0.1)
    prompts = _prompts(3)
    cfg = LLMParams(max_seq_len=64)
    engine = LLMEngine(tiny_model, cfg, batch_slots=4)
    h = engine.submit(LLMRequest("solo", prompts[0], max_new_tokens=15, sampling=params, seed=1234))
    _run_to_completion(engine)
    solo = h.result(timeout_s=0)
    engine = LLMEngine(tiny_model, cfg, batch_slots=4)
    hs = [engine.submit(LLMRequest(f"m{i}", p, max_new_tokens=15, sampling=params, seed=[1234, 5, 6][i]))
          for i, p in enumerate(prompts)]
    _run_to_completion(engine)
    assert hs[0].result(timeout_s=0) == solo
    assert hs[1].result(timeout_s=0) != solo


def test_cancel_frees_the_slot_for_a_waiting_request(tiny_model: Qwen2LM):
    prompts = _prompts(2)
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64), batch_slots=1)
    first = engine.submit(LLMRequest("first", prompts[0], max_new_tokens=40, min_new_tokens=40, sampling=GREEDY))
    second = engine.submit(LLMRequest("second", prompts[1], max_new_tokens=4, min_new_tokens=4, sampling=GREEDY))
    engine.step()
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.cancel("first")
    engine.step()   # cancellation applied, then "second" takes the freed slot
    assert engine.num_waiting == 0
    _run_to_completion(engine)
    got = first.result(timeout_s=0)
    assert first.finish_reason is FinishReason.CANCELLED and 0 < len(got) < 40
    assert len(second.result(timeout_s=0)) == 4 and second.finish_reason is FinishReason.LENGTH
    assert engine.num_free_slots == 1


def test_cancel_of_waiting_request_ends_its_stream(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64), batch_slots=1)
    engine.submit(LLMRequest("busy", _prompts(1)[0], max_new_tokens=5, sampling=GREEDY))
    waiting = engine.submit(LLMRequest("w", _prompts(1)[0], max_new_tokens=5, sampling=GREEDY))
    engine.cancel("w")
    _run_to_completion(engine)
    assert waiting.result(timeout_s=0) == [] and waiting.finish_reason is FinishReason.CANCELLED


def test_min_len_blocks_eos_and_stop_ends_without_emitting(tiny_model: Qwen2LM):
    with torch.no_grad():
        tiny_model.llm_decoder.bias[6561] = 100.0   # eos dominates whenever it is allowed
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64), batch_slots=2)
    h = engine.submit(LLMRequest("r", _prompts(1)[0], max_new_tokens=30, min_new_tokens=6, sampling=GREEDY))
    _run_to_completion(engine)
    toks = h.result(timeout_s=0)
    assert len(toks) == 6 and all(t < 6561 for t in toks)
    assert h.finish_reason is FinishReason.STOP


def test_loop_thread_serves_concurrent_submitters(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64), batch_slots=2)
    engine.start()
    try:
        results = {}

        def client(i: int, prompt) -> None:
            h = engine.submit(LLMRequest(f"t{i}", prompt, max_new_tokens=6, min_new_tokens=6, sampling=GREEDY))
            results[i] = h.result(timeout_s=30)

        threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(_prompts(4))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == [0, 1, 2, 3] and all(len(r) == 6 for r in results.values())
    finally:
        engine.stop()


def test_submit_rejects_bad_requests_with_named_fields(tiny_model: Qwen2LM):
    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=16), batch_slots=1)
    with pytest.raises(InvalidRequestError, match="max_seq_len"):
        engine.submit(LLMRequest("long", tuple(range(10)), max_new_tokens=10))
    with pytest.raises(InvalidRequestError, match="input_ids"):
        engine.submit(LLMRequest("bad", (1, 500), max_new_tokens=2))
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        LLMRequest("zero", (1,), max_new_tokens=0)
    engine.submit(LLMRequest("dup", (1, 2), max_new_tokens=2))
    with pytest.raises(InvalidRequestError, match="dup"):
        engine.submit(LLMRequest("dup", (1, 2), max_new_tokens=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_and_prefill_give_the_same_tokens_as_eager(tiny_model: Qwen2LM):
    model = tiny_model.to("cuda")
    params = SamplingParams(top_p=0.9, top_k=50, win_size=10, tau_r=0.1)
    prompts = _prompts(5)
    results = []
    for graphs in (False, True):
        engine = LLMEngine(model, LLMParams(max_seq_len=64, cuda_graphs=graphs), batch_slots=4)
        if graphs:
            engine.runner.capture_graphs()
            assert sorted(engine.runner._decode_graphs) == [1, 2, 4]
            assert sorted(engine.runner._prefill_graphs) == [(r, n) for r in (1, 2, 4, 8) for n in (32, 64)]
        hs = [engine.submit(LLMRequest(f"g{i}", p, max_new_tokens=12 + i, sampling=params, seed=i))
              for i, p in enumerate(prompts)]
        _run_to_completion(engine)
        results.append([h.result(timeout_s=0) for h in hs])
    assert results[0] == results[1]
    assert any(len(r) > 1 for r in results[0])


def test_coalesce_outputs_merges_per_request_in_order():
    a, b = "a", "b"
    outputs = [LLMOutput(a, (1,)), LLMOutput(b, (7,)), LLMOutput(a, (2, 3)), LLMOutput(b, (8,)),
               LLMOutput(a, (), finished=True, finish_reason=FinishReason.STOP)]
    merged = {out.request_id: out for out in coalesce_outputs(outputs)}
    assert len(coalesce_outputs(outputs)) == 2
    assert merged[a] == LLMOutput(a, (1, 2, 3), True, FinishReason.STOP)
    assert merged[b] == LLMOutput(b, (7, 8), False, None)
    # One output passes through as it is; nothing in, nothing out.
    single = LLMOutput(a, (4,))
    assert coalesce_outputs([single]) == [single] and coalesce_outputs([single])[0] is single
    assert coalesce_outputs([]) == []
    # An error keeps its message; the tokens before it ride along.
    failed = coalesce_outputs([LLMOutput(a, (5,)), LLMOutput(a, (), True, FinishReason.ERROR, "boom")])
    assert failed == [LLMOutput(a, (5,), True, FinishReason.ERROR, "boom")]


def test_capacity_reports_slots_positions_and_kv_bytes(tiny_model):
    from cosyvoice_llm.capacity import kv_bytes_per_slot, plan_batch_slots

    engine = LLMEngine(tiny_model, LLMParams(max_seq_len=64), batch_slots=3)
    cap = engine.capacity
    assert (cap.batch_slots, cap.max_seq_len) == (3, 64)
    # 2 layers x (k, v) x 2 kv heads x 64 positions x 8 dims x 4 bytes per slot; the scratch slot is one more row.
    assert kv_bytes_per_slot(tiny_model, 64) == 2 * 2 * 2 * 64 * 8 * 4
    assert cap.kv_cache_bytes == 4 * kv_bytes_per_slot(tiny_model, 64)
    assert "3 slots x 64 positions" in cap.describe()
    with pytest.raises(ValueError, match="CUDA"):
        plan_batch_slots(tiny_model, 64, 0.2, 128, 8, 32)
