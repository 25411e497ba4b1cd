"""stream_boundaries grouping: held to the next boundary, sent at once when reached, per batch after the last."""
import pytest

from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_llm.delivery import TokenGrouper


def _feed(grouper: TokenGrouper, batches: list[list[int]]) -> list[list[int]]:
    return [grouper.push(b) for b in batches]


def test_tokens_are_held_until_each_boundary_then_sent_per_batch():
    g = TokenGrouper([3, 5])
    sent = _feed(g, [[1], [2], [3], [4], [5], [6], [7, 8]])
    assert sent == [[], [], [1, 2, 3], [], [4, 5], [6], [7, 8]]
    assert g.flush() == []


def test_a_batch_crossing_several_boundaries_goes_out_whole():
    g = TokenGrouper([2, 3, 10])
    assert _feed(g, [[1], [2, 3, 4], [5]]) == [[], [1, 2, 3, 4], []]
    assert g.flush() == [5]   # the stream ended short of the last boundary


def test_without_boundaries_every_batch_goes_out():
    g = TokenGrouper()
    assert _feed(g, [[1], [2, 3]]) == [[1], [2, 3]]


@pytest.mark.parametrize("bad", [[0, 3], [3, 3], [5, 2], [-1]])
def test_bad_boundaries_are_rejected(bad):
    with pytest.raises(InvalidRequestError, match="stream_boundaries"):
        TokenGrouper(bad)
