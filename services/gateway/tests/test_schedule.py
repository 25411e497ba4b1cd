"""The streaming chunk schedule: 15 + 3 first, hops 25 -> 50 -> 100 (cap), remainder finalizes."""
import pytest
from hypothesis import given, strategies as st

from cosyvoice_common.constants import FIRST_CHUNK_TOKENS, PRE_LOOKAHEAD_TOKENS
from cosyvoice_gateway.schedule import Chunk, ChunkSchedule, ScheduleConfig, plan


def test_first_chunk_waits_for_15_plus_3_lookahead_tokens():
    schedule = ChunkSchedule()
    for available in range(FIRST_CHUNK_TOKENS + PRE_LOOKAHEAD_TOKENS):
        assert schedule.next_chunk(available, llm_done=False) is None
    assert schedule.next_chunk(18, llm_done=False) == Chunk(0, 0, 18, finalize=False)


def test_hops_grow_25_50_100_and_cap_at_100():
    chunks = plan(1000)
    assert [c.hop_tokens for c in chunks[:-1]] == [15, 25, 50] + [100] * 9
    assert [(c.token_offset, c.end) for c in chunks[:3]] == [(0, 18), (15, 43), (40, 93)]
    final = chunks[-1]
    assert final.finalize and final.end == 1000 and final.token_offset == 990


def test_final_chunk_is_the_remainder_when_the_llm_stops():
    schedule = ChunkSchedule()
    assert schedule.next_chunk(20, llm_done=False).end == 18
    assert schedule.next_chunk(30, llm_done=False) is None          # needs 15 + 25 + 3 = 43
    final = schedule.next_chunk(30, llm_done=True)
    assert final == Chunk(1, 15, 30, finalize=True)
    assert schedule.done and schedule.next_chunk(30, llm_done=True) is None


def test_short_utterance_is_one_final_chunk():
    assert plan(10) == [Chunk(0, 0, 10, finalize=True)]


def test_no_tokens_gives_no_chunk():
    assert plan(0) == []


def test_tokens_going_backwards_is_an_error():
    schedule = ChunkSchedule()
    schedule.next_chunk(18, llm_done=False)
    with pytest.raises(ValueError):
        schedule.next_chunk(10, llm_done=False)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        ScheduleConfig(first_hop_tokens=0)


@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=60))
def test_chunks_tile_every_token_exactly_once(increments):
    """Whatever the arrival pattern, emitted spans are contiguous and cover all tokens once."""
    schedule, available, chunks = ChunkSchedule(), 0, []
    for step in increments:
        available += step
        while (chunk := schedule.next_chunk(available, llm_done=False)) is not None:
            assert chunk.end <= available
            chunks.append(chunk)
    while (chunk := schedule.next_chunk(available, llm_done=True)) is not None:
        chunks.append(chunk)
    covered = 0
    for i, chunk in enumerate(chunks):
        assert chunk.index == i and chunk.token_offset == covered
        covered += chunk.hop_tokens
        assert chunk.finalize == (i == len(chunks) - 1)
    assert covered == available
