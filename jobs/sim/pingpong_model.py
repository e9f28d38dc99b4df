#!/usr/bin/env python3
"""Timing model behind v5 (docs/kernels.md, section 3d): how busy the tensor cores stay when
two consumer warpgroups share them and a ring of R stages, each warpgroup running an epilogue
of E cycles after every tile of K steps, against v3's lockstep loop, where both warpgroups
reach their epilogues together and the tensor cores wait for both (sharing the MUFU units,
so 2E).

Units: one warpgroup's products of one 64-deep step (m64n256k16 x 4) take `step` cycles with
the tensor cores to itself (64 x 256 x 64 x 2 FLOP at ~4,096 dense bf16 FLOP/cycle/SM on
H100/H200: 512); the tensor cores serve one step at a time, in issue order. A consumer may
have two steps in flight (wgmma.wait_group 1); step s may start once its stage is full: the
producer refills a slot L cycles after both consumers released its previous step. The
scoring epilogue (16,384 exp() per warpgroup and tile at 16 MUFU results/cycle/SM) is ~1,024
cycles. Not a cycle-accurate model: it ignores issue slots, L2 bandwidth and the main loop's
own inefficiency (v3's main loop alone runs at 78-87% of the floor), so multiply.

  python3 jobs/sim/pingpong_model.py
"""


def specialised(K, E, R, L, tiles=40, step=512):
    """Tensor-core utilisation of v5's schedule (independent consumers, producer-fed ring)."""
    total = tiles * K
    retire = [[0.0] * total for _ in range(2)]
    ready = [0.0, 0.0]        # when a consumer may issue its next step
    nxt = [0, 0]
    tc_free, busy, epis = 0.0, 0.0, []
    while nxt[0] < total or nxt[1] < total:
        cands = []
        for w in range(2):
            s = nxt[w]
            if s >= total or (s >= R and nxt[1 - w] <= s - R):
                continue  # done, or the slot's previous step not yet issued by the other
            full = L if s < R else max(retire[0][s - R], retire[1][s - R]) + L
            cands.append((max(ready[w], full, retire[w][s - 2] if s >= 2 else 0.0), w))
        t, w = min(cands)
        s = nxt[w]
        start = max(t, tc_free)
        tc_free = retire[w][s] = start + step
        busy += step
        nxt[w] += 1
        ready[w] = t
        if (s + 1) % K == 0:  # the tile's epilogue; overlapping epilogues share the MUFU
            e0, dur = retire[w][s], E
            for a, b in epis:
                dur += max(0.0, min(b, e0 + dur) - max(a, e0))
            epis.append((e0, e0 + dur))
            ready[w] = e0 + dur
    return busy / (max(retire[0][-1], retire[1][-1]) + E)


def lockstep(K, E, step=512):
    """v3: both warpgroups' steps back to back, then both epilogues at once (MUFU shared)."""
    return K * 2 * step / (K * 2 * step + 2 * E)


if __name__ == "__main__":
    E = 1024
    print("K = 64-deep steps per tile (d / 64); tensor-core utilisation of the main loop")
    print(f"{'K':>3} {'d':>5} {'v3 lockstep':>12} " + " ".join(f"{'v5 R=' + str(r):>9}" for r in (3, 4, 5)))
    for K in (9, 14, 64):
        row = " ".join(f"{specialised(K, E, r, 750):9.3f}" for r in (3, 4, 5))
        print(f"{K:3d} {64 * K:5d} {lockstep(K, E):12.3f} {row}")
    print("v5 R=4 with a slower producer (L = copy latency in cycles):")
    for L in (750, 1500, 2500):
        print(f"  L={L}: K=9 {specialised(9, E, 4, L):.3f}, K=64 {specialised(64, E, 4, L):.3f}")
