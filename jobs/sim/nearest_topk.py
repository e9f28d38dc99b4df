#!/usr/bin/env python3
"""Simulate kernels/nearest.cu's warp top-k (ballot admission against the k-th entry, ballot-count
position, one-lane shift across the two register slots) against sorted(), ties and excluded
rows included. No GPU needed:  python3 jobs/sim/nearest_topk.py"""
# Simulate nearest.cu's warp top-k (topk_last, ballot admission, topk_insert) against sorted().
import random, math
INF = math.inf; NONE = 0xffffffff
def before(d1,i1,d2,i2): return d1 < d2 or (d1 == d2 and i1 < i2)
def insert(L0, L1, cd, ci, k):
    b0 = [before(L0[l][0],L0[l][1],cd,ci) for l in range(32)]
    b1 = [before(L1[l][0],L1[l][1],cd,ci) for l in range(32)]
    pos = sum(b0)+sum(b1)
    if pos >= k: return L0, L1
    up0 = [L0[l-1] if l>0 else L0[0] for l in range(32)]
    up1 = [L1[l-1] if l>0 else L1[0] for l in range(32)]
    last0 = L0[31]
    N0, N1 = list(L0), list(L1)
    for lane in range(32):
        p1 = 32+lane
        if p1 > pos: N1[lane] = last0 if lane == 0 else up1[lane]
        elif p1 == pos: N1[lane] = (cd, ci)
        if lane > pos: N0[lane] = up0[lane]
        elif lane == pos: N0[lane] = (cd, ci)
    return N0, N1
def last(L0, L1, k):
    p = k-1
    return L0[p & 31] if p < 32 else L1[p & 31]
def run(n, k, excl, ties):
    dists = [float(random.randint(0, 5)) if ties else random.random() for _ in range(n)]
    for e in excl: dists[e] = INF
    L0 = [(INF, NONE)]*32; L1 = [(INF, NONE)]*32
    for c0 in range(0, n, 64):
        for half in range(2):
            cand = []
            for lane in range(32):
                cl = c0 + half*32 + lane
                cand.append((dists[cl] if cl < n else INF, cl))
            td, ti = last(L0, L1, k)
            want = [lane for lane in range(32) if cand[lane][0] < INF and before(cand[lane][0], cand[lane][1], td, ti)]
            for src in want:
                L0, L1 = insert(L0, L1, cand[src][0], cand[src][1], k)
    got = (L0 + L1)[:k]
    ref = sorted([(d, i) for i, d in enumerate(dists) if d < INF])[:k]
    ref += [(INF, NONE)] * (k - len(ref))
    assert got == ref, (n, k, got[:5], ref[:5])
random.seed(1)
for trial in range(400):
    n = random.randint(1, 700); k = random.randint(1, 64)
    excl = random.sample(range(n), min(n, random.randint(0, 3)))
    run(n, k, excl, ties=trial % 2 == 0)
print("top-k simulation: 400 random cases equal to sorted()")
