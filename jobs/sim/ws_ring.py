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
        self.tx -= nbytes
        assert self.tx >= 0, "more bytes than expected"
        self._maybe_complete()

    def done(self, parity, waiter_round):
        # try_wait.parity(p) succeeds when the phase with parity p has completed, i.e. the
        # current phase's parity differs from p (a fresh barrier: parity 1 "completed").
        assert self.phase <= waiter_round + 1, "barrier ran two phases ahead of a waiter"
        return (self.phase & 1) != parity


def run(tiles, ksteps, rng):
    total = tiles * ksteps
    full = [MBar(1) for _ in range(STAGES)]
    empty = [MBar(8) for _ in range(STAGES)]
    slot_data = [None] * STAGES         # step whose A and B a slot holds (None: being written)
    landed = [set() for _ in range(STAGES)]
    inflight = []                       # (slot, box, step)
    readers = [set() for _ in range(STAGES)]  # (consumer, step) of unretired products
    released = [[0] * total for _ in range(2)]
    prod = dict(s=0, slot=0, round=0)
    cons = [dict(s=0, slot=0, round=0, kt=0, prev=STAGES - 1, mma=[], done=False) for _ in range(2)]

    def producer():
        s = prod["s"]
        if s >= total:
            return False
        slot, rnd = prod["slot"], prod["round"]
        parity = (rnd & 1) ^ 1
        if MUTATION == "producer_parity":
            parity = rnd & 1
        if MUTATION != "no_empty_wait" and not empty[slot].done(parity, rnd - 1):
            return False
        assert not readers[slot], f"slot {slot} rewritten for step {s} while {readers[slot]} read it"
        slot_data[slot] = None
        landed[slot] = set()
        full[slot].arrive(1, expect_tx=2)   # arrive.expect_tx(A bytes + B bytes)
        inflight.append((slot, "A", s))
        inflight.append((slot, "B", s))
        prod["s"] += 1
        prod["slot"] += 1
        if prod["slot"] == STAGES:
            prod["slot"], prod["round"] = 0, rnd + 1
        return True

    def land_one():
        slot, box, s = inflight.pop(rng.randrange(len(inflight)))
        landed[slot].add(box)
        if landed[slot] == {"A", "B"}:
            slot_data[slot] = s
        full[slot].complete_tx(1)

    def retire(c, keep):
        st = cons[c]
        while len(st["mma"]) > keep:
            s, slot = st["mma"].pop(0)
            readers[slot].discard((c, s))

    def release(c, slot, step):
        released[c][step] += 1
        empty[slot].arrive(4)  # lane 0 of each of the warpgroup's 4 warps

    def consumer(c):
        st = cons[c]
        s = st["s"]
        if s >= total:
            if not st["done"]:
                retire(c, 0)
                st["done"] = True
                return True
            return False
        slot, rnd = st["slot"], st["round"]
        if not full[slot].done(rnd & 1, rnd):
            return False
        assert slot_data[slot] == s, f"consumer {c} step {s}: slot {slot} holds {slot_data[slot]}"
        readers[slot].add((c, s))
        st["mma"].append((s, slot))
        if MUTATION == "release_current":
            release(c, slot, s)
        retire(c, 1)  # wgmma.wait_group 1
        if st["kt"] > 0 and MUTATION != "release_current":
            release(c, st["prev"], s - 1)
        st["prev"] = slot
        st["slot"] += 1
        if st["slot"] == STAGES:
            st["slot"], st["round"] = 0, rnd + 1
        st["kt"] += 1
        if st["kt"] == ksteps:
            retire(c, 0)  # wait_group 0 before the epilogue
            if MUTATION != "release_current":
                release(c, st["prev"], s)
            st["kt"] = 0
        st["s"] += 1
        return True

    moves = 0
    while not (prod["s"] >= total and not inflight and all(c["done"] for c in cons)):
        agents = ["p", 0, 1]
        rng.shuffle(agents)
        moved = False
        if inflight and rng.random() < 0.4:
            land_one()
            moved = True
        else:
            for a in agents:
                if (producer() if a == "p" else consumer(a)):
                    moved = True
                    break
            if not moved and inflight:
                land_one()
                moved = True
        assert moved, f"deadlock: producer {prod}, consumers {[(c['s'], c['kt']) for c in cons]}"
        moves += 1
        assert moves < 200000, "no progress"
    for c in range(2):
        assert all(r == 1 for r in released[c]), f"consumer {c} releases: {released[c]}"
    return True


def trials_pass(trials, seed):
    rng = random.Random(seed)
    for _ in range(trials):
        ksteps = rng.choice([1, 2, 3, 9, 14, 64])
        tiles = rng.randint(1, 6)
        try:
            run(tiles, ksteps, rng)
        except AssertionError as e:
            return str(e)
    return None


def main():
    global MUTATION
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    err = trials_pass(trials, 20261127)
    if err:
        sys.exit(f"FAILED: {err}")
    print(f"ws ring: {trials} random interleavings, no deadlock, no stale or overwritten slot, "
          "every step released once per consumer")
    for m in ["no_empty_wait", "release_current", "producer_parity"]:
        MUTATION = m
        err = trials_pass(trials, 7)
        if not err:
            sys.exit(f"FAILED: planted bug {m} was not caught")
        print(f"planted bug {m}: caught ({err})")
    MUTATION = None


if __name__ == "__main__":
    main()
