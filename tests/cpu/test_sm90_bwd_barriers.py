"""The hand-offs of cuda_src/sm90/bwd.cu, modelled on the CPU and run under many random
interleavings: per-thread producer roles (the kernel's sm90_bwd_role, tied to this model by
NVRTC static_asserts), mbarrier phases (init count, arrivals, expect_tx bytes landing later,
try_wait.parity), full-warp ballots, the consumers' named barrier, the dQ writer's ring
(DM_SM90_BWD_DQ_WRITER: slots with full/empty mbarriers, a "nothing to add" word for dropped
tiles, bulk adds that read the slot and complete later), and the deterministic mode's turns
across CTAs (per (head, query tile) counters in global memory, positions from an atomic
ticket, a limited number of resident CTAs), and block lists: every producer role and the
writer walk the listed items only, the consumers take each item from its stage (the TMA
leader's word; -1 after the last item, with every producer thread's arrivals), without the
writer the lse rows warp puts each item's turn target in the stage, and a target counts only
the listed key tiles before this one.

What it catches:
- the mask path as merged (72819f4) dispatched the producer with
  ``if (warp == 0 && lane == 0) ... else if (warp == 1) ... else if (kHasMask)``, so warp 0's
  lanes 1-31 also ran the mask transpose: their __ballot_sync(0xffffffff) named lane 0 (busy
  issuing TMA, later exited) and they added 31 arrivals per item to a full barrier counting
  97. Every masked case hung on the H200; the model deadlocks on that dispatch for every
  schedule (and still hangs or hands over stages early under looser ballot semantics) and
  completes on the fixed one. Without a mask both dispatches are the same (unmasked runs
  passed).
- with the dQ writer: a turn target counted per dQ warp while the writer adds one per item, a
  dropped tile that bypasses the ring, a slot freed before its adds have read it, a full
  count that is not the number of dQ warps, a dropped tile that passes its turn without
  waiting for it or a turn passed before the adds land (out-of-order adds), positions taken
  from blockIdx instead of the ticket: each variant fails here, the kernel's protocol does
  not (with and without the writer).
- with block lists: a target that counts unlisted key tiles, a walk without the end marker, a
  writer that walks unlisted items, a stage's target read after the stage was released.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy.compile import cuda_src_dir

# bwd.cu's Sm90BwdRole
IDLE, TMA, LSE_ROWS, MASK_WORDS, DQ_WRITER, LOADS = 0, 1, 2, 3, 4, 5
STAGES = 2
BALLOTS_PER_ITEM = 2  # the kernel has 8 x 16; the structure, not the count, matters here


def role_fixed(warp: int, lane: int, has_mask: bool, dq_writer: bool = False,
               writers: int = 1) -> int:
    """bwd.cu's sm90_bwd_role (static_asserts below). With the dQ writer, warp 0 loads (lane
    0 the TMA, every lane its lse rows) and warp 1 writes dQ; writers=2 (the kernel's
    DM_SM90_BWD_DQ_WRITERS, with two slots, or one shared in turn by default:
    DM_SM90_BWD_DQ_SHARED_SLOT, and no mask): warp 2 writes dQ too."""
    if writers == 2:
        assert dq_writer and not has_mask
        if warp == 2:
            return DQ_WRITER
    if dq_writer:
        if warp == 0:
            return LOADS
        if warp == 1:
            return DQ_WRITER
        return MASK_WORDS if has_mask else IDLE
    if warp == 0:
        return TMA if lane == 0 else IDLE
    if warp == 1:
        return LSE_ROWS
    return MASK_WORDS if has_mask and warp in (2, 3) else IDLE


def role_as_merged(warp: int, lane: int, has_mask: bool, dq_writer: bool = False,
                   writers: int = 1) -> int:
    """The dispatch of 72819f4: warp 0's lanes 1-31 fall through to the mask branch."""
    if warp == 0 and lane == 0:
        return TMA
    if warp == 1:
        return LSE_ROWS
    return MASK_WORDS if has_mask else IDLE


def full_arrivals(role: int, lane: int) -> int:
    """bwd.cu's sm90_bwd_role_full_arrivals: a producer thread's arrivals per item."""
    if role in (TMA, LSE_ROWS, MASK_WORDS):
        return 1
    return 1 + (lane == 0) if role == LOADS else 0


def role_fixed_table(has_mask: bool, dq_writer: bool = False) -> list[int]:
    return [role_fixed(t // 32, t % 32, has_mask, dq_writer) for t in range(128)]


def full_count(has_mask: bool, dq_writer: bool = False) -> int:
    """The full barriers' init count (the kernel's sm90_bwd_full_arrivals)."""
    return sum(full_arrivals(r, t % 32)
               for t, r in enumerate(role_fixed_table(has_mask, dq_writer)))


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


@dataclass(frozen=True)
class Variant:
    """The protocol the kernel runs, and knobs that break it (each shown to fail)."""
    dq_writer: bool = False
    head_dim: int = 128             # dQ warps: all 8 at d128, consumer 0's 4 at d64
    slots: int = 2                  # the writer's ring (1 at d128 with a bias tile)
    writers: int = 1                # writer warps: 2 take alternate items (slot = writer)
    shared_slot: bool = False       # two writers on one slot: each first waits for the slot's
    #                                 empty phase of the item before its own (the other's)
    turn_step: int | None = None    # a key tile's increments per item (None: the kernel's)
    dropped_bypass_ring: bool = False  # dropped tiles do not pass the writer's ring
    empty_before_read: bool = False    # the writer frees a slot before its adds read it
    dropped_skip_turn: bool = False    # a dropped tile passes its turn without waiting
    release_before_landing: bool = False  # the turn passes before the adds are in memory
    ticket_positions: bool = True      # positions from the atomic ticket, else blockIdx
    # block lists (sparse walks)
    dense_turn_target: bool = False    # targets count every key tile, listed or not
    no_end_marker: bool = False        # the producer never publishes the walk's end (-1)
    writer_walks_all: bool = False     # the dQ writer walks every item, not the listed ones
    target_after_release: bool = False  # without the writer: the stage's turn target read
    #                                     after the stage went back to the producer
    # the one dS^T buffer, guarded by a barrier before the stores (WAR) and one after them
    ds_no_war_barrier: bool = False    # no barrier before the stores
    release_mid_dq: bool = False       # the stage released while the dQ product still reads
    #                                    dS^T (DM_SM90_BWD_DQ_ATOMIC at d128: after pass 0 of 2)
    dq_product_steps: int = 1          # scheduler steps a dQ product reads dS^T after the
    #                                    first (long against the other warps' control flow)

    @property
    def dq_warps(self) -> int:
        return 8 if self.head_dim == 128 else 4

    @property
    def step(self) -> int:
        """What one key tile adds to a counter per item: 1 (the writer) or one per dQ warp."""
        return 1 if self.dq_writer else self.dq_warps


@dataclass(frozen=True)
class CtaWork:
    """One CTA: its key tile and its items (head, query tile) in order; ``dropped``: item
    indices the mask drops entirely (both consumers read the same flags); ``listed``: the
    item indices whose block the block lists name (None: every item, no lists)."""
    tile: int
    items: tuple[tuple[int, int], ...]
    dropped: frozenset = frozenset()
    listed: frozenset | None = None

    @property
    def walk(self) -> list[int]:
        """The listed items in order: what every role of the kernel walks (next_item_*)."""
        return [i for i in range(len(self.items)) if self.listed is None or i in self.listed]


@dataclass
class Cta:
    work: CtaWork
    roles: list[int]
    bars: dict = field(default_factory=dict)
    stamps: dict = field(default_factory=dict)     # (stage, writer) -> item whose data is there
    dq_stamps: dict = field(default_factory=dict)  # (slot, dQ warp) -> item staged there
    skip: dict = field(default_factory=dict)       # slot -> the "nothing to add" word
    stage_item: dict = field(default_factory=dict)  # stage -> the leader's item (-1: end)
    stage_target: dict = field(default_factory=dict)  # stage -> the lse rows' turn target
    reading: dict = field(default_factory=dict)    # slot or warp -> item its adds still read
    ds_stamps: dict = field(default_factory=dict)  # (dS^T buffer, consumer warp) -> item
    ds_reading: dict = field(default_factory=dict)  # dS^T buffer -> warps whose dQ reads it
    read_done: set = field(default_factory=set)    # (who, item): the adds have read the source
    add_done: set = field(default_factory=set)     # (who, item): the adds are in global memory
    pending: int = 0                               # async events not yet landed


class Outcome(Exception):
    """A protocol failure found while running (the result string)."""


class Sim:
    """One grid: ``works`` in the kernel's linear order (position p runs works[p]), at most
    ``resident`` CTAs at a time, launched in ``launch`` order of block indices."""

    def __init__(self, works: list[CtaWork], variant: Variant, has_mask: bool,
                 deterministic: bool, seed: int, role_fn=role_fixed, ballot: str = "strict",
                 resident: int = 2, n_lo=None):
        self.works, self.v, self.has_mask, self.det = works, variant, has_mask, deterministic
        self.rng = random.Random(seed)
        self.role_fn, self.ballot, self.resident = role_fn, ballot, resident
        self.n_lo = n_lo or (lambda h, m: min(w.tile for w in works if (h, m) in w.items))
        # (head, query tile, key tile) -> listed: what the turn targets count (sp_grid)
        self.listed = {(*w.items[i], w.tile): w.listed is None or i in w.listed
                       for w in works for i in range(len(w.items))}
        self.counters: dict = {}
        self.add_log: dict = {}     # (head, query tile) -> key tiles in the order they landed
        self.adds: list = []        # (head, query tile, key tile) of each item's adds
        self.launch = list(range(len(works)))
        self.rng.shuffle(self.launch)  # block indices may start in any order
        self.ticket = 0
        self.ctas: list[Cta] = []
        self.threads: dict = {}
        self.state: dict = {}
        self.events: list = []      # (cta, kind, payload)
        self.early = False

    # ------------------------------------------------------------------ CTA threads
    def _start(self) -> None:
        block = self.launch.pop(0)
        pos = self.ticket if self.v.ticket_positions else block
        self.ticket += 1
        roles = [self.role_fn(t // 32, t % 32, self.has_mask, self.v.dq_writer, self.v.writers)
                 for t in range(128)]
        cta = Cta(self.works[pos], roles)
        n = len(self.ctas)
        self.ctas.append(cta)
        cta.bars = {"kv": MBarrier(1)}
        for s in range(STAGES):
            cta.bars[f"full{s}"] = MBarrier(full_count(self.has_mask, self.v.dq_writer))
            cta.bars[f"empty{s}"] = MBarrier(8)
        if self.v.dq_writer:
            for k in range(self.v.slots):
                cta.bars[f"dqfull{k}"] = MBarrier(self.v.dq_warps)
                cta.bars[f"dqempty{k}"] = MBarrier(1)
        for t in range(128):
            self._spawn((n, "p", t), self._producer(n, t))
        for cw in range(8):
            self._spawn((n, "c", cw), self._consumer(n, cw))
        if self.v.dq_writer:
            for wi in range(self.v.writers):
                self._spawn((n, "w", wi), self._writer(n, wi))

    def _spawn(self, key, gen) -> None:
        self.threads[key] = gen
        self._step(key)

    def _step(self, key) -> None:
        try:
            self.state[key] = next(self.threads[key])
        except StopIteration:
            self.state[key] = "done"

    def _producer(self, n: int, tid: int):
        cta = self.ctas[n]
        warp, lane, role = tid // 32, tid % 32, cta.roles[tid]
        if role in (IDLE, DQ_WRITER):
            return
        leader = role == TMA or (role == LOADS and lane == 0)
        if leader:
            cta.bars["kv"].arrive(expect_tx=1)
            self._event(n, "tma", ("kv", 1, None, None))
        walk = cta.work.walk
        for j, i in enumerate(walk):  # the j-th listed item: stage j % STAGES
            s = j % STAGES
            yield ("wait", cta.bars[f"empty{s}"], ((j // STAGES) & 1) ^ 1)
            if leader:  # names the item (stage_item), then arrives with the bytes
                cta.stage_item[s] = i
                cta.bars[f"full{s}"].arrive(expect_tx=3)
                self._event(n, "tma", (f"full{s}", 3, s, i))
            if role == MASK_WORDS:  # the transpose: full-warp ballots, then words and flags
                for k in range(BALLOTS_PER_ITEM):
                    yield ("ballot", (n, warp, j * BALLOTS_PER_ITEM + k))
            if role == LSE_ROWS and lane == 0 and self.det:  # the consumers' turn target
                cta.stage_target[s] = self._turn(n, i)
            if role in (LSE_ROWS, MASK_WORDS, LOADS):
                cta.stamps[(s, tid)] = i
                cta.bars[f"full{s}"].arrive()
        if self.v.no_end_marker:
            return
        # end_walk: the next stage once free, the end marker, this thread's usual arrivals
        s = len(walk) % STAGES
        yield ("wait", cta.bars[f"empty{s}"], ((len(walk) // STAGES) & 1) ^ 1)
        if leader:
            cta.stage_item[s] = -1
        for _ in range(full_arrivals(role, lane)):
            cta.bars[f"full{s}"].arrive()

    def _turn(self, n: int, i: int):
        """The counter of item i and the count at which this CTA's key tile may add: the
        listed key tiles n_lo .. tile - 1 of its query tile (dq_counter), each adding step."""
        cta = self.ctas[n]
        h, m = cta.work.items[i]
        step = self.v.turn_step or self.v.step
        before = range(self.n_lo(h, m), cta.work.tile)
        if not self.v.dense_turn_target:
            before = [t for t in before if self.listed.get((h, m, t), False)]
        return (h, m), len(before) * step

    def _consumer(self, n: int, cw: int):
        cta = self.ctas[n]
        dq_warp = cw < self.v.dq_warps
        yield ("wait", cta.bars["kv"], 0)
        for j in itertools.count():  # the walk's position; the item comes with the stage
            s = j % STAGES
            yield ("wait", cta.bars[f"full{s}"], (j // STAGES) & 1)
            i = cta.stage_item.get(s)
            if i == -1:
                break
            # the stage must hold item i: TMA bytes, the lse rows, the mask words
            writers = [t for t in range(128) if full_arrivals(cta.roles[t], t % 32) and
                       cta.roles[t] != TMA]
            if cta.stamps.get((s, "tma")) != i or any(cta.stamps.get((s, t)) != i
                                                       for t in writers):
                self.early = True
            if i in cta.work.dropped:
                turn = self._stage_turn(n, s)
                cta.bars[f"empty{s}"].arrive()
                if dq_warp:
                    yield from self._dq_dropped(n, cw, i, j, turn)
                continue
            yield from self._ds_and_dq_product(n, cw, i, dq_warp, s)
            turn = self._stage_turn(n, s)
            if not (self.v.release_mid_dq and dq_warp):
                cta.bars[f"empty{s}"].arrive()
            if dq_warp:
                yield from self._dq_add(n, cw, i, j, turn)
        if not self.v.dq_writer and dq_warp:  # bulk_wait_group 0 before the CTA exits
            added = [x for x in cta.work.walk if x not in cta.work.dropped]
            yield ("until", lambda: all((cw, x) in cta.add_done for x in added))

    def _ds_and_dq_product(self, n: int, cw: int, i: int, dq_warp: bool, s: int):
        """This warp's dS^T stores into the buffer (after the barrier that says every dQ
        product has read it), the barrier after the stores, then (a dQ warp) its dQ product,
        which reads every consumer warp's part of the buffer until its wgmma_wait: a store
        while a product reads the buffer is "ds-clobbered". The stage is released after the
        product (release_mid_dq: while it still reads)."""
        cta = self.ctas[n]
        b = 0  # the one buffer
        if not self.v.ds_no_war_barrier:
            yield ("bar", (n, 1), 256)
        if cta.ds_reading.get(b):
            raise Outcome("ds-clobbered")
        cta.ds_stamps[(b, cw)] = i
        yield ("bar", (n, 1), 256)  # dS^T written: both consumers
        if not dq_warp:
            return
        if any(cta.ds_stamps.get((b, w)) != i for w in range(8)):
            self.early = True
        cta.ds_reading.setdefault(b, set()).add(cw)
        yield ("step",)  # the dQ wgmma runs (long against the other warps' control flow)
        if self.v.release_mid_dq:
            cta.bars[f"empty{s}"].arrive()
        for _ in range(self.v.dq_product_steps):
            yield ("step",)
        cta.ds_reading[b].discard(cw)  # wgmma_wait<0>

    def _stage_turn(self, n: int, s: int):
        """Without the writer: the stage's turn target (word 2, the lse rows'), read before the
        stage is released (or, broken, a callable reading it later)."""
        cta = self.ctas[n]
        if self.v.dq_writer or not self.det:
            return None
        if self.v.target_after_release:
            return lambda: cta.stage_target.get(s)
        return cta.stage_target.get(s)

    def _dq_add(self, n: int, cw: int, i: int, j: int, turn=None):
        cta = self.ctas[n]
        if self.v.dq_writer:  # stage into slot k once the writer's adds have read it
            k = j % self.v.slots
            yield ("wait", cta.bars[f"dqempty{k}"], ((j // self.v.slots) & 1) ^ 1)
            if k in cta.reading:
                raise Outcome("clobbered")
            cta.dq_stamps[(k, cw)] = i
            if cw == 0:
                cta.skip[k] = False
            cta.bars[f"dqfull{k}"].arrive()
            return
        # without the writer: this warp's own buffer, its lane 0's adds and turn
        prev = [x for x in cta.work.walk if x < i and x not in cta.work.dropped]
        if prev:  # bulk_wait_group.read 0 before restaging
            yield ("until", lambda: (cw, prev[-1]) in cta.read_done)
        cta.dq_stamps[(cw, cw)] = i
        yield ("step",)  # the staging stores
        key, target = turn() if callable(turn) else turn or self._turn(n, i)
        if self.det:
            yield ("until", lambda: self.counters.get(key, 0) >= target)
        self._issue_adds(n, cw, i, [(cw, cw)])
        if self.det:
            yield ("until", lambda: (cw, i) in cta.add_done)
            self.counters[key] = self.counters.get(key, 0) + 1

    def _dq_dropped(self, n: int, cw: int, i: int, j: int, turn=None):
        cta = self.ctas[n]
        if self.v.dq_writer:
            if self.v.dropped_bypass_ring:
                return
            k = j % self.v.slots
            yield ("wait", cta.bars[f"dqempty{k}"], ((j // self.v.slots) & 1) ^ 1)
            if cw == 0:
                cta.skip[k] = True
            cta.bars[f"dqfull{k}"].arrive()
            return
        yield ("step",)
        key, target = turn() if callable(turn) else turn or self._turn(n, i)
        if self.det:
            yield ("until", lambda: self.counters.get(key, 0) >= target)
            self.counters[key] = self.counters.get(key, 0) + 1

    def _writer(self, n: int, wi: int = 0):
        """Writer warp wi (of Variant.writers) over the walk's items j with j % writers == wi."""
        cta = self.ctas[n]
        walk = range(len(cta.work.items)) if self.v.writer_walks_all else cta.work.walk
        for j, i in enumerate(walk):  # its own scan of the lists: slot j % slots
            if j % self.v.writers != wi:
                continue
            k = j % self.v.slots
            if self.v.shared_slot and j > 0:  # DM_SM90_BWD_DQ_SHARED_SLOT
                yield ("wait", cta.bars[f"dqempty{k}"], (j - 1) & 1)
            yield ("wait", cta.bars[f"dqfull{k}"], (j // self.v.slots) & 1)
            add = not cta.skip.get(k, False)
            key, target = self._turn(n, i)
            if self.det and (add or not self.v.dropped_skip_turn):
                yield ("until", lambda key=key, target=target: self.counters.get(key, 0) >= target)
            if add:
                if any(cta.dq_stamps.get((k, w)) != i for w in range(self.v.dq_warps)):
                    self.early = True
                self._issue_adds(n, "w", i, [(k, w) for w in range(self.v.dq_warps)], slot=k)
                if not self.v.empty_before_read:
                    yield ("until", lambda i=i: ("w", i) in cta.read_done)
            cta.bars[f"dqempty{k}"].arrive()
            if self.det:
                if add and not self.v.release_before_landing:
                    yield ("until", lambda i=i: ("w", i) in cta.add_done)
                self.counters[key] = self.counters.get(key, 0) + 1
        added = [x for j, x in enumerate(cta.work.walk)
                 if j % self.v.writers == wi and x not in cta.work.dropped]
        yield ("until", lambda: all(("w", x) in cta.add_done for x in added))

    def _issue_adds(self, n: int, who, i: int, sources: list, slot=None) -> None:
        """Bulk adds of item i reading ``sources`` (dq_stamps keys): they read later, then
        land in global memory."""
        cta = self.ctas[n]
        cta.reading[who if slot is None else slot] = i
        self._event(n, "read", (who, i, tuple(sources), slot))

    def _event(self, n: int, kind: str, payload) -> None:
        self.ctas[n].pending += 1
        self.events.append((n, kind, payload))

    def _land(self, j: int) -> None:
        n, kind, payload = self.events.pop(j)
        cta = self.ctas[n]
        cta.pending -= 1
        if kind == "tma":
            bar, nbytes, s, i = payload
            if s is not None:
                cta.stamps[(s, "tma")] = i
            cta.bars[bar].complete_tx(nbytes)
        elif kind == "read":
            who, i, sources, slot = payload
            if any(cta.dq_stamps.get(src) != i for src in sources):
                raise Outcome("clobbered")  # the source changed before the adds read it
            cta.reading.pop(who if slot is None else slot, None)
            cta.read_done.add((who, i))
            self._event(n, "add", (who, i))
        else:
            who, i = payload
            cta.add_done.add((who, i))
            self.add_log.setdefault(cta.work.items[i], []).append(cta.work.tile)
            if who in ("w", 0):  # one entry per (item, key tile): the writer's or warp 0's
                self.adds.append((*cta.work.items[i], cta.work.tile))

    # ------------------------------------------------------------------ scheduler
    def _live(self, n: int) -> bool:
        return self.ctas[n].pending > 0 or any(
            op != "done" for key, op in self.state.items() if key[0] == n)

    def run(self) -> str:
        """"ok", "deadlock" (some thread never finishes), "over-arrival", "early" (a consumer
        passed a full barrier, or the writer a dQ slot, before its item's data), "clobbered" (a
        dQ source changed before its adds read it) or "out-of-order" (deterministic mode: the
        adds into one query tile landed out of key-tile order)."""
        try:
            return self._run()
        except OverArrival:
            return "over-arrival"
        except Outcome as e:
            return str(e)

    def _run(self) -> str:
        while True:
            resident = sum(self._live(n) for n in range(len(self.ctas)))
            choices: list = []
            if self.launch and resident < self.resident:
                choices.append(("launch",))
            groups: dict = {}
            for key, op in self.state.items():
                if op == "done":
                    continue
                if op[0] == "wait" and op[1].passed(op[2]):
                    choices.append([key])
                elif op[0] == "until" and op[1]():
                    choices.append([key])
                elif op[0] == "step":
                    choices.append([key])
                elif op[0] in ("ballot", "bar"):
                    groups.setdefault((op[0], op[1]), []).append(key)
            for (kind, gkey), keys in groups.items():
                if kind == "bar":
                    if len(keys) * 32 >= self.state[keys[0]][2]:
                        choices.append(keys)
                    continue
                n, warp, _ = gkey
                lanes = {k[2] % 32 for k in keys}
                roles = self.ctas[n].roles
                if self.ballot == "strict":
                    need = set(range(32))
                elif self.ballot == "exited":
                    need = {x for x in range(32) if self.state[(n, "p", 32 * warp + x)] != "done"}
                else:
                    need = {x for x in range(32)
                            if roles[32 * warp + x] == roles[keys[0][2]]}
                if lanes == need:
                    choices.append(keys)
            choices += [("event", j) for j in range(len(self.events))]
            if not choices:
                if self.launch or any(op != "done" for op in self.state.values()):
                    return "deadlock"
                if self.early:
                    return "early"
                if self.det and any(log != sorted(log) for log in self.add_log.values()):
                    return "out-of-order"
                want = sorted((*w.items[i], w.tile) for w in self.works for i in w.walk
                              if i not in w.dropped)
                if sorted(self.adds) != want:  # each listed, kept item adds exactly once
                    return "wrong-adds"
                return "ok"
            pick = self.rng.choice(choices)
            if isinstance(pick, tuple):
                if pick[0] == "launch":
                    self._start()
                else:
                    self._land(pick[1])
            else:
                for key in pick:
                    self._step(key)


def simulate(role_fn, has_mask: bool, n_items: int, seed: int, dropped=(),
             ballot: str = "strict", variant: Variant = Variant()) -> str:
    """One CTA (key tile 0) over n_items query tiles of one head, default mode: see Sim.run.
    ballot: who a __ballot_sync(0xffffffff) waits for: "strict" all 32 lanes (the CUDA
    contract), "exited" the lanes that have not exited, "role" only the lanes of the warp that
    share the caller's role (as if it did not synchronize at all)."""
    work = CtaWork(0, tuple((0, m) for m in range(n_items)), frozenset(dropped))
    return Sim([work], variant, has_mask, False, seed, role_fn, ballot, resident=1).run()


def grid(pattern: str, tiles: int, heads: int, drop: float, seed: int,
         unlisted: float = 0.0) -> tuple[list, object]:
    """CtaWorks in the kernel's linear order and n_lo: key tile n sees query tiles m of a
    window ("full": all; "causal": m >= n, key-tile-major positions as bwd.cu remaps a
    right-limited window; "band": |m - n| <= 1); a random share ``drop`` of items dropped;
    with ``unlisted`` > 0 block lists, a random share of the items not listed."""
    rng = random.Random(seed)

    def visits(n: int) -> range:
        if pattern == "full":
            return range(tiles)
        if pattern == "causal":
            return range(n, tiles)
        return range(max(0, n - 1), min(tiles, n + 2))

    order = [(n, h) for n in range(tiles) for h in range(heads)] if pattern == "causal" else \
        [(n, h) for h in range(heads) for n in range(tiles)]
    works = []
    for n, h in order:
        items = tuple((h, m) for m in visits(n))
        dropped = frozenset(i for i in range(len(items)) if rng.random() < drop)
        listed = None if unlisted <= 0 else frozenset(
            i for i in range(len(items)) if rng.random() >= unlisted)
        works.append(CtaWork(n, items, dropped, listed))

    def n_lo(h: int, m: int) -> int:  # bwd.cu: key_range(tile m's rows).k_begin / kBlockN
        return {"full": 0, "causal": 0, "band": max(0, m - 1)}[pattern]

    return works, n_lo


def run_grid(variant: Variant, pattern: str, seed: int, has_mask: bool = True,
             tiles: int = 3, heads: int = 2, drop: float = 0.3, resident: int = 2,
             unlisted: float = 0.0) -> str:
    works, n_lo = grid(pattern, tiles, heads, drop if has_mask else 0.0, seed, unlisted)
    return Sim(works, variant, has_mask, True, seed, resident=resident, n_lo=n_lo).run()


# ---------------------------------------------------------------------- the role table
def test_role_table_and_full_count_equal_the_kernel():
    lines = ['#include "sm90/bwd.cu"']
    for writer in (False, True):
        w = str(writer).lower()
        for has_mask in (False, True):
            m = str(has_mask).lower()
            for warp in range(4):
                for lane in range(32):
                    role = role_fixed(warp, lane, has_mask, writer)
                    lines.append(f"static_assert(dm::sm90_bwd_role({warp}, {lane}, {m}, {w}) == "
                                 f"{role});")
                    lines.append(f"static_assert(dm::sm90_bwd_role_full_arrivals({role}, {lane}) "
                                 f"== {full_arrivals(role, lane)});")
            lines.append(f"static_assert(dm::sm90_bwd_full_arrivals({m}, {w}) == "
                         f"{full_count(has_mask, writer)});")
    # DM_SM90_BWD_DQ_WRITERS: the kernel passes writers = 2 with the writer and no mask only
    for warp in range(4):
        for lane in range(32):
            lines.append(f"static_assert(dm::sm90_bwd_role({warp}, {lane}, false, true, 2) == "
                         f"{role_fixed(warp, lane, False, True, writers=2)});")
    for name, value in (("kBwdIdle", IDLE), ("kBwdTma", TMA), ("kBwdLseRows", LSE_ROWS),
                        ("kBwdMaskWords", MASK_WORDS), ("kBwdDqWriter", DQ_WRITER),
                        ("kBwdLoads", LOADS)):
        lines.append(f"static_assert(dm::{name} == {value});")
    compile_static_asserts("\n".join(lines) + "\n", "sm90_bwd_roles_check.cu")


def test_writer_ring_counts_equal_the_kernel():
    """The ring's init counts (one arrival per dQ warp on full, the writer's on empty; times 32
    only in the racecheck build, DM_SM90_EACH_THREAD_ARRIVES=1) and slots in the kernel equal
    the model's Variant."""
    lines = ['#include "sm90/bwd.cu"']
    for hd in (64, 128):
        for bias in (False, True):
            slots = 1 if hd == 128 and bias else 2
            lines.append(f"static_assert(dm::Sm90BwdSmem<{hd}, false, {str(bias).lower()}>::"
                         f"kDqSlots == {slots});")
    lines.append("static_assert(dm::sm90::kWarpArrivals == 1);")  # the default build
    compile_static_asserts("\n".join(lines) + "\n", "sm90_bwd_ring_check.cu")
    src = (cuda_src_dir() / "sm90" / "bwd.cu").read_text()
    assert "mbar_init(bar_dq_full(k), kDqWarps * kWarpArrivals);" in src
    assert "mbar_init(bar_dq_empty(k), kWarpArrivals);" in src
    assert "constexpr int kTurnStep = Smem::kDqWriter ? 1 : kDqWarps;" in src
    assert (Variant(True).step, Variant(False, 128).step, Variant(False, 64).step) == (1, 8, 4)


def test_kernel_dispatches_on_the_role():
    """The producer's branches test sm90_bwd_role's value, not warp/lane directly."""
    src = (cuda_src_dir() / "sm90" / "bwd.cu").read_text()
    prod = src[src.index("// ---------------------------------------------------------"
                         "---- producer"):src.index("// ---------------------------------"
                                                    "--------------------------------------"
                                                    "------- consumers")]
    # DM_SM90_BWD_DQ_WRITERS: warp 2 is the second writer only with two slots (or one slot
    # shared in turn: DM_SM90_BWD_DQ_SHARED_SLOT) and no mask
    assert ("constexpr int kWriters = DM_SM90_BWD_DQ_WRITERS == 2 && Smem::kDqWriter && "
            "!kHasMask &&\n                             (Smem::kDqSlots == 2 || kSharedSlot) "
            "? 2 : 1;") in prod
    assert ("if (kWriters == 2 && kSharedSlot && j > 0) mbar_wait(bar_dq_empty(0), (j - 1) & 1);"
            in prod)
    assert ("const int role = sm90_bwd_role(warp, lane, kHasMask, Smem::kDqWriter, kWriters);"
            in prod)
    assert "if (kWriters == 2 && j % 2 != warp - 1) continue;  // the other writer's item" in src
    assert "if (role == kBwdTma)" in prod
    assert "else if (role == kBwdLseRows)" in prod
    assert "else if (role == kBwdLoads)" in prod
    assert "else if (kHasMask && role == kBwdMaskWords)" in prod
    assert "else if (role == kBwdDqWriter)" in prod
    assert "mbar_init(bar_full(s), sm90_bwd_full_arrivals(kHasMask, Smem::kDqWriter));" in src


@pytest.mark.parametrize("writer", [False, True])
def test_roles_hold_whole_warps_and_count_33_or_97(writer):
    for has_mask, n in ((False, 33), (True, 97)):
        table = role_fixed_table(has_mask, writer)
        assert full_count(has_mask, writer) == n
        for w in range(4):
            lanes = table[32 * w:32 * w + 32]
            if any(r in (LSE_ROWS, MASK_WORDS, DQ_WRITER, LOADS) for r in lanes):
                assert len(set(lanes)) == 1


# ---------------------------------------------------------------------- one CTA
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


@pytest.mark.parametrize("has_mask", [False, True])
@pytest.mark.parametrize("head_dim,slots", [(128, 2), (128, 1), (64, 2)])
def test_writer_ring_completes_under_any_interleaving(has_mask, head_dim, slots):
    v = Variant(dq_writer=True, head_dim=head_dim, slots=slots)
    for n_items in (1, 2, 3, 6):
        drops = [(), (0,), tuple(range(n_items)), (1, 2)] if has_mask else [()]
        for seed in range(4):
            for dropped in drops:
                assert simulate(role_fixed, has_mask, n_items, seed, dropped,
                                variant=v) == "ok", (n_items, seed, dropped)


@pytest.mark.parametrize("head_dim", [128, 64])
def test_two_writers_complete_under_any_interleaving(head_dim):
    """DM_SM90_BWD_DQ_WRITERS=2: without a mask, two slots, warps 1 and 2 each take alternate
    items (slot = writer); every item still adds once."""
    v = Variant(dq_writer=True, head_dim=head_dim, slots=2, writers=2)
    for n_items in (1, 2, 3, 6):
        for seed in range(6):
            assert simulate(role_fixed, False, n_items, seed, variant=v) == "ok", (n_items, seed)


def test_two_writers_on_one_slot_are_caught():
    """Why the kernel gives warp 2 the writer's role only with two slots: on one slot the odd
    items' writer waits on parity 1 of a barrier still in phase 0, which reads as passed
    (try_wait.parity tells two phases apart only): its adds and the dQ warps' next stores meet
    in the one slot."""
    v = Variant(dq_writer=True, slots=1, writers=2)
    got = {simulate(role_fixed, False, n, seed, variant=v) for n in (2, 3, 6) for seed in range(6)}
    assert got == {"clobbered"}


@pytest.mark.parametrize("has_dropped", [False, True])
def test_two_writers_sharing_one_slot_complete(has_dropped):
    """DM_SM90_BWD_DQ_SHARED_SLOT: on one slot each writer first waits for the slot's empty
    phase of the item before its own (its own item two back completed the phase before that,
    so the parity is unambiguous); every interleaving completes, every item adds once, in the
    default mode and in deterministic grids (turns in key-tile order)."""
    v = Variant(dq_writer=True, slots=1, writers=2, shared_slot=True)
    for n_items in (1, 2, 3, 6):
        for seed in range(6):
            dropped = (1,) if has_dropped and n_items > 1 else ()
            assert simulate(role_fixed, False, n_items, seed, dropped, variant=v) == "ok"
    for pattern in ("full", "causal", "band"):
        for seed in range(4):
            assert run_grid(v, pattern, seed, has_mask=False, resident=3) == "ok", seed
            assert run_grid(v, pattern, seed, has_mask=False, tiles=4, resident=2,
                            unlisted=0.5) == "ok", seed


def test_writer_ring_catches_a_slot_freed_before_its_adds_read_it():
    v = Variant(dq_writer=True, slots=1, empty_before_read=True)
    got = {simulate(role_fixed, False, 4, seed, variant=v) for seed in range(12)}
    assert "clobbered" in got


def test_writer_ring_catches_dropped_tiles_that_bypass_it():
    """The writer expects every item in the ring; a dropped tile that skips it leaves the
    writer waiting on a slot nobody fills (or taking the next item's tile for it)."""
    v = Variant(dq_writer=True, dropped_bypass_ring=True)
    for seed in range(6):
        assert simulate(role_fixed, True, 3, seed, dropped=(1,), variant=v) != "ok"


def test_writer_ring_catches_a_wrong_full_count():
    """At d64 only consumer 0's 4 warps stage dQ: a full barrier counting 8 never completes."""
    v = Variant(dq_writer=True, head_dim=128, slots=2)
    bad = Variant(dq_writer=True, head_dim=64, slots=2)

    class Sim8(Sim):  # init count of d128 with d64's arrivals
        def _start(self) -> None:
            super()._start()
            for k in range(bad.slots):
                self.ctas[-1].bars[f"dqfull{k}"] = MBarrier(v.dq_warps)

    work = CtaWork(0, ((0, 0), (0, 1)))
    assert Sim8([work], bad, False, False, 0, resident=1).run() == "deadlock"


# ---------------------------------------------------------------------- the dS^T buffer
@pytest.mark.parametrize("has_mask", [False, True])
@pytest.mark.parametrize("writer", [False, True])
@pytest.mark.parametrize("head_dim", [128, 64])
def test_ds_buffer_completes_under_any_interleaving(has_mask, writer, head_dim):
    """One dS^T buffer: the barrier before the stores waits for every dQ product of the
    previous storing item (dropped tiles store nothing), the one after them for every
    consumer's stores; long dQ products clobber nothing."""
    v = Variant(dq_writer=writer, head_dim=head_dim, dq_product_steps=8)
    for n_items in (1, 2, 3, 6):
        drops = [(), (0,), (1,), (1, 2), (2, 4)] if has_mask else [()]
        for seed in range(4):
            for dropped in drops:
                assert simulate(role_fixed, has_mask, n_items, seed, dropped,
                                variant=v) == "ok", (n_items, seed, dropped)


def _ds_outcomes(v: Variant, dropped=(), seeds: int = 40, n_items: int = 6) -> set:
    return {simulate(role_fixed, bool(dropped), n_items, seed, dropped, variant=v)
            for seed in range(seeds)}


def test_ds_one_buffer_without_the_war_barrier_is_caught():
    """One buffer and no barrier before the stores: a consumer overwrites dS^T while the other
    consumer's dQ product of the previous item still reads it."""
    v = Variant(dq_writer=True, ds_no_war_barrier=True, dq_product_steps=8)
    assert "ds-clobbered" in _ds_outcomes(v)


def test_ds_buffer_with_the_stage_released_mid_product_completes():
    """The stage going back while the dQ product still reads dS^T (the DQ_ATOMIC variant at
    d128, release_mid_dq), with or without dropped tiles: the barrier before the stores, not
    the stage ring, orders the buffer's reuse."""
    early = Variant(dq_writer=True, release_mid_dq=True, dq_product_steps=8)
    assert _ds_outcomes(early) == {"ok"}
    assert _ds_outcomes(early, dropped=(1, 3)) == {"ok"}


# ---------------------------------------------------------------------- deterministic grids
@pytest.mark.parametrize("writer", [False, True])
@pytest.mark.parametrize("pattern", ["full", "causal", "band"])
def test_deterministic_turns_complete_in_key_tile_order(writer, pattern):
    """Every grid completes with each query tile's adds landing in key-tile order, with any
    launch order of the block indices and 2 resident CTAs (the smallest unfinished position
    never waits)."""
    v = Variant(dq_writer=writer, slots=1 if writer else 2)
    for seed in range(4):
        assert run_grid(v, pattern, seed) == "ok", seed
        assert run_grid(v, pattern, seed, has_mask=False, resident=3) == "ok", seed


@pytest.mark.parametrize("pattern", ["full", "causal", "band"])
def test_deterministic_turns_with_two_writers_complete_in_key_tile_order(pattern):
    """Two writer warps per CTA (no mask, two slots): each takes its turns for alternate
    items; the grids still complete with every query tile's adds in key-tile order."""
    v = Variant(dq_writer=True, slots=2, writers=2)
    for seed in range(6):
        for resident in (2, 3):
            assert run_grid(v, pattern, seed, has_mask=False, resident=resident) == "ok", seed
            assert run_grid(v, pattern, seed, has_mask=False, tiles=4, resident=resident,
                            unlisted=0.5) == "ok", seed


def test_deterministic_turns_catch_a_target_counted_per_dq_warp():
    """With the writer a key tile adds 1 per item: a target of 8 per earlier tile (the
    consumer-side protocol's) is never reached."""
    v = Variant(dq_writer=True, turn_step=8)
    assert {run_grid(v, "full", seed, has_mask=False) for seed in range(3)} == {"deadlock"}


def test_deterministic_turns_catch_a_dropped_tile_passing_its_turn_early():
    """A dropped tile's +1 taken before its turn counts for an earlier tile: a later tile then
    adds before that earlier one."""
    v = Variant(dq_writer=True, dropped_skip_turn=True)
    got = [run_grid(v, "full", seed, tiles=4, heads=1, drop=0.5, resident=4)
           for seed in range(16)]
    assert "out-of-order" in got


def test_deterministic_turns_catch_a_turn_passed_before_the_adds_land():
    """bulk wait_group 0 before the release: without it the next key tile's adds can land
    first."""
    v = Variant(dq_writer=True, release_before_landing=True)
    got = [run_grid(v, "full", seed, has_mask=False, tiles=4, heads=1, resident=4)
           for seed in range(16)]
    assert "out-of-order" in got


def test_deterministic_turns_need_ticket_positions():
    """Positions taken from blockIdx: a later block can start first and fill the resident
    slots while waiting on a block that never starts."""
    v = Variant(dq_writer=True, ticket_positions=False)
    got = [run_grid(v, "full", seed, has_mask=False, tiles=4, heads=1, resident=2)
           for seed in range(10)]
    assert "deadlock" in got


# ---------------------------------------------------------------------- block lists
def simulate_sparse(has_mask: bool, n_items: int, listed, seed: int, dropped=(),
                    variant: Variant = Variant()) -> str:
    """One CTA (key tile 0) over n_items query tiles of one head whose block lists name only
    ``listed`` (default mode)."""
    work = CtaWork(0, tuple((0, m) for m in range(n_items)), frozenset(dropped),
                   frozenset(listed))
    return Sim([work], variant, has_mask, False, seed, resident=1).run()


@pytest.mark.parametrize("writer", [False, True])
@pytest.mark.parametrize("has_mask", [False, True])
def test_sparse_walk_completes_with_the_listed_items_only(writer, has_mask):
    """Every role walks the listed items (the consumers by the stage's item, ending at -1):
    no walk (nothing listed), the first or last item alone, gaps of any length."""
    variants = [Variant(dq_writer=writer, slots=2)]
    if writer and not has_mask:
        variants.append(Variant(dq_writer=True, slots=2, writers=2))
    for v in variants:
        for listed in ((), (0,), (4,), (1, 2), (0, 3, 4), (2,), (0, 1, 2, 3, 4)):
            for seed in range(3):
                dropped = tuple(listed[:1]) if has_mask else ()
                assert simulate_sparse(has_mask, 5, listed, seed, dropped, v) == "ok", listed


@pytest.mark.parametrize("writer", [False, True])
@pytest.mark.parametrize("pattern", ["full", "causal", "band"])
def test_sparse_deterministic_turns_complete_in_key_tile_order(writer, pattern):
    """With block lists a target counts the listed key tiles before this one: every grid
    completes, each listed item adds once, adds land in key-tile order (query tiles no key
    tile lists and key tiles with nothing listed included)."""
    v = Variant(dq_writer=writer, slots=1 if writer else 2)
    for seed in range(4):
        for unlisted in (0.4, 0.8):
            assert run_grid(v, pattern, seed, tiles=4, unlisted=unlisted) == "ok", seed
            assert run_grid(v, pattern, seed, has_mask=False, tiles=4, resident=3,
                            unlisted=unlisted) == "ok", seed


def test_sparse_turns_catch_a_target_that_counts_unlisted_tiles():
    """A target over every key tile n_lo .. n - 1 waits for unlisted tiles that never add."""
    v = Variant(dq_writer=True, dense_turn_target=True)
    got = {run_grid(v, "full", seed, has_mask=False, tiles=4, unlisted=0.5, resident=4)
           for seed in range(6)}
    assert got == {"deadlock"}


def test_sparse_walk_catches_a_missing_end_marker():
    """The consumers learn each item from the stage: without the producer's -1 they wait
    on a stage nobody fills."""
    v = Variant(dq_writer=True, no_end_marker=True)
    for seed in range(4):
        assert simulate_sparse(False, 4, (1, 3), seed, variant=v) == "deadlock"


def test_sparse_walk_catches_a_writer_that_walks_unlisted_items():
    """The writer must scan the lists as the producer does: walking every item it waits on a
    slot no consumer fills (or adds a tile under another item's counter)."""
    v = Variant(dq_writer=True, writer_walks_all=True)
    for seed in range(4):
        assert simulate_sparse(False, 4, (1, 3), seed, variant=v) != "ok"


def test_turn_target_read_after_the_release_is_caught():
    """Without the writer the consumers' targets come with the stage (the lse rows warp counts
    the listed tiles): read after the stage went back to the producer, a later item's target
    can stand in (adds out of order, or a wait that never ends)."""
    v = Variant(dq_writer=False, target_after_release=True)
    got = {run_grid(v, "full", seed, has_mask=False, tiles=4, heads=1, unlisted=0.3,
                    resident=4) for seed in range(12)}
    assert got - {"ok"}, got


def test_kernel_walks_as_modelled():
    """The kernel's side of the sparse-walk model: every producer role ends its walk with
    end_walk (the end marker and its usual arrivals), the consumers leave at -1, the lse rows
    warp writes the target only without the writer, and targets count listed tiles."""
    src = (cuda_src_dir() / "sm90" / "bwd.cu").read_text()
    prod = src[src.index("// ---------------------------------------------------------"
                         "---- producer"):src.index("// ---------------------------------"
                                                    "--------------------------------------"
                                                    "------- consumers")]
    # TMA, lse rows, loads, mask words
    assert prod.count("end_walk(j, ") == 4
    assert "for (int a = sm90_bwd_role_full_arrivals(role, lane); a > 0; --a)" in prod
    assert "if (!Smem::kDqWriter && args.dq_sem != nullptr) {  // the consumers' turn target" \
        in prod
    assert "for (int i = next_item_warp(0); i < n_items; i = next_item_warp(i + 1), ++j)" in prod
    assert "if (i < 0) {" in src and "!= kSpNone;" in src
    assert "before += __popc(__ballot_sync(0xffffffffu, on));" in src
