"""The sm_90a forward's work-item numbering (fwd.cu: item_coords), modelled in Python: item i
-> (query tile, head-batch). Every numbering must be a bijection onto the (tile, head-batch)
pairs; the longest-first ones must start longer rows (causal: higher query tiles) no later than
shorter ones of the same section; the head-major one keeps each head-batch's tiles together."""

from __future__ import annotations

import pytest


def item_coords(i: int, num_m: int, bh: int, head_major: bool, lpt_heads: int
                ) -> tuple[int, int]:
    """fwd.cu's item_coords (DM_SM90_HEAD_MAJOR where every item is equal, DM_SM90_LPT_HEADS)."""
    if head_major:
        return i % num_m, i // num_m
    if 0 < lpt_heads < bh and bh % lpt_heads == 0:
        sec, r = divmod(i, lpt_heads * num_m)
        return num_m - 1 - r // lpt_heads, sec * lpt_heads + r % lpt_heads
    return num_m - 1 - i // bh, i % bh


SHAPES = [(32, 32), (1, 5), (7, 3), (16, 33), (3, 1), (5, 24), (2, 16)]


@pytest.mark.parametrize("num_m,bh", SHAPES)
@pytest.mark.parametrize("head_major,lpt_heads",
                         [(True, 0), (False, 0), (False, 4), (False, 8), (False, 64)])
def test_every_item_once(num_m, bh, head_major, lpt_heads):
    items = [item_coords(i, num_m, bh, head_major, lpt_heads) for i in range(num_m * bh)]
    assert sorted(items) == [(m, hb) for m in range(num_m) for hb in range(bh)]


@pytest.mark.parametrize("num_m,bh", SHAPES)
@pytest.mark.parametrize("lpt_heads", [0, 1, 4, 8])
def test_longest_first_within_sections(num_m, bh, lpt_heads):
    section = lpt_heads if 0 < lpt_heads < bh and bh % lpt_heads == 0 else bh
    for start in range(0, bh, section):
        tiles = [m for i in range(num_m * bh)
                 for m, hb in [item_coords(i, num_m, bh, False, lpt_heads)]
                 if start <= hb < start + section]
        assert tiles == sorted(tiles, reverse=True)
    # sections follow each other: every item of section s precedes those of section s + 1
    secs = [item_coords(i, num_m, bh, False, lpt_heads)[1] // section
            for i in range(num_m * bh)]
    assert secs == sorted(secs)


@pytest.mark.parametrize("num_m,bh", SHAPES)
def test_head_major_keeps_a_head_batch_together(num_m, bh):
    hbs = [item_coords(i, num_m, bh, True, 0)[1] for i in range(num_m * bh)]
    assert hbs == sorted(hbs)
