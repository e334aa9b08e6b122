"""The Hopper forward's work-item schedules (cuda_src/sm90/fwd.cu, DM_SM90_PERSISTENT) on the
CPU: a model of the dynamic scheduler (=2) run over random interleavings of every role of
several CTAs, the kernel's claim arithmetic against that model (NVRTC static_asserts), and the
host's grid, shared memory and argument record per schedule.

The model follows the kernel step by step: each CTA's producer warp starts at item blockIdx.x,
claims every next item with atomicInc(counter, num_items - 1) after pushing the current item's
end stage (the default; DM_SM90_CLAIM_AHEAD=1: at the current item's start), passes items with
nothing to do (varlen tiles past their sequence) straight to the next claim, and ends with a
stage naming item -1; the two consumer warpgroups read an item's index from its first stage
(a tile or its end), walk its stages and release each one. Stages form a ring of k_stages
mbarrier pairs: the producer may refill a stage only once both consumers released its previous
use; Q's buffers (1 or 2) form a ring too, loaded per item once both consumers released the
item q_bufs before."""

from __future__ import annotations

import random

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy import forward_sm90 as f90


def atom_inc(counter: list[int], limit: int) -> int:
    """CUDA's atomicInc(addr, limit): returns the old value, leaves (old >= limit ? 0 : old + 1)."""
    old = counter[0]
    counter[0] = 0 if old >= limit else old + 1
    return old


def claimed_item(claim: int, grid: int, num_items: int) -> int:
    """fwd.cu: claimed_item: the item of claim number ``claim``, or num_items (none left)."""
    return claim + grid if claim + grid < num_items else num_items


class Launch:
    """One launch of the dynamic schedule: G CTAs, each a producer and two consumers as
    generators that yield wherever the kernel may block or race (every shared-memory or
    global step)."""

    def __init__(self, counter: list[int] | None, num_items: int, grid: int, tiles: list[int],
                 live: list[bool], k_stages: int, claim_ahead: bool = False,
                 q_bufs: int = 2) -> None:
        self.counter, self.n, self.grid = counter, num_items, grid
        self.tiles, self.live, self.k = tiles, live, k_stages
        self.claim_ahead, self.q_bufs = claim_ahead, q_bufs
        self.claimed: list[int] = []                     # every claim's item, in claim order
        self.pushed = [[] for _ in range(grid)]          # items the producer pushed, per CTA
        self.seen = [[[], []] for _ in range(grid)]      # items each consumer walked, per CTA

    def producer(self, x: int, ring: dict):
        stage = use = 0

        def push(tile: int, item: int):
            nonlocal stage, use
            while ring["full"][stage] != use or min(ring["released"][c][stage]
                                                   for c in (0, 1)) != use:
                yield                                     # mbar_wait(empty_k(stage))
            ring["slot"][stage] = (tile, item)            # info[] / stage_item[] stores
            yield
            ring["full"][stage] += 1                      # the leader's arrive
            stage += 1
            if stage == self.k:
                stage, use = 0, use + 1

        def claim(item: int):
            yield                                         # the atomic races other CTAs
            v = item if self.counter is None else atom_inc(self.counter, self.n - 1)
            nxt = claimed_item(v, self.grid, self.n)
            self.claimed.append(nxt)
            return nxt

        def load_q(u: int):
            qx, quse = u % self.q_bufs, u // self.q_bufs
            while min(ring["q_released"][c][qx] for c in (0, 1)) != quse:
                yield                                     # mbar_wait(empty_q(qx))
            ring["q_item"][qx] = u                        # the TMA load of Q
            yield
            ring["q_full"][qx] += 1

        item, u = x, 0
        while item < self.n:
            if not self.live[item]:
                item = yield from claim(item)
                continue
            self.pushed[x].append(item)
            yield from load_q(u)
            u += 1
            if self.claim_ahead:
                nxt = yield from claim(item)              # at the item's start
            for t in range(self.tiles[item]):
                yield from push(t, item)
            yield from push(-1, item)
            item = nxt if self.claim_ahead else (yield from claim(item))  # else: after the end
        yield from push(-2, -1)                           # no more items

    def consumer(self, x: int, c: int, ring: dict):
        stage = use = 0

        def wait_full():
            while ring["full"][stage] <= use:
                yield

        def release():
            nonlocal stage, use
            ring["released"][c][stage] += 1
            stage += 1
            if stage == self.k:
                stage, use = 0, use + 1

        u = 0
        while True:
            yield from wait_full()
            tile, item = ring["slot"][stage]
            if item < 0:
                return
            self.seen[x][c].append(item)
            qx, quse = u % self.q_bufs, u // self.q_bufs
            while ring["q_full"][qx] <= quse:
                yield                                     # mbar_wait(full_q(qx))
            assert ring["q_item"][qx] == u, "Q of another item in this item's buffer"
            t_expect = 0
            while True:                                   # the item's tiles, then its end
                yield from wait_full()
                tile, it2 = ring["slot"][stage]
                assert it2 == item, "a stage of another item inside this item's walk"
                if tile == -1:
                    release()
                    break
                assert tile == t_expect
                t_expect += 1
                yield
                assert ring["q_item"][qx] == u, "Q overwritten while the item reads it"
                release()
            assert t_expect == self.tiles[item]
            ring["q_released"][c][qx] += 1                # release(empty_q(qx))
            u += 1

    def run(self, rng: random.Random) -> None:
        gens = []
        for x in range(self.grid):
            ring = {"full": [0] * self.k, "released": [[0] * self.k, [0] * self.k],
                    "slot": [None] * self.k, "q_full": [0] * self.q_bufs,
                    "q_released": [[0] * self.q_bufs, [0] * self.q_bufs],
                    "q_item": [None] * self.q_bufs}
            gens += [self.producer(x, ring), self.consumer(x, 0, ring),
                     self.consumer(x, 1, ring)]
        steps = 0
        while gens:
            g = rng.choice(gens)
            try:
                next(g)
            except StopIteration:
                gens.remove(g)
            steps += 1
            assert steps < 10_000_000, "no progress: a role waits forever"


@pytest.mark.parametrize("claim_ahead, q_bufs", [(False, 2), (False, 1), (True, 2), (True, 1)],
                         ids=["default", "one_q", "claim_ahead", "claim_ahead_one_q"])
@pytest.mark.parametrize("seed", range(12))
def test_dynamic_schedule_claims_each_item_once_and_every_role_walks_the_same_items(
        seed, claim_ahead, q_bufs):
    rng = random.Random(seed)
    counter = [0]   # one counter across launches, as the kept workspace is
    for _ in range(3):
        n = rng.choice([1, 2, 5, 13, 40, 97])
        grid = rng.randint(1, min(n, 9))
        tiles = [rng.randint(0, 4) for _ in range(n)]    # 0: a row range with no key tile
        live = [rng.random() > 0.2 for _ in range(n)]    # False: a varlen tile past its end
        ln = Launch(counter, n, grid, tiles, live, rng.choice([2, 3]), claim_ahead, q_bufs)
        ln.run(rng)
        # every item is taken exactly once: the first items without a claim, the rest claimed
        firsts = list(range(min(grid, n)))
        got = sorted(firsts + [i for i in ln.claimed if i < n])
        assert got == list(range(n))
        assert len(ln.claimed) == n   # exactly num_items claims: the counter wraps to 0 ...
        assert counter == [0]         # ... so the next launch needs no memset
        walked = sorted(i for p in ln.pushed for i in p)
        assert walked == [i for i in range(n) if live[i]]
        for x in range(grid):         # both consumers walk what their producer pushed, in order
            assert ln.seen[x][0] == ln.pushed[x] == ln.seen[x][1]


def test_a_grid_larger_than_the_items_still_winds_the_counter_back():
    """The host never launches more CTAs than items, but the kernel's rule holds anyway: CTAs
    without a first item never claim, so the claims are num_items and the counter ends at 0."""
    counter = [0]
    ln = Launch(counter, 3, 5, [1, 2, 0], [True, True, True], 2)
    ln.run(random.Random(1))
    assert counter == [0] and sorted(i for p in ln.pushed for i in p) == [0, 1, 2]


def test_without_a_counter_each_cta_strides_by_the_grid():
    """A launch that passes no counter (item_counter null) still takes every item once: the
    claim of item i is i + grid."""
    ln = Launch(None, 23, 4, [2] * 23, [i % 5 != 3 for i in range(23)], 2)
    ln.run(random.Random(3))
    assert sorted(i for p in ln.pushed for i in p) == [i for i in range(23) if i % 5 != 3]
    assert ln.pushed[1] == [i for i in range(1, 23, 4) if i % 5 != 3]


def _makespan(durations: list[float], grid: int, order: str,
              speed: np.ndarray | None = None) -> float:
    """Finish time of items (in index order) on ``grid`` CTAs of relative ``speed`` (1: all
    alike): "greedy" = the first free CTA takes the next item (the dynamic counter; the
    hardware's dispatch of one CTA per item does the same), "snake" = fwd.cu's static
    persistent order."""
    speed = np.ones(grid) if speed is None else speed
    ends = np.zeros(grid)
    for i, d in enumerate(durations):
        if order == "greedy":
            j = int(np.argmin(ends))
        else:
            r, x = divmod(i, grid)
            j = grid - 1 - x if r & 1 else x
        ends[j] += d / speed[j]
    return float(ends.max())


def test_causal_bench_shape_model():
    """B=2 H=16 S=4096 causal on 132 SMs, an item costing its key tiles plus one tile's worth of
    overhead. With every SM equally fast the static snake pairs long and short items almost
    perfectly (so cost alone does not explain the 3.5% it lost on the H200); once SMs run at
    slightly different speeds (3% spread: L2 distance, memory contention), the static
    assignment cannot follow and its slowest SM sets the time, while greedy claims over the
    longest-first order stay within 2% of the average load (the bound no schedule beats)."""
    num_m, bh, sms = 32, 32, 132
    durations = [1.0 + num_m - i // bh for i in range(num_m * bh)]
    bound = sum(durations) / sms
    assert _makespan(durations, sms, "greedy") / bound < 1.02
    assert _makespan(durations, sms, "snake") / bound < 1.01
    speed = 1 + 0.03 * np.random.default_rng(0).standard_normal(sms)
    bound = sum(durations) / speed.sum()
    greedy = _makespan(durations, sms, "greedy", speed)
    snake = _makespan(durations, sms, "snake", speed)
    assert greedy / bound < 1.02 < 1.04 < snake / bound


def _claim_asserts() -> str:
    lines = ['#include "sm90/fwd.cu"']
    for old, limit in ((0, 0), (0, 5), (4, 5), (5, 5), (6, 5), (2**31 - 2, 2**31 - 2),
                       (7, 2**31 - 2)):
        c = [old]
        atom_inc(c, limit)
        lines.append(f"static_assert(dm::atom_inc_next({old}u, {limit}u) == {c[0]}u);")
    for claim, grid, n in ((0, 132, 1024), (891, 132, 1024), (892, 132, 1024), (0, 5, 3),
                           (2**31 - 2, 2**31 - 1, 2**31 - 1), (0, 1, 1)):
        lines.append(f"static_assert(dm::claimed_item({claim}u, {grid}u, {n}) == "
                     f"{claimed_item(claim, grid, n)});")
    return "\n".join(lines) + "\n"


def test_kernel_claim_arithmetic_equals_the_model():
    compile_static_asserts(_claim_asserts(), "sm90_sched_check.cu")


# --- the host half per schedule --------------------------------------------------------------

def test_schedule_define_and_grid(monkeypatch):
    monkeypatch.delenv("DMATTN_NVRTC_DEFINES", raising=False)  # the default: dynamic
    assert f90.schedule() == 2 and f90.launch_ctas(1000, 132) == 132
    assert f90.counter_offset() == f90.COUNTER_OFFSET
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_PERSISTENT=0")
    assert f90.schedule() == 0 and f90.launch_ctas(1000, 132) == 1000
    assert f90.counter_offset() is None
    for mode in (1, 2):
        monkeypatch.setenv("DMATTN_NVRTC_DEFINES", f"DM_SM90_PERSISTENT={mode}")
        assert f90.launch_ctas(1000, 132) == 132 and f90.launch_ctas(7, 132) == 7
        assert f90.counter_offset() == (f90.COUNTER_OFFSET if mode == 2 else None)
        monkeypatch.setenv("DMATTN_NVRTC_DEFINES",
                           f"DM_SM90_PERSISTENT={mode} DM_SM90_MAX_CTAS=3")
        assert f90.launch_ctas(1000, 132) == 3 and f90.launch_ctas(2, 132) == 2
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_PERSISTENT=3")
    with pytest.raises(ValueError, match="DM_SM90_PERSISTENT must be one of"):
        f90.launch_ctas(10, 132)


def test_dynamic_schedule_shared_memory_equals_the_kernel(monkeypatch):
    """Each stage's item index (16 bytes) under DM_SM90_PERSISTENT=2: host and kernel agree for
    every tile, and the largest still fits. The other schedules also drop DM_SM90_MB_FOLD's
    and the pack warps' per-stage barrier (both run under the dynamic schedule only)."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_PERSISTENT=2")
    lines = ['#include "sm90/fwd.cu"', "static_assert(dm::kDynamicItems);"]
    dynamic, stage_bars2 = {}, {}
    for (hd, mask, bias), (bn, st) in f90.TILES.items():
        smem = dynamic[hd, mask, bias] = f90.smem_bytes(hd, bn, st, mask, bias)
        stage_bars2[hd, mask, bias] = 8 * st if f90.fold_bias(bn, mask, bias) \
            or f90.pack_warps(mask, bias) else 0
        assert smem <= f90.SMEM_LIMIT
        lines.append(f"static_assert(dm::Sm90FwdSmem<{hd}, {bn}, {st}, {str(mask).lower()}, "
                     f"{str(bias).lower()}>::kAlloc == {smem});")
    # NVRTC has no constant offsetof: the fields' order (a designated initializer over all of
    # them) and sizes put the counter right after 5 maps and 8 ints
    names = ["q", "k", "v", "mask", "bias", *f90._ARG_INTS, "item_counter", "item_order", "pad"]
    lines.append("__device__ void order_check() { dm::Sm90FwdArgs a{"
                 + ", ".join(f".{n} = {{}}" for n in names) + "}; (void)a; }")
    lines.append(f"static_assert(5 * sizeof(dm::sm90::TmaDesc) + {len(f90._ARG_INTS)} * "
                 f"sizeof(int32_t) == {f90.COUNTER_OFFSET} && "
                 "sizeof(dm::Sm90FwdArgs::item_counter) == 8);")
    lines.append(f"static_assert({f90.COUNTER_OFFSET} + 8 == {f90.ORDER_OFFSET} && "
                 "sizeof(dm::Sm90FwdArgs::item_order) == 8 && "
                 f"dm::kItemOrderGroup == {f90.ORDER_GROUP});")
    compile_static_asserts("\n".join(lines) + "\n", "sm90_sched_smem.cu",
                           ("DM_SM90_PERSISTENT=2",))
    monkeypatch.delenv("DMATTN_NVRTC_DEFINES")   # the default is the dynamic schedule
    for (hd, mask, bias), (bn, st) in f90.TILES.items():
        assert f90.smem_bytes(hd, bn, st, mask, bias) == dynamic[hd, mask, bias]
    assert any(stage_bars2.values())
    for mode in (0, 1):  # the other schedules: no item indices, no fold barriers
        monkeypatch.setenv("DMATTN_NVRTC_DEFINES", f"DM_SM90_PERSISTENT={mode}")
        for key, (bn, st) in f90.TILES.items():
            assert f90.smem_bytes(key[0], bn, st, *key[1:]) == dynamic[key] - 16 - stage_bars2[key]


def test_args_record_has_the_counter_slot():
    assert f90.ARGS_DTYPE.itemsize == 704
    assert f90.ARGS_DTYPE.fields["item_counter"][1] == f90.COUNTER_OFFSET
    assert f90.ARGS_DTYPE.fields["item_counter"][0] == np.uint64
    assert f90.ARGS_DTYPE.fields["item_order"][1] == f90.ORDER_OFFSET
    assert f90.ARGS_DTYPE.fields["item_order"][0] == np.uint64


def test_item_order_only_for_block_lists_of_fixed_lengths_without_a_window(monkeypatch):
    """forward_sm90.item_order_items: block lists, fixed lengths, no causal/window edge and
    the dynamic schedule rank the items (one per 128 query rows, head and batch); otherwise,
    or with DMATTN_SM90_FWD_ORDER=0, the kernel keeps its own order (0)."""
    monkeypatch.delenv("DMATTN_SM90_FWD_ORDER", raising=False)
    monkeypatch.delenv("DMATTN_NVRTC_DEFINES", raising=False)
    args = (300, 4, 2, False, (-1, -1), True)   # Sq 300: 3 items per head and batch
    assert f90.item_order_items(*args) == 3 * 4 * 2
    assert f90.item_order_items(300, 4, 2, False, (-1, -1), False) == 0   # no lists
    assert f90.item_order_items(300, 4, 2, True, (-1, -1), True) == 0     # varlen
    assert f90.item_order_items(300, 4, 2, False, (-1, 0), True) == 0     # causal
    assert f90.item_order_items(300, 4, 2, False, (90, 40), True) == 0    # a window
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_PERSISTENT=1")
    assert f90.item_order_items(*args) == 0                                # static schedule
    monkeypatch.delenv("DMATTN_NVRTC_DEFINES")
    monkeypatch.setenv("DMATTN_SM90_FWD_ORDER", "0")
    assert f90.item_order_items(*args) == 0


def _rank_model(counts: list[int]) -> list[int]:
    """flash_fwd_sparse_order_kernel on the CPU: per group of ORDER_GROUP items, item i goes
    to position first + (the group's items with more blocks, or as many and before i)."""
    order = [0] * len(counts)
    for first in range(0, len(counts), f90.ORDER_GROUP):
        grp = counts[first:first + f90.ORDER_GROUP]
        for t, c in enumerate(grp):
            rank = sum(x > c or (x == c and j < t) for j, x in enumerate(grp))
            order[first + rank] = first + t
    return order


def test_item_order_rank_is_a_permutation_longest_first_per_group():
    rng = np.random.default_rng(3)
    for n in (1, 127, 128, 129, 300, 1024):
        counts = list(rng.binomial(63, 0.1, n) + 1)
        order = _rank_model(counts)
        assert sorted(order) == list(range(n))
        for first in range(0, n, f90.ORDER_GROUP):
            grp = order[first:first + f90.ORDER_GROUP]
            assert all(first <= i < first + f90.ORDER_GROUP for i in grp)
            keys = [(-counts[i], i) for i in grp]
            assert keys == sorted(keys)
