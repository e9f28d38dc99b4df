#!/usr/bin/env python3
"""Emulate kernels/item_loglik_fused.cu's tensor-core kernel (fused_tc) lane by lane in plain
Python, with mma.sync m16n8k16 defined by the PTX ISA fragment layouts (not by the kernel's
addressing), and compare per-token log-probs with a direct computation. Checks the shared-
memory addressing of the fragments, the epilogue's (row, column) mapping, the online
log-sum-exp, the group/warp merges, the vocabulary split and the combine step. No GPU needed.

  python3 jobs/sim/fused_tc.py
"""
import math, random

BM = BN = 64; BK = 32; LDS = BK + 8; THREADS = 128
NEG_INF = -math.inf

def lse_merge(m, s, om, os_):
    M = max(m, om)
    if M == NEG_INF: return M, 0.0
    return M, s * math.exp(m - M) + os_ * math.exp(om - M)

def mma(c, a, b):
    """c[lane][4] += A.B with A (16x16), B (16x8) gathered from lane registers by the ISA
    layout: a[lane][r] = (lo, hi) pairs, b[lane][r] likewise."""
    A = [[None] * 16 for _ in range(16)]; B = [[None] * 8 for _ in range(16)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for r, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[row][col], A[row][col + 1] = a[lane][r]
        for r, k in enumerate([2 * t, 2 * t + 8]):
            B[k][g], B[k + 1][g] = b[lane][r]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for e, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            c[lane][e] += sum(A[row][k] * B[k][col] for k in range(16))

def tile_split(tiles, row_blocks, target):
    want = max(1, min(tiles, -(-target // max(row_blocks, 1))))
    per = -(-tiles // want)
    return -(-tiles // per), per

def run(n, v, d, sm=2):
    rnd = random.Random(n * 1000 + v)
    H = [[rnd.gauss(0, 1) for _ in range(d)] for _ in range(n)]
    W = [[rnd.gauss(0, 0.5) for _ in range(d)] for _ in range(v)]
    T = [rnd.randrange(v) for _ in range(n)]
    row_blocks = -(-n // BM); vtiles = -(-v // BN)
    slices, per = tile_split(vtiles, row_blocks, sm * 4)
    part_m = [[None] * n for _ in range(slices)]; part_s = [[None] * n for _ in range(slices)]
    tgt_logit = [math.nan] * n
    for slice_ in range(slices):
        for by in range(row_blocks):
            row0 = by * BM
            # per-thread state: run_m[tid][ri], run_s, tgt
            run_m = [[NEG_INF] * 4 for _ in range(THREADS)]; run_s = [[0.0] * 4 for _ in range(THREADS)]
            def rowof(warp, lane, ri):
                wm = warp >> 1; g = lane >> 2
                return row0 + wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g
            for vt in range(slice_ * per, min(slice_ * per + per, vtiles)):
                col0 = vt * BN
                acc = [[[[0.0] * 4 for _ in range(4)] for _ in range(2)] for _ in range(THREADS)]  # [tid][mi][ni][e]
                for k0 in range(0, d, BK):
                    sa = [0.0] * (BM * LDS); sb = [0.0] * (BN * LDS)
                    for c in range(64 * (BK // 8)):  # all chunks, whichever thread loads them
                        r, kc = c // (BK // 8), (c % (BK // 8)) * 8
                        for j in range(8):
                            gk = k0 + kc + j
                            sa[r * LDS + kc + j] = H[row0 + r][gk] if row0 + r < n and k0 + kc < d else 0.0
                            sb[r * LDS + kc + j] = W[col0 + r][gk] if col0 + r < v and k0 + kc < d else 0.0
                    for kk in range(0, BK, 16):
                        for warp in range(4):
                            wm, wn = warp >> 1, warp & 1
                            a = [[None] * 4 for _ in range(32)]
                            for mi in range(2):
                                afr = [[None] * 4 for _ in range(32)]
                                for lane in range(32):
                                    g, t = lane >> 2, lane & 3
                                    p = (wm * 32 + mi * 16 + g) * LDS + kk + 2 * t
                                    for r, off in enumerate([0, 8 * LDS, 8, 8 * LDS + 8]):
                                        afr[lane][r] = (sa[p + off], sa[p + off + 1])
                                for ni in range(4):
                                    bfr = [[None] * 2 for _ in range(32)]
                                    for lane in range(32):
                                        g, t = lane >> 2, lane & 3
                                        p = (wn * 32 + ni * 8 + g) * LDS + kk + 2 * t
                                        bfr[lane][0] = (sb[p], sb[p + 1]); bfr[lane][1] = (sb[p + 8], sb[p + 9])
                                    c = [acc[warp * 32 + lane][mi][ni] for lane in range(32)]
                                    mma(c, afr, bfr)
                # epilogue
                for tid in range(THREADS):
                    warp, lane = tid >> 5, tid & 31; wm, wn = warp >> 1, warp & 1; g, t = lane >> 2, lane & 3
                    for ri in range(4):
                        mi, h = ri >> 1, ri & 1
                        row = rowof(warp, lane, ri)
                        xs = []
                        for ni in range(4):
                            for e in range(2):
                                col = col0 + wn * 32 + ni * 8 + 2 * t + e
                                val = acc[tid][mi][ni][h * 2 + e]
                                if col < v:
                                    xs.append(val)
                                    if row < n and col == T[row]: tgt_logit[row] = val
                        lmax = max(xs) if xs else NEG_INF
                        M = max(run_m[tid][ri], lmax)
                        if M != NEG_INF:
                            run_s[tid][ri] = run_s[tid][ri] * math.exp(run_m[tid][ri] - M) + sum(math.exp(x - M) for x in xs)
                            run_m[tid][ri] = M
            # merge the 4 lanes of a group (xor 1, 2), then the two column warps
            red = {}
            for tid in range(THREADS):
                warp, lane = tid >> 5, tid & 31
                if lane & 3: continue
                for ri in range(4):
                    m, s = NEG_INF, 0.0
                    for o in range(4):
                        m, s = lse_merge(m, s, run_m[tid + o][ri], run_s[tid + o][ri])
                    r = rowof(warp, lane, ri) - row0
                    red[(warp & 1, r)] = (m, s)
            for r in range(BM):
                if row0 + r < n:
                    m, s = lse_merge(*red[(0, r)], *red[(1, r)])
                    part_m[slice_][row0 + r] = m; part_s[slice_][row0 + r] = s
    worst = 0.0
    for row in range(n):
        M = max(part_m[j][row] for j in range(slices))
        S = sum(part_s[j][row] * math.exp(part_m[j][row] - M) for j in range(slices))
        got = tgt_logit[row] - (M + math.log(S))
        logits = [sum(H[row][k] * W[j][k] for k in range(d)) for j in range(v)]
        m = max(logits); want = logits[T[row]] - (m + math.log(sum(math.exp(x - m) for x in logits)))
        assert got == got, f"row {row}: NaN (target logit never written)"
        worst = max(worst, abs(got - want))
    print(f"n={n} v={v} d={d}: {slices} slices x {per} tiles, max |err| {worst:.2e}")
    assert worst < 1e-9

if __name__ == "__main__":  # fused_tc_v2.py imports mma() from here
    for n, v, d in [(3, 10, 8), (70, 130, 48), (64, 200, 32), (5, 700, 16)]:
        run(n, v, d)
    print("fused_tc emulation equals the direct computation")
