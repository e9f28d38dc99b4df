#!/usr/bin/env python3
"""Model of v4's staggered main loop (kernels/wgmma_common.cuh, wg_main_loop_staggered): the
two warpgroups, the per-warpgroup A rings, the shared B ring with its full / empty / go
mbarriers, cp.async copies that land after random delays, asynchronous products retired by
wgmma.wait_group, under random interleavings. Checked in every run:
  - no deadlock (some agent can always move until both finish);
  - every product reads the step it belongs to, from landed copies (A: its own warpgroup's
    slot; B: the shared slot), and no copy overwrites a slot that a product not yet retired
    reads (for both warpgroups);
  - mbarrier waits never see a phase two ahead (the parity protocol's assumption).
Each warpgroup is one agent (its 4 warps move together between its named barriers; the
empty barrier gets its 4 arrivals at once), which is what the cross-warpgroup protocol
depends on. Not a model of timing, only of order.

  python3 jobs/sim/staggered_ring.py [trials]     (exit 0 = all trials passed)
"""
import random
import sys

NB, NA, AHEAD, LAG = 5, 4, 2, 1
# Planted bugs (main() checks each one is caught): skip the empty wait; release the step just
# issued instead of the retired one. ("wg1_first", no go barrier, is not a bug: the protocol
# stays safe, only the stagger is lost.)
MUTATION = None


class MBar:
    def __init__(self, count):
        self.count, self.pending, self.phase = count, count, 0

    def arrive(self, n=1):
        self.pending -= n
        assert self.pending >= 0, "too many arrivals in a phase"
        if self.pending == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity, waiter_phase_hint):
        # try_wait.parity(p) succeeds when the current phase's parity differs from p; the
        # protocol assumes the barrier is at most one phase past the one awaited.
        assert self.phase <= waiter_phase_hint + 1, "barrier ran two phases ahead of a waiter"
        return (self.phase & 1) != parity


def run(total, ksteps, nb, rng):
    full = [MBar(1) for _ in range(nb)]     # warpgroup 0's copies (one agent = 128 arrivals)
    empty = [MBar(2) for _ in range(nb)]    # one arrival per warpgroup (= its 4 warps)
    go = MBar(1)
    b_slot = [None] * nb                    # step whose B data a slot holds (None: in flight)
    a_slot = [[None] * NA for _ in range(2)]
    inflight = []                           # copies: (landing key, kind, wg, slot, step)
    readers = {(wg, kind, s): set() for wg in range(2) for kind in "AB" for s in range(max(nb, NA))}
    pending_mma = [[], []]                  # steps whose products are in flight, per warpgroup
    st = [dict(pc="prologue", s=0, p=0) for _ in range(2)]
    issued_groups = [[], []]                # per warpgroup, the steps of each commit group

    def issue_copies(wg, j):
        slot_a = j % NA
        assert not readers[(wg, "A", slot_a)], f"A slot {slot_a} overwritten while read"
        a_slot[wg][slot_a] = None
        inflight.append((rng.random(), "A", wg, slot_a, j))
        if wg == 0:
            slot_b = j % nb
            for w in range(2):
                assert not readers[(w, "B", slot_b)], f"B slot {slot_b} overwritten while wg{w} reads it"
            b_slot[slot_b] = None
            inflight.append((rng.random(), "B", 0, slot_b, j))

    def land_one():
        inflight.sort()
        _, kind, wg, slot, j = inflight.pop(rng.randrange(len(inflight)))
        if kind == "A":
            a_slot[wg][slot] = j
        else:
            b_slot[slot] = j
            full[slot].arrive()  # cp.async.mbarrier.arrive: after this thread's copies landed

    def retire(wg, keep):
        while len(pending_mma[wg]) > keep:
            s = pending_mma[wg].pop(0)
            readers[(wg, "A", s % NA)].discard(s)
            readers[(wg, "B", s % nb)].discard(s)

    def step(wg):
        """Advance warpgroup wg by one action; False if blocked."""
        c = st[wg]
        if c["pc"] == "prologue":
            if c["p"] < AHEAD:
                if c["p"] < total:
                    issue_copies(wg, c["p"])
                issued_groups[wg].append(c["p"] if c["p"] < total else None)
                c["p"] += 1
                return True
            c["pc"] = "go"
            return True
        if c["pc"] == "go":
            if wg == 1 and MUTATION != "wg1_first" and not go.done(0, 0):
                return False
            c["pc"] = "loop"
            return True
        if c["pc"] == "loop":
            s = c["s"]
            if s >= total:
                retire(wg, 0)
                c["pc"] = "end"
                return True
            # cp.async.wait_group AHEAD-1: this warpgroup's copies of step s landed
            if a_slot[wg][s % NA] != s:
                return False
            if wg == 0 and b_slot[s % nb] != s:
                return False  # its own B copies (same commit group)
            c["pc"] = "issue"
            return True
        if c["pc"] == "issue":
            s = c["s"]
            j = s + AHEAD
            if j < total:
                if wg == 0 and j >= nb and MUTATION != "no_empty_wait":
                    k = j // nb - 1
                    if not empty[j % nb].done(k & 1, k):
                        return False
                issue_copies(wg, j)
            c["pc"] = "wait_full"
            return True
        if c["pc"] == "wait_full":
            s = c["s"]
            k = s // nb
            if not full[s % nb].done(k & 1, k):
                return False
            assert b_slot[s % nb] == s, f"wg{wg} step {s}: B slot holds {b_slot[s % nb]}"
            assert a_slot[wg][s % NA] == s, f"wg{wg} step {s}: A slot holds {a_slot[wg][s % NA]}"
            readers[(wg, "A", s % NA)].add(s)
            readers[(wg, "B", s % nb)].add(s)
            pending_mma[wg].append(s)
            retire(wg, 1)  # wgmma.wait_group 1
            if MUTATION == "release_current":
                empty[s % nb].arrive()
            elif s >= 1:
                empty[(s - 1) % nb].arrive()
            if wg == 0 and s == LAG - 1:
                go.arrive()
            if (s + 1) % ksteps == 0:
                retire(wg, 0)  # the tile's epilogue waits for everything
            c["s"] += 1
            c["pc"] = "loop"
            return True
        return False  # "end"

    moves = 0
    while not (st[0]["pc"] == "end" and st[1]["pc"] == "end"):
        options = [wg for wg in range(2) if st[wg]["pc"] != "end"]
        rng.shuffle(options)
        moved = False
        if inflight and rng.random() < 0.5:
            land_one()
            moved = True
        else:
            for wg in options:
                if step(wg):
                    moved = True
                    break
            if not moved and inflight:
                land_one()
                moved = True
        assert moved, f"deadlock: {st}, inflight {len(inflight)}"
        moves += 1
        assert moves < 100000, "no progress"
    return True


def trials_pass(trials, seed):
    rng = random.Random(seed)
    for _ in range(trials):
        ksteps = rng.choice([1, 2, 3, 9, 14, 64])
        total = ksteps * rng.randint(1, 6)
        nb = rng.choice([4, 5])  # the scoring kernel's ring and the grounding kernel's
        try:
            run(total, ksteps, nb, rng)
        except AssertionError as e:
            return str(e)
    return None


def main():
    global MUTATION
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    err = trials_pass(trials, 20261127)
    if err:
        sys.exit(f"FAILED: {err}")
    print(f"staggered ring: {trials} random interleavings, no deadlock, no stale or overwritten slot")
    # The checks can fail: each planted bug must be caught.
    for m in ["no_empty_wait", "release_current"]:
        MUTATION = m
        err = trials_pass(trials, 7)
        if not err:
            sys.exit(f"FAILED: planted bug {m} was not caught")
        print(f"planted bug {m}: caught ({err})")
    MUTATION = None


if __name__ == "__main__":
    main()
