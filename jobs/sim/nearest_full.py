#!/usr/bin/env python3
"""Emulate kernels/nearest.cu's nearest_topk end to end (shared tiles, thread -> (query, row)
mapping of the dot products, distance tile, per-warp top-k, slice-major output) plus the host
merge (nearest.rs merge_candidates), against an exact sort. No GPU needed.

  python3 jobs/sim/nearest_full.py
"""
import math, random

BQ, BI, BK, THREADS = 32, 64, 16, 256
INF = math.inf; NONE = 0xffffffff

def before(d1, i1, d2, i2): return d1 < d2 or (d1 == d2 and i1 < i2)

def insert(L, cd, ci, k):
    pos = sum(before(e[0], e[1], cd, ci) for e in L)
    if pos >= k: return L
    return L[:pos] + [(cd, ci)] + L[pos:-1]

def tile_split(tiles, row_blocks, target):
    want = max(1, min(tiles, -(-target // max(row_blocks, 1))))
    per = -(-tiles // want)
    return -(-tiles // per), per

def run(b, n, d, k, excl, sm=2):
    rnd = random.Random(b * 7 + n)
    # small integers: exact in f32 and f64, many ties
    Q = [[rnd.randint(-2, 2) for _ in range(d)] for _ in range(b)]
    C = [[rnd.randint(-2, 2) for _ in range(d)] for _ in range(n)]
    qn = [sum(x * x for x in r) for r in Q]; cn = [sum(x * x for x in r) for r in C]
    for e in excl: cn[e] = INF
    qblocks = -(-b // BQ); ctiles = -(-n // BI)
    slices, per = tile_split(ctiles, qblocks, sm * 4)
    out = [[(None, None)] * k for _ in range(slices * b)]
    for s in range(slices):
        for by in range(qblocks):
            q0 = by * BQ
            lists = [[(INF, NONE)] * 64 for _ in range(BQ)]
            for ct in range(s * per, min(s * per + per, ctiles)):
                c0 = ct * BI
                acc = [[[0] * 4 for _ in range(2)] for _ in range(THREADS)]
                for k0 in range(0, d, BK):
                    Qs = [[0] * BQ for _ in range(BK)]; Cs = [[0] * BI for _ in range(BK)]
                    for e in range(BQ * BK):
                        r, kk = e // BK, e % BK
                        Qs[kk][r] = Q[q0 + r][k0 + kk] if q0 + r < b and k0 + kk < d else 0
                    for e in range(BI * BK):
                        r, kk = e // BK, e % BK
                        Cs[kk][r] = C[c0 + r][k0 + kk] if c0 + r < n and k0 + kk < d else 0
                    for tid in range(THREADS):
                        tq, ti = tid >> 4, tid & 15
                        for kk in range(BK):
                            for j in range(4):
                                acc[tid][0][j] += Qs[kk][tq] * Cs[kk][ti + 16 * j]
                                acc[tid][1][j] += Qs[kk][tq + 16] * Cs[kk][ti + 16 * j]
                D = [[None] * BI for _ in range(BQ)]
                for tid in range(THREADS):
                    tq, ti = tid >> 4, tid & 15
                    for i in range(2):
                        ql = tq + 16 * i; gq = q0 + ql
                        qv = qn[gq] if gq < b else 0
                        for j in range(4):
                            cl = ti + 16 * j; gc = c0 + cl
                            dist = max(qv + cn[gc] - 2 * acc[tid][i][j], 0) if gc < n else INF
                            D[ql][cl] = dist if dist < INF else INF
                for warp in range(8):
                    for w in range(4):
                        ql = warp * 4 + w
                        for half in range(2):
                            td, ti_ = lists[ql][k - 1]
                            want = [(D[ql][half * 32 + l], c0 + half * 32 + l) for l in range(32)
                                    if D[ql][half * 32 + l] < INF and before(D[ql][half * 32 + l], c0 + half * 32 + l, td, ti_)]
                            for cd, ci in want:
                                lists[ql] = insert(lists[ql], cd, ci, k)
            for ql in range(BQ):
                gq = q0 + ql
                if gq < b:
                    out[s * b + gq] = lists[ql][:k]
    # host merge (merge_candidates)
    for q in range(b):
        cands = [e for s in range(slices) for e in out[s * b + q] if e[1] != NONE]
        got = sorted(cands)[:k]
        ref = sorted((sum((a - c) ** 2 for a, c in zip(Q[q], C[j])), j) for j in range(n) if j not in excl)[:k]
        assert got == ref, (q, got, ref)
    print(f"b={b} n={n} d={d} k={k}: {slices} slices x {per} tiles, equal to the exact sort")

for args in [(1, 5, 3, 3, [0, 2]), (37, 300, 20, 10, [0]), (33, 129, 17, 1, []), (5, 700, 8, 64, [3])]:
    run(*args)
