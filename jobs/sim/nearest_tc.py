#!/usr/bin/env python3
"""Emulate kernels/nearest_tc.cu (the tensor-core grounding search) lane by lane and compare its
top-k with an exact sort of the f32 kernel's distances. No GPU needed.

  python3 jobs/sim/nearest_tc.py            # all cases (~1-2 min)
  python3 jobs/sim/nearest_tc.py --quick    # three cases
  python3 jobs/sim/nearest_tc.py --mutate nobound|race|col|thr31   # a planted bug: must FAIL

What is emulated, with the kernel's own arithmetic and order:
  - nearest_tc_prep: the power-of-two scale from the float's exponent bits, f16 rounding
    (round to nearest even, struct 'e'), the record {norm, coef*sqrt(norm), 1/s, flag};
  - nearest_tc_candidates: the main loop is fused_tc_v2.block_gemm (the v2a loop, which the
    .cu copies line for line: cp.async ring, swizzle, ldmatrix.x4 and mma.sync m16n8k16 by the
    PTX ISA fragment layouts, both cp.async completion extremes) on the f16 queries (A) and
    catalogue rows (B); grid (query blocks, slices) with launch.rs's balanced split; the
    epilogue per thread (the two FMAs of the key, rows past n -> +inf), the selection per warp:
    threshold from the list's entry 31, the any-ballot, ballots over (ri, ni, e), the
    broadcast from the lowest lane, the ballot-count position, the one-lane shift, the
    threshold re-read; warp (wm, 0) before warp (wm, 1) (the named barrier); the list write-out;
  - nearest_tc_rerank: per query the warp selection of the 32 smallest (key, row) over the
    slices, T = min(each list's 32nd key, the 32nd selected), the f32 distance of each
    candidate by sequential fmaf (nearest_topk's arithmetic), rank-by-count sort, the f64
    certificate with the 2^-20 slack, status;
  - nearest_tc_rerank_all (the second level, for the queries the first refused): warps over
    slices w, w + 8, ..., every list entry's f32 distance into a 32-entry warp list, warp 0's
    merge, T = the smallest list 32nd key, the certificate;
  - the wrapper: queries both levels refuse take the f32 kernel (here: the exact sort of the
    same f32 distances, which nearest_full.py shows nearest_topk computes).
Arithmetic: f32 rounding through struct 'f'; fmaf(a, b, c) as f32(a*b + c) with the product
exact in f64 (both operands f32) and the sum rounded to f64 first (a double rounding that can
differ from a true fmaf in rare halfway cases; both sides of every comparison use this same
function). The mma sums in f64: more accurate than the tensor core, inside the bound.
Checked per block: every catalogue row of the slice that is not in a query's list has a key
>= the list's 32nd key (the premise of the certificate). Checked at the end: the top-k of
every query equals the exact sort (distance, row) of the f32 kernel's distances, excluded rows
never returned; certified + fallback = queries; the expected fallbacks happen.
"""
import math, os, random, struct, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_tc_v2 import block_gemm, split_for_sms, BM, BN, BK, THREADS  # noqa: E402

LIST = 32
INF = math.inf
NONE = 0xFFFFFFFF
MUTATE = None


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def f16(x):
    return struct.unpack("e", struct.pack("e", x))[0]


def fmaf(a, b, c):
    return f32(a * b + c)


def before(d1, i1, d2, i2):
    return d1 < d2 or (d1 == d2 and i1 < i2)


def tc_bound(d):
    """nearest_tc.rs tc_bound (coef_q, coef_c), rounded up to f32 as there."""
    u = 2.0 ** -11
    beta = 2 * u + u * u + 2.0 ** -38 * math.sqrt(d) + d * 2.0 ** -22 * (1 + u) ** 2
    gamma32 = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    infl = 1 + d * 2.0 ** -23 + 2.0 ** -18
    up = lambda x: f32(x * (1 + 2.0 ** -20))
    return up(infl), up(2 * (beta + gamma32) * infl)


def sq_norm(x):
    """row_sq_norms: 32 lane-strided fmaf sums, then the xor-shuffle tree."""
    lanes = [0.0] * 32
    for c, v in enumerate(x):
        lanes[c % 32] = fmaf(v, v, lanes[c % 32])
    for off in (16, 8, 4, 2, 1):
        lanes = [f32(lanes[l] + lanes[l ^ off]) for l in range(32)]
    return lanes[0]


def kernel_dist(q, c, qn, cn):
    """nearest_topk's distance: fmaf over the depth in order, fmaxf(qn + cn - 2 dot, 0)."""
    dot = 0.0
    for a, b in zip(q, c):
        dot = fmaf(a, b, dot)
    d = max(f32(f32(qn + cn) - 2.0 * dot), 0.0)
    return d if d < INF else INF


def prep(rows, norms, coef):
    """nearest_tc_prep: (f16 values as floats, row-major flat), records [(norm, bound, inv, flag)]."""
    out, info = [], []
    for r, nrm in zip(rows, norms):
        mx = max((abs(x) for x in r), default=0.0)
        E, flag = 15, 0.0
        if mx > 0:
            E = ((struct.unpack("I", struct.pack("f", mx))[0] >> 23) & 0xFF) - 126
            if E < -40 or E > 40:
                flag, E = 1.0, max(-40, min(40, E))
        s, inv = 2.0 ** (15 - E), 2.0 ** (E - 15)
        out.extend(f16(f32(x * s)) for x in r)
        bound = f32(coef * f32(math.sqrt(nrm))) if nrm < INF else 0.0
        info.append((nrm, bound, inv, flag))
    return out, info


def candidates(Q16, C16, qinfo, cinfo, b, n, d, sm, model):
    """nearest_tc_candidates over the whole grid: returns [slice][query] -> 32 (key, row)."""
    qblocks = -(-b // BM); ctiles = -(-n // BN); ksteps = -(-d // BK)
    slices, per = split_for_sms(ctiles, qblocks, sm, ksteps)
    out = [[None] * b for _ in range(slices)]
    for slice_ in range(slices):
        for qb in range(qblocks):
            row0 = qb * BM
            ct_begin = slice_ * per; ct_end = min(ct_begin + per, ctiles)
            lk = [[INF] * LIST for _ in range(BM)]
            li = [[NONE] * LIST for _ in range(BM)]
            seen = {}  # (local row) -> {catalogue row: key}, for the premise check
            qQ, qm2 = {}, {}
            for tid in range(THREADS):
                warp, lane = tid >> 5, tid & 31
                wm, g = warp >> 1, lane >> 2
                for ri in range(4):
                    q = row0 + wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g
                    qQ[tid, ri] = qinfo[q][1] if q < b else 0.0
                    qm2[tid, ri] = 2.0 * qinfo[q][2] if q < b else 0.0

            def on_tile(ct, acc):
                col0 = ct * BN
                keys = {}
                for tid in range(THREADS):
                    warp, lane = tid >> 5, tid & 31
                    wm, wn = warp >> 1, warp & 1; g, t = lane >> 2, lane & 3
                    for ni in range(8):
                        for e in range(2):
                            col = col0 + wn * 64 + ni * 8 + 2 * t + e
                            cn, ce, cinv, _ = cinfo[col] if col < n else (INF, 0.0, 0.0, 0.0)
                            for ri in range(4):
                                x = f32(acc[tid][ri >> 1][ni][(ri & 1) * 2 + e])
                                base = fmaf(-qQ[tid, ri], ce, cn)
                                key = fmaf(-f32(qm2[tid, ri] * cinv), x, base)
                                keys[tid, ri, ni, e] = key
                                lr = wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g
                                if col < n:
                                    seen.setdefault(lr, {})[col] = key
                # Warp (wm, 0) then warp (wm, 1) (named barrier); bands are independent.
                for wm in range(4):
                    snap = [(lk[r][:], li[r][:]) for r in range(BM)]
                    for wn in (0, 1):
                        if MUTATE == "race" and wn == 1:
                            # Planted bug (no barrier): warp 1 inserts into the lists as they
                            # were before warp 0's insertions; per row the last writer wins.
                            w0 = [(lk[r][:], li[r][:]) for r in range(BM)]
                            for r in range(BM):
                                lk[r][:], li[r][:] = snap[r][0][:], snap[r][1][:]
                        select_warp(keys, wm, wn, col0)
                        if MUTATE == "race" and wn == 1:
                            for r in range(BM):
                                if (lk[r], li[r]) == snap[r]:
                                    lk[r][:], li[r][:] = w0[r]

            def select_warp(keys, wm, wn, col0):
                warp = wm * 2 + wn
                tids = [warp * 32 + lane for lane in range(32)]
                last = LIST - 1 if MUTATE != "thr31" else LIST - 2  # planted bug: entry 30
                row_of = lambda lane, ri: wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + (lane >> 2)
                thr = {(l, ri): lk[row_of(l, ri)][last] for l in range(32) for ri in range(4)}
                if not any(keys[tids[l], ri, ni, e] < thr[l, ri]
                           for l in range(32) for ri in range(4) for ni in range(8) for e in range(2)):
                    return  # the __any_sync skip
                for ri in range(4):
                    rbase = wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8
                    for ni in range(8):
                        for e in range(2):
                            want = [l for l in range(32) if keys[tids[l], ri, ni, e] < thr[l, ri]]
                            cbase = col0 + wn * 64 + ni * 8 + e
                            for src in want:  # ascending lane order (__ffs)
                                ck = keys[tids[src], ri, ni, e]
                                cix = cbase + (2 * (src & 3) if MUTATE != "col" else 0)
                                r = rbase + (src >> 2)
                                L = list(zip(lk[r], li[r]))
                                pos = sum(before(L[l][0], L[l][1], ck, cix) for l in range(32))
                                if pos < LIST:
                                    up = [L[l - 1] if l > 0 else L[0] for l in range(32)]
                                    for l in range(32):
                                        if l > pos:
                                            lk[r][l], li[r][l] = up[l]
                                        elif l == pos:
                                            lk[r][l], li[r][l] = ck, cix
                    for l in range(32):
                        thr[l, ri] = lk[row_of(l, ri)][last]

            block_gemm(Q16, C16, b, n, d, row0, ct_begin, ct_end, model, on_tile)
            for lr in range(BM):
                q = row0 + lr
                if q >= b:
                    continue
                # The certificate's premise: rows of the slice outside the list have key >= its
                # 32nd key (and no row appears twice).
                inlist = set(x for x in li[lr] if x != NONE)
                assert len(inlist) == sum(1 for x in li[lr] if x != NONE), "row listed twice"
                for col, key in seen.get(lr, {}).items():
                    if col not in inlist and key < INF:
                        assert key >= lk[lr][LIST - 1], \
                            f"query {q}: row {col} (key {key}) outside the list under its 32nd {lk[lr][LIST - 1]}"
                out[slice_][q] = list(zip(lk[lr], li[lr]))
    return out, slices, per


def rerank(Q, C, qn, cn_ex, qinfo, cand, slices, b, d, k, c2max):
    """nearest_tc_rerank, one warp per query. Returns [(topk, status, margin)]."""
    res = []
    for q in range(b):
        L = [(INF, NONE)] * 32
        tl = INF
        for s in range(slices):
            chunk = cand[s][q]
            tl = min(tl, chunk[LIST - 1][0])
            thk, thi = L[31]
            want = [l for l in range(32) if chunk[l][1] != NONE and before(chunk[l][0], chunk[l][1], thk, thi)]
            for src in want:
                sk, sx = chunk[src]
                pos = sum(before(L[l][0], L[l][1], sk, sx) for l in range(32))
                if pos < 32:
                    L = L[:pos] + [(sk, sx)] + L[pos:31]
        # (tl >= the 32nd selected key whenever a list is full, so T is the latter; the kernel
        # keeps both as written in the certificate.)
        T = min(tl, L[31][0])
        dist = [kernel_dist(Q[q], C[j], qn[q], cn_ex[j]) if j != NONE else INF for _, j in L]
        ids = [j for _, j in L]
        srt = [(INF, NONE)] * 32
        for l in range(32):
            pos = sum(before(dist[m], ids[m], dist[l], ids[l]) for m in range(32))
            if ids[l] != NONE:
                srt[pos] = (dist[l], ids[l])
        dk = srt[k - 1][0]
        slack = 9.5367431640625e-07 * (qn[q] + c2max)
        if MUTATE == "nobound":
            slack = 0.0
        lhs = qn[q] + T - slack
        ok = lhs > dk and qinfo[q][3] == 0.0
        res.append((srt[:k], ok, lhs - dk))
    return res


def rerank_all(Q, C, qn, cn_ex, qinfo, cand, slices, b, d, k, c2max, q, warps=8):
    """nearest_tc_rerank_all for query q: warp w re-ranks slices w, w + 8, ... into a 32-entry
    list by (distance, row), warp 0 merges the others; T = the smallest list 32nd key."""
    def insert_chunk(L, chunk):
        thd, thi = L[31]
        want = [l for l in range(32) if chunk[l][1] != NONE and before(chunk[l][0], chunk[l][1], thd, thi)]
        for src in want:
            sd_, sx = chunk[src]
            pos = sum(before(L[l][0], L[l][1], sd_, sx) for l in range(32))
            if pos < 32:
                L = L[:pos] + [(sd_, sx)] + L[pos:31]
        return L
    lists, tls = [], []
    for w in range(warps):
        L, tl = [(INF, NONE)] * 32, INF
        for s in range(w, slices, warps):
            chunk = cand[s][q]
            tl = min(tl, chunk[LIST - 1][0])
            dist = [(kernel_dist(Q[q], C[j], qn[q], cn_ex[j]) if j != NONE else INF, j) for _, j in chunk]
            L = insert_chunk(L, dist)
        lists.append(L); tls.append(tl)
    L, tl = lists[0], tls[0]
    for w in range(1, warps):
        tl = min(tl, tls[w])
        L = insert_chunk(L, lists[w])
    dk = L[k - 1][0]
    slack = 9.5367431640625e-07 * (qn[q] + c2max) if MUTATE != "nobound" else 0.0
    lhs = qn[q] + tl - slack
    return L[:k], lhs > dk and qinfo[q][3] == 0.0


def run(name, Q, C, k, excl, sm, model="late", expect=None):
    b, n, d = len(Q), len(C), len(Q[0])
    Q = [[f32(x) for x in r] for r in Q]
    C = [[f32(x) for x in r] for r in C]
    coef_q, coef_c = tc_bound(d)
    if MUTATE == "nobound":
        coef_c = 0.0
    qn = [sq_norm(r) for r in Q]
    cn = [sq_norm(r) for r in C]
    c2max = max(cn)
    cn_ex = [INF if j in excl else cn[j] for j in range(n)]
    Q16, qinfo = prep(Q, qn, coef_q)
    C16, cinfo = prep(C, cn_ex, coef_c)
    assert all(r[3] == 0.0 for r in cinfo), "catalogue scale out of range: f32 path"
    cand, slices, per = candidates(Q16, C16, qinfo, cinfo, b, n, d, sm, model)
    res = rerank(Q, C, qn, cn_ex, qinfo, cand, slices, b, d, k, c2max)
    certified = deep = fallback = 0
    for q in range(b):
        exact = sorted((kernel_dist(Q[q], C[j], qn[q], cn_ex[j]), j) for j in range(n) if j not in excl)[:k]
        top, ok, margin = res[q]
        if ok:
            certified += 1
            got = top
        else:
            top2, ok2 = rerank_all(Q, C, qn, cn_ex, qinfo, cand, slices, b, d, k, c2max, q)
            if ok2:
                certified += 1; deep += 1
                got = top2
            else:
                fallback += 1
                got = exact  # the f32 kernel (nearest_full.py emulates it)
        assert got == exact, f"{name}: query {q}: {got[:4]} vs exact {exact[:4]} (margin {margin:.3e})"
    print(f"[{model:5}] {name}: b={b} n={n} d={d} k={k}, {slices} slices x {per} tiles: "
          f"{certified} certified ({deep} at level 2), {fallback} through the f32 kernel", flush=True)
    if expect == "some-refused":
        assert deep + fallback > 0, f"{name}: expected the first level to refuse some"
    if expect == "all-fallback":
        assert certified == 0, f"{name}: expected every query to fall back"
    if expect == "some-certified":
        assert certified > 0, f"{name}: expected certified queries"


def gauss(rnd, rows, d, scale=1.0):
    return [[rnd.gauss(0, scale) for _ in range(d)] for _ in range(rows)]


def adversarial(d=16):
    """nearest_tc.rs model_without_the_bound_is_wrong's data: A rows (1 + 2^-12 everywhere:
    f16 rounds them to 1, key 2^-7 too high) are the true nearest; Z rows are exact in f16."""
    rows = [[1 + 2.0 ** -12] * d for _ in range(10)]
    rows += [[1 + 2.0 ** -9] + [1.0] * (d - 1) for _ in range(10)]
    rows += [[1 + 3 * 2.0 ** -10] + [1.0] * (d - 1) for _ in range(30)]
    rows += [[3.0 + j] + [3.0] * (d - 1) for j in range(150)]
    return [[1.0] * d], rows


def main():
    global MUTATE
    quick = "--quick" in sys.argv
    if "--mutate" in sys.argv:
        MUTATE = sys.argv[sys.argv.index("--mutate") + 1]
    rnd = random.Random(20261127)
    cases = []
    # One query, n < 32 (every row a candidate, T = +inf), one k-step (d = 8 < BK).
    cases.append(("tiny", gauss(rnd, 2, 8), gauss(rnd, 20, 8), 5, {0, 3}, 4, "some-certified"))
    # Two query blocks (130 queries: a partial one), d = 72 (two k-steps, the second partial),
    # partial catalogue tile, 2+ slices, excluded rows.
    cases.append(("gauss", gauss(rnd, 130, 72), gauss(rnd, 400, 72), 10, {0, 5, 130}, 4, "some-certified"))
    # 0/1 coordinates: exact ties at the k-th distance beyond the re-ranked 32 -> the first
    # level refuses (the second may certify).
    cases.append(("ties", [[float(rnd.random() < 0.5) for _ in range(8)] for _ in range(24)],
                  [[float(rnd.random() < 0.5) for _ in range(8)] for _ in range(1500)], 10, {1}, 3,
                  "some-refused"))
    # Crowded: every distance equal within the bound -> every query falls back.
    cases.append(("crowded", [[0.5] * 16 for _ in range(3)],
                  [[1 + rnd.gauss(0, 1e-6) for _ in range(16)] for _ in range(300)], 10, set(), 2,
                  "all-fallback"))
    # A query with values below 2^-41 (clamped scale) falls back; k = 16, 3 tiles in a slice.
    cases.append(("clamped", [[1e-14 * x for x in gauss(rnd, 1, 16)[0]]] + gauss(rnd, 2, 16),
                  gauss(rnd, 300, 16), 16, set(), 1, "some-refused"))
    # The adversarial data of the Rust model test: right (by falling back) with the bound.
    q, c = adversarial()
    cases.append(("adversarial", q, c, 10, set(), 1, "all-fallback" if MUTATE != "nobound" else None))
    if MUTATE:
        pick = {"nobound": "adversarial", "race": "gauss", "col": "gauss", "thr31": "gauss"}[MUTATE]
        cases = [x for x in cases if x[0] == pick]
    elif quick:
        cases = [x for x in cases if x[0] in ("tiny", "ties", "adversarial")]
    for i, (name, Q, C, k, excl, sm, expect) in enumerate(cases):
        models = ("early", "late") if name == "tiny" else ("late",)
        for model in models:
            run(name, Q, C, k, excl, sm, model, expect)
    print("nearest_tc emulation equals the exact top-k" + (f" (mutation {MUTATE} NOT caught!)" if MUTATE else ""))
    if MUTATE:
        sys.exit(3)


if __name__ == "__main__":
    main()
