#!/usr/bin/env python3
"""Model of v5's warp-specialised main loop (kernels/wgmma_common.cuh: wg5_init, wg5_produce,
wg5_consume): one producer thread streaming each step's A and B boxes with two TMA copies
into a ring of STAGES slots, two consumer warpgroups, the `full` (count 1 + transaction
bytes) and `empty` (count 8) mbarriers with parity waits, copies that land after random
delays, asynchronous products retired by wgmma.wait_group. Checked in every run:
  - no deadlock (some agent can always move until all finish);
  - every product reads the step it belongs to from a slot whose copies have landed, and no
    copy writes a slot that a product not yet retired reads;
  - every step is released exactly once by each consumer warpgroup;
  - mbarrier waits never see a phase two ahead (the parity protocol's assumption).
Each consumer warpgroup is one agent (its 4 warps arrive on `empty` together). Not a model of
timing, only of order.

With cl = 2 (v6), two such blocks form a cluster: each producer copies its A box and half of
the B box, multicast into both blocks; consumers release on both blocks' `empty` (count 16);
each producer ends with a tail (it waits on `empty` as for STAGES more steps, issuing
nothing); no block exits before the final cluster barrier. Five planted bugs, each must be
caught.

  python3 jobs/sim/ws_ring.py [trials]     (exit 0 = all trials passed)
"""
import random
import sys

STAGES = 4
MUTATION = None  # planted bugs, each must be caught: see main()


class MBar:
    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self, n=1, expect_tx=0):
        self.tx += expect_tx
        self.pending -= n
        assert self.pending >= 0, "too many arrivals in a phase"
        self._maybe_complete()

    def complete_tx(self, nbytes):
        # The count may go below zero while the phase still waits for its arrival (v6: a
        # peer's multicast landing before this block's expect_tx); more bytes than a phase
        # expects would leave it at tx < 0 with no arrival pending, and it never completes
        # (the run reports the deadlock).
        self.tx -= nbytes
        self._maybe_complete()

    def done(self, parity, waiter_round):
        # try_wait.parity(p) succeeds when the phase with parity p has completed, i.e. the
        # current phase's parity differs from p (a fresh barrier: parity 1 "completed").
        assert self.phase <= waiter_round + 1, "barrier ran two phases ahead of a waiter"
        return (self.phase & 1) != parity


def run(tiles, ksteps, rng, cl=1):
    """One block (cl = 1: v5) or a cluster of cl blocks (v6: each block's producer copies its
    A box and 1 / cl of the B box, the latter multicast into every block of the cluster; a
    consumer releases a step on every block's `empty`, whose count is 8 cl). Hardware lets a
    transaction count go below zero (a peer's copy may land before this block's expect_tx),
    so the model does too; a block exits only after the final cluster barrier (every agent
    of every block done), and nothing may land in or arrive on a block that exited."""
    total = tiles * ksteps
    boxes = ["A"] + [f"B{r}" for r in range(cl)]
    full = [[MBar(1) for _ in range(STAGES)] for _ in range(cl)]
    count = 8 * cl if MUTATION != "empty_counts_one_block" else 8
    empty = [[MBar(count) for _ in range(STAGES)] for _ in range(cl)]
    slot_data = [[None] * STAGES for _ in range(cl)]  # step a slot holds whole (or None)
    landed = [[{} for _ in range(STAGES)] for _ in range(cl)]  # box -> step it holds
    inflight = []                                     # (block, slot, box, step)
    readers = [[set() for _ in range(STAGES)] for _ in range(cl)]  # unretired (consumer, step)
    released = [[[0] * total for _ in range(2)] for _ in range(cl)]
    prod = [dict(s=0, slot=0, round=0) for _ in range(cl)]
    cons = [[dict(s=0, slot=0, round=0, kt=0, prev=STAGES - 1, mma=[], done=False)
             for _ in range(2)] for _ in range(cl)]
    exited = [False] * cl

    def producer(r):
        s = prod[r]["s"]
        tail = STAGES if cl > 1 and MUTATION != "no_tail_no_final_sync" else 0
        if s >= total + tail:
            return False
        if s >= total:
            # v6's producer tail: wait on `empty` as for STAGES more steps, issuing nothing.
            slot, rnd = prod[r]["slot"], prod[r]["round"]
            if not empty[r][slot].done((rnd & 1) ^ 1, rnd - 1):
                return False
            prod[r]["s"] += 1
            prod[r]["slot"] += 1
            if prod[r]["slot"] == STAGES:
                prod[r]["slot"], prod[r]["round"] = 0, rnd + 1
            return True
        slot, rnd = prod[r]["slot"], prod[r]["round"]
        parity = (rnd & 1) ^ 1
        if MUTATION == "producer_parity":
            parity = rnd & 1
        if MUTATION != "no_empty_wait" and not empty[r][slot].done(parity, rnd - 1):
            return False
        # This block's A lands here; its B part in every block of the cluster.
        for dst in range(cl):
            assert not readers[dst][slot], (
                f"block {r} copies step {s} into block {dst}'s slot {slot} "
                f"while {readers[dst][slot]} read it")
        full[r][slot].arrive(1, expect_tx=len(boxes))  # arrive.expect_tx(A + whole B)
        inflight.append((r, slot, "A", s))
        for dst in range(cl):
            inflight.append((dst, slot, f"B{r}", s))
        prod[r]["s"] += 1
        prod[r]["slot"] += 1
        if prod[r]["slot"] == STAGES:
            prod[r]["slot"], prod[r]["round"] = 0, rnd + 1
        return True

    def land_one():
        r, slot, box, s = inflight.pop(rng.randrange(len(inflight)))
        assert not exited[r], f"a copy landed in block {r} after it exited"
        landed[r][slot][box] = s
        whole = len(landed[r][slot]) == len(boxes) and set(landed[r][slot].values()) == {s}
        slot_data[r][slot] = s if whole else None
        full[r][slot].complete_tx(1)

    def retire(r, c, keep):
        st = cons[r][c]
        while len(st["mma"]) > keep:
            s, slot = st["mma"].pop(0)
            readers[r][slot].discard((c, s))

    def release(r, c, slot, step):
        released[r][c][step] += 1
        dsts = [r] if MUTATION == "empty_counts_one_block" else range(cl)
        for dst in dsts:
            assert not exited[dst], f"block {r} arrived on block {dst}'s barrier after it exited"
            empty[dst][slot].arrive(4)  # lane 0 of each of the warpgroup's 4 warps

    def consumer(r, c):
        st = cons[r][c]
        s = st["s"]
        if s >= total:
            if not st["done"]:
                retire(r, c, 0)
                st["done"] = True
                return True
            return False
        slot, rnd = st["slot"], st["round"]
        if not full[r][slot].done(rnd & 1, rnd):
            return False
        assert slot_data[r][slot] == s, (
            f"block {r} consumer {c} step {s}: slot {slot} holds {slot_data[r][slot]}")
        readers[r][slot].add((c, s))
        st["mma"].append((s, slot))
        if MUTATION == "release_current":
            release(r, c, slot, s)
        retire(r, c, 1)  # wgmma.wait_group 1
        if st["kt"] > 0 and MUTATION != "release_current":
            release(r, c, st["prev"], s - 1)
        st["prev"] = slot
        st["slot"] += 1
        if st["slot"] == STAGES:
            st["slot"], st["round"] = 0, rnd + 1
        st["kt"] += 1
        if st["kt"] == ksteps:
            retire(r, c, 0)  # wait_group 0 before the epilogue
            if MUTATION != "release_current":
                release(r, c, st["prev"], s)
            st["kt"] = 0
        st["s"] += 1
        return True

    def block_done(r):
        tail = STAGES if cl > 1 and MUTATION != "no_tail_no_final_sync" else 0
        return prod[r]["s"] >= total + tail and all(c["done"] for c in cons[r])

    def exits():
        # wg5_finish: the final cluster barrier (every agent of every block done); planted
        # bug: a block leaving as soon as its own agents are done, with no producer tail
        # either (either one alone keeps a peer's last arrivals from reaching an exited
        # block: the tail waits for them, the barrier for the peer's arrivals to be issued).
        for r in range(cl):
            if not exited[r] and block_done(r):
                if MUTATION == "no_tail_no_final_sync" or all(block_done(x) for x in range(cl)):
                    exited[r] = True

    moves = 0
    agents = [("p", r, None) for r in range(cl)] + [
        ("c", r, c) for r in range(cl) for c in range(2)]
    while not (all(exited) and not inflight):
        order = agents[:]
        rng.shuffle(order)
        moved = False
        if inflight and rng.random() < 0.4:
            land_one()
            moved = True
        else:
            for kind, r, c in order:
                if not exited[r] and (producer(r) if kind == "p" else consumer(r, c)):
                    moved = True
                    break
            if not moved and inflight:
                land_one()
                moved = True
        before = sum(exited)
        exits()
        assert moved or sum(exited) > before, (
            f"deadlock: producers {prod}, consumers "
            f"{[[(c['s'], c['kt']) for c in cs] for cs in cons]}")
        moves += 1
        assert moves < 400000, "no progress"
    for r in range(cl):
        for c in range(2):
            assert all(x == 1 for x in released[r][c]), (
                f"block {r} consumer {c} releases: {released[r][c]}")
    return True


def trials_pass(trials, seed, cl=1):
    rng = random.Random(seed)
    for _ in range(trials):
        ksteps = rng.choice([1, 2, 3, 9, 14, 64])
        tiles = rng.randint(1, 6)
        try:
            run(tiles, ksteps, rng, cl)
        except AssertionError as e:
            return str(e)
    return None


def main():
    global MUTATION
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for cl, name, bugs in [
        (1, "v5 (one block)", ["no_empty_wait", "release_current", "producer_parity"]),
        (2, "v6 (a cluster of 2, B multicast)",
         ["no_empty_wait", "release_current", "producer_parity", "empty_counts_one_block",
          "no_tail_no_final_sync"]),
    ]:
        MUTATION = None
        err = trials_pass(trials, 20261127, cl)
        if err:
            sys.exit(f"FAILED ({name}): {err}")
        print(f"ws ring, {name}: {trials} random interleavings, no deadlock, no stale or "
              "overwritten slot, every step released once per consumer")
        for m in bugs:
            MUTATION = m
            err = trials_pass(trials, 7, cl)
            if not err:
                sys.exit(f"FAILED ({name}): planted bug {m} was not caught")
            print(f"  planted bug {m}: caught ({err})")
    MUTATION = None


if __name__ == "__main__":
    main()
