#!/usr/bin/env python3
"""Model of the re-rank's staged dot product (kernels/nearest_tc.cu: nt_dot_in_order with
NT_DOT_STAGES > 0): one warp, each lane's catalogue row and the warp's query row copied with
cp.async in batches of NT_DOT_BATCH float4 into a ring of NT_DOT_STAGES stages (a lane slot
of BATCH + 1 float4 per lane, then the query's BATCH float4 copied by the first BATCH lanes),
committed as one group per iteration, `cp.async.wait_group STAGES - 1`, the FMAs from
shared memory, then the tail from global memory. The control flow is the kernel's, line for
line; the 32 lanes move in lockstep, as the kernel's two __syncwarp per iteration make them
where it matters (the query's chunk is copied by some lanes and read by all). Checked for every (n4, BATCH, STAGES) in a grid and for copies landing at the two
extremes (at issue: catches a copy overwriting a stage before every lane has read it; at the
wait that covers them: catches a read before its copy is waited for) and at random times in
between:
  - each lane's FMAs use (q[i], c[i]) for i = 0 .. n4 - 1 in order (the f32 kernel's order,
    so the distance stays bit for bit nearest_topk's);
  - every shared-memory read finds the value its batch copied;
  - the slots are within the warp's NT_DOT_WARP_BYTES, lanes' slots do not overlap, and each
    quarter warp's LDS.128 at one offset touches 8 distinct 4-bank groups (no conflicts).
Three planted bugs (a wait that allows one group too many, the stage index off by one, the
tail starting one batch early) must each be caught.

  python3 jobs/sim/rerank_stage.py      (exit 0 = all checks passed, every planted bug caught)
"""
import random
import sys


class Caught(Exception):
    pass


def staged_dot(n4, batch, stages, land, rng, bug=None):
    """One warp's walk; returns each lane's list of depth indices in FMA order."""
    slot = batch + 1
    stage_f4 = 32 * slot + batch
    smem = {}  # float4 offset within the warp's buffer -> ("c", lane, i) or ("q", i)
    groups = []  # committed groups: lists of (offset, value)
    current = []
    order = [[] for _ in range(32)]

    def write(off, val):
        if not 0 <= off < stages * stage_f4:
            raise Caught(f"slot {off} outside the warp's {stages * stage_f4} float4")
        if land == "issue":
            smem[off] = val
        else:
            current.append((off, val))

    def issue(j):
        st = (j % stages) * stage_f4
        i0 = j * batch
        for lane in range(32):
            for u in range(batch):
                write(st + lane * slot + u, ("c", lane, i0 + u))
            if lane < batch:
                write(st + 32 * slot + lane, ("q", i0 + lane))

    def commit():
        nonlocal current
        groups.append(current)
        current = []

    def wait(pending):
        # Every group but the last `pending` has landed; "random": some later ones too.
        done = len(groups) - pending
        for gi, g in enumerate(groups):
            if gi < done or (land == "random" and rng.random() < 0.3):
                for off, val in g:
                    smem[off] = val
                g.clear()

    nb = n4 // batch
    for j in range(stages - 1):
        if j < nb:
            issue(j)
        commit()
    for j in range(nb):
        if j + stages - 1 < nb:
            issue(j + stages - 1)
        commit()
        wait(stages - 1 + (1 if bug == "wait" else 0))
        st = ((j + (1 if bug == "stage" else 0)) % stages) * stage_f4
        for lane in range(32):
            for u in range(batch):
                a = smem.get(st + 32 * slot + u)
                c = smem.get(st + lane * slot + u)
                i = j * batch + u
                if a != ("q", i) or c != ("c", lane, i):
                    raise Caught(f"n4={n4} batch={batch} stages={stages} j={j} lane={lane} "
                                 f"u={u}: read {a}, {c}")
                order[lane].append(i)
    i = nb * batch - (batch if bug == "tail" and nb > 0 else 0)
    for lane in range(32):
        order[lane].extend(range(i, n4))
    return order


def banks_ok(batch):
    slot_words = 4 * (batch + 1)
    for u in range(batch):
        for quarter in range(4):
            groups = {((l * slot_words + 4 * u) % 32) // 4 for l in range(8 * quarter, 8 * quarter + 8)}
            if len(groups) != 8:
                return False
    return True


def check(n4, batch, stages, land, rng, bug=None):
    order = staged_dot(n4, batch, stages, land, rng, bug)
    for lane, o in enumerate(order):
        if o != list(range(n4)):
            raise Caught(f"n4={n4} batch={batch} stages={stages}: lane {lane} order {o[:12]}...")


def main():
    rng = random.Random(7)
    configs = [(b, s) for b in (1, 2, 4, 8, 16) for s in (2, 3, 4)]
    n4s = list(range(0, 40)) + [96, 1024]  # 1024 = d 4096; 96 = d 384
    for batch, stages in configs:
        for n4 in n4s:
            for land in ("issue", "wait", "random"):
                check(n4, batch, stages, land, rng)
    # The padded slot (BATCH + 1 float4) is conflict-free when BATCH is even (an odd slot
    # stride in float4; the kernel's static_assert), and not for BATCH = 1 or 3.
    for batch in (2, 4, 8, 16):
        assert banks_ok(batch), f"NT_DOT_BATCH = {batch}: bank conflicts"
    assert not banks_ok(1) and not banks_ok(3)
    print(f"ok: {len(configs)} (batch, stages) x {len(n4s)} depths x 3 landing orders")
    for bug in ("wait", "stage", "tail"):
        caught = False
        for land in ("issue", "wait"):
            try:
                check(1024, 8, 3, land, rng, bug)
                check(37, 8, 3, land, rng, bug)
            except Caught as e:
                caught = True
                print(f"planted bug '{bug}' caught ({land}): {e}")
                break
        if not caught:
            print(f"planted bug '{bug}' NOT caught")
            sys.exit(1)


if __name__ == "__main__":
    main()
