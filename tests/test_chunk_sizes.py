"""How an import is cut into bulk chunks: full chunks while much is left, small ones at the end, so that no pool
process is left embedding a whole chunk alone after the others ran out of work."""

from __future__ import annotations

import pytest

from common.dispatch import chunk_sizes


@pytest.mark.parametrize("n", [1, 7, 64, 65, 100, 511, 512, 513, 1000, 4000, 20000, 100_003])
@pytest.mark.parametrize("size", [1, 4, 16, 512, 2048])
def test_every_task_is_in_one_chunk_of_at_most_the_size(n, size):
    sizes = chunk_sizes(n, size)
    assert sum(sizes) == n
    assert all(0 < s <= size for s in sizes)


def test_a_large_import_goes_in_full_chunks_then_smaller_ones():
    sizes = chunk_sizes(4000, 512)
    assert sizes[:4] == [512] * 4
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True), "non-increasing until the last"
    # Whatever chunk a process takes last, the others have at most that much left to do between them.
    assert max(sizes[-4:]) <= 512 // 4
    assert len(sizes) < 2 * -(-4000 // 512)


def test_a_small_import_is_one_chunk_and_no_runt_is_cut_off():
    assert chunk_sizes(64, 512) == [64]
    assert chunk_sizes(70, 512) == [70]
    assert chunk_sizes(0, 512) == []


def test_the_remainder_a_chunk_gives_back_is_cut_the_same_way():
    assert chunk_sizes(448, 512) == [112, 84, 64, 64, 64, 60]
