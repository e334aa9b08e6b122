"""The hand-off of cuda_src/sm90/bwd.cu's producer warpgroup and consumers, modelled on the CPU:
per-thread roles (the kernel's sm90_bwd_role, tied to this model by NVRTC static_asserts),
mbarrier phases (init count, arrivals, expect_tx bytes landing later, try_wait.parity), full-
warp ballots and the consumers' named barrier, run under many random interleavings.

What it catches: the mask path as merged (72819f4) dispatched the producer with
``if (warp == 0 && lane == 0) ... else if (warp == 1) ... else if (kHasMask)``, so warp 0's
lanes 1-31 also ran the mask transpose: their __ballot_sync(0xffffffff) named lane 0 (busy
issuing TMA, later exited) and they added 31 arrivals per item to a full barrier counting 97.
Every masked case hung on the H200; the model deadlocks on that dispatch for every schedule
(and still hangs or hands over stages early under looser ballot semantics) and completes on
the fixed one. Without a mask both dispatches are the same (unmasked runs
passed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy.compile import cuda_src_dir

IDLE, TMA, LSE_ROWS, MASK_ROWS = 0, 1, 2, 3  # bwd.cu's Sm90BwdRole
STAGES = 2
BALLOTS_PER_ITEM = 2  # the kernel has 8 x 16; the structure, not the count, matters here


def role_fixed(warp: int, lane: int, has_mask: bool) -> int:
    """bwd.cu's sm90_bwd_role (static_asserts below)."""
    if warp == 0:
        return TMA if lane == 0 else IDLE
    if warp == 1:
        return LSE_ROWS
    return MASK_ROWS if has_mask and warp in (2, 3) else IDLE


def role_as_merged(warp: int, lane: int, has_mask: bool) -> int:
    """The dispatch of 72819f4: warp 0's lanes 1-31 fall through to the mask branch."""
    if warp == 0 and lane == 0:
        return TMA
    if warp == 1:
        return LSE_ROWS
    return MASK_ROWS if has_mask else IDLE


@dataclass
class MBarrier:
    count: int
    pending: int = 0
    tx: int = 0
    phase: int = 0

    def __post_init__(self) -> None:
        self.pending = self.count

    def arrive(self, expect_tx: int = 0) -> None:
        if self.pending == 0:  # the phase waits on bytes only: an arrival too many
            raise OverArrival
        self.tx += expect_tx
        self.pending -= 1
        self._maybe_complete()

    def complete_tx(self, nbytes: int) -> None:
        self.tx -= nbytes
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def passed(self, parity: int) -> bool:
        """mbarrier.try_wait.parity: the phase of that parity has completed."""
        return (self.phase & 1) != parity


class OverArrival(Exception):
    pass


@dataclass
class World:
    roles: list[int]
    has_mask: bool
    n_items: int
    dropped: frozenset
    bars: dict = field(default_factory=dict)
    stamps: dict = field(default_factory=dict)  # (stage, writer) -> item whose data is there
    tma_events: list = field(default_factory=list)  # (barrier, bytes, stage, item) in flight
    early: bool = False  # a consumer passed a full barrier before its item's data


def _producer(world: World, tid: int):
    warp = tid // 32
    role = world.roles[tid]
    if role == IDLE:
        return
    if role == TMA:
        world.bars["kv"].arrive(expect_tx=1)
        world.tma_events.append(("kv", 1, None, None))
    for i in range(world.n_items):
        s = i % STAGES
        yield ("wait", f"empty{s}", ((i // STAGES) & 1) ^ 1)
        if role == TMA:
            world.bars[f"full{s}"].arrive(expect_tx=3)
            world.tma_events.append((f"full{s}", 3, s, i))
        elif role == LSE_ROWS:
            world.stamps[(s, tid)] = i
            world.bars[f"full{s}"].arrive()
        else:  # the mask transpose: full-warp ballots, then the words and flags
            for k in range(BALLOTS_PER_ITEM):
                yield ("ballot", warp, i * BALLOTS_PER_ITEM + k)
            world.stamps[(s, tid)] = i
            world.bars[f"full{s}"].arrive()


def _consumer_warp(world: World, cw: int):
    yield ("wait", "kv", 0)
    for i in range(world.n_items):
        s = i % STAGES
        yield ("wait", f"full{s}", (i // STAGES) & 1)
        # the stage must hold item i: TMA bytes, warp 1's rows, warps 2-3's words
        writers = [t for t in range(128) if 32 <= t and world.roles[t] in (LSE_ROWS, MASK_ROWS)]
        if world.stamps.get((s, "tma")) != i or any(world.stamps.get((s, t)) != i
                                                     for t in writers):
            world.early = True
        if i in world.dropped:  # both consumers see the same flags: released at once
            world.bars[f"empty{s}"].arrive()
            continue
        yield ("bar", 1, 256)  # dS^T written: both consumers
        yield ("bar", 1, 256)
        world.bars[f"empty{s}"].arrive()


def simulate(role_fn, has_mask: bool, n_items: int, seed: int, dropped=(),
             ballot: str = "strict") -> str:
    """Runs one random interleaving: "ok", "deadlock" (some thread never finishes),
    "over-arrival" or "early" (every thread finished, but a consumer passed a full barrier
    before its item's data). ballot: who a __ballot_sync(0xffffffff) waits for: "strict" all
    32 lanes (the CUDA contract), "exited" the lanes that have not exited, "role" only the
    lanes of the warp that share the caller's role (as if it did not synchronize at all)."""
    roles = [role_fn(t // 32, t % 32, has_mask) for t in range(128)]
    n_full = sum(r != IDLE for r in role_fixed_table(has_mask))  # the kernel's init count
    world = World(roles, has_mask, n_items, frozenset(dropped))
    world.bars = {"kv": MBarrier(1)}
    for s in range(STAGES):
        world.bars[f"full{s}"] = MBarrier(n_full)
        world.bars[f"empty{s}"] = MBarrier(8)
    rng = random.Random(seed)
    threads: dict = {}
    try:
        for t in range(128):
            threads[("p", t)] = _producer(world, t)
        for cw in range(8):
            threads[("c", cw)] = _consumer_warp(world, cw)
        state: dict = {}  # thread -> the op it is blocked on (None: runnable)

        def step(key) -> None:
            try:
                state[key] = next(threads[key])
            except StopIteration:
                state[key] = "done"

        for key in list(threads):
            step(key)
        while True:
            runnable = []
            for key, op in state.items():
                if op == "done":
                    continue
                if op[0] == "wait" and world.bars[op[1]].passed(op[2]):
                    runnable.append([key])
            ballots: dict = {}
            for key, op in state.items():
                if op != "done" and op[0] == "ballot":
                    ballots.setdefault((op[1], op[2]), []).append(key)
            for (warp, _), keys in ballots.items():
                lanes = {k[1] % 32 for k in keys}
                role = roles[keys[0][1]]
                if ballot == "strict":
                    need = set(range(32))
                elif ballot == "exited":
                    need = {x for x in range(32) if state[("p", 32 * warp + x)] != "done"}
                else:
                    need = {x for x in range(32) if roles[32 * warp + x] == role}
                if lanes == need:
                    runnable.append(keys)
            at_bar = [k for k, op in state.items() if op != "done" and op[0] == "bar"]
            if len(at_bar) * 32 >= 256:
                runnable.append(at_bar)
            events = [("tma", j) for j in range(len(world.tma_events))]
            choices = runnable + events
            if not choices:
                if not all(op == "done" for op in state.values()):
                    return "deadlock"
                return "early" if world.early else "ok"
            pick = rng.choice(choices)
            if isinstance(pick, tuple):
                bar, nbytes, s, i = world.tma_events.pop(pick[1])
                if s is not None:
                    world.stamps[(s, "tma")] = i
                world.bars[bar].complete_tx(nbytes)
            else:
                for key in pick:
                    step(key)
    except OverArrival:
        return "over-arrival"


def role_fixed_table(has_mask: bool) -> list[int]:
    return [role_fixed(t // 32, t % 32, has_mask) for t in range(128)]


def test_role_table_and_full_count_equal_the_kernel():
    lines = ['#include "sm90/bwd.cu"']
    for has_mask in (False, True):
        m = str(has_mask).lower()
        for w in range(4):
            for lane in range(32):
                lines.append(f"static_assert(dm::sm90_bwd_role({w}, {lane}, {m}) == "
                             f"{role_fixed(w, lane, has_mask)});")
        n = sum(r != IDLE for r in role_fixed_table(has_mask))
        lines.append(f"static_assert(dm::sm90_bwd_full_arrivals({m}) == {n});")
    compile_static_asserts("\n".join(lines) + "\n", "sm90_bwd_roles_check.cu")


def test_kernel_dispatches_on_the_role():
    """The producer's branches test sm90_bwd_role's value, not warp/lane directly."""
    src = (cuda_src_dir() / "sm90" / "bwd.cu").read_text()
    prod = src[src.index("// ---------------------------------------------------------"
                         "---- producer"):src.index("// ---------------------------------"
                                                    "--------------------------------------"
                                                    "------- consumers")]
    assert "const int role = sm90_bwd_role(warp, lane, kHasMask);" in prod
    assert "if (role == kBwdTma)" in prod
    assert "else if (role == kBwdLseRows)" in prod
    assert "else if (kHasMask && role == kBwdMaskRows)" in prod
    assert "mbar_init(bar_full(s), sm90_bwd_full_arrivals(kHasMask));" in src


def test_roles_hold_whole_warps_and_count_97_with_a_mask():
    for has_mask, n in ((False, 33), (True, 97)):
        table = role_fixed_table(has_mask)
        assert sum(r != IDLE for r in table) == n
        for w in range(4):
            lanes = table[32 * w:32 * w + 32]
            if any(r in (LSE_ROWS, MASK_ROWS) for r in lanes):
                assert len(set(lanes)) == 1


@pytest.mark.parametrize("has_mask", [False, True])
@pytest.mark.parametrize("n_items", [1, 2, 3, 5])
def test_fixed_dispatch_completes_under_any_interleaving(has_mask, n_items):
    drops = [(), (0,), tuple(range(n_items)), (n_items - 1,)] if has_mask else [()]
    for seed in range(6):
        for dropped in drops:
            assert simulate(role_fixed, has_mask, n_items, seed, dropped) == "ok"


@pytest.mark.parametrize("n_items", [1, 2, 3, 5])
def test_merged_dispatch_never_completes_with_a_mask(n_items):
    """Under the CUDA contract (a full-mask ballot waits for all 32 lanes) every schedule
    hangs: lane 0 never reaches the ghosts' ballots."""
    for seed in range(6):
        assert simulate(role_as_merged, True, n_items, seed, ballot="strict") == "deadlock"


@pytest.mark.parametrize("n_items", [4, 8])
def test_merged_dispatch_fails_under_looser_ballots(n_items):
    """If exited lanes released the ballot, the ghosts run after lane 0 has left and wait on
    an empty-barrier parity that has already flipped (a hang from 4 items on); if the ballots
    did not wait at all, their 31 arrivals per item complete full phases before the item's
    data (or arrive too many)."""
    for seed in range(6):
        assert simulate(role_as_merged, True, n_items, seed, ballot="exited") == "deadlock"
    assert [simulate(role_as_merged, True, n_items, seed, ballot="role")
            for seed in range(6)].count("ok") <= 1


@pytest.mark.parametrize("ballot", ["strict", "exited", "role"])
def test_fixed_dispatch_completes_under_every_ballot_model(ballot):
    for n_items in (1, 3, 6):
        for seed in range(3):
            assert simulate(role_fixed, True, n_items, seed, ballot=ballot) == "ok"


def test_merged_dispatch_equals_the_fixed_one_without_a_mask():
    for t in range(128):
        assert role_as_merged(t // 32, t % 32, False) == role_fixed(t // 32, t % 32, False)
