#!/usr/bin/env python3
"""Emulate kernels/item_loglik_fused_v2.cu (fused_tc_v2, version 2a) lane by lane in plain
Python and compare per-token log-probs with a direct computation. No GPU needed.

What is emulated with the kernel's own address arithmetic (copied from the .cu, line for line):
  - the cp.async producer: per thread, 4 + 4 chunks of 16 B per step, source pointers a_src /
    b_src with stride32 and k0, zero-fill (src-size 0) past n, v and d, destination
    stage + f2_swz(tid >> 3, tid & 7) + i * 32 rows;
  - the stage ring: prologue of STAGES-1 commit groups, per step wait_group(STAGES-2) ->
    barrier -> issue step s+STAGES-1 into st_write -> commit -> read st_read; the flattened
    (tile, k-step) sequence across vocabulary tiles;
  - the ldmatrix.x4 row addresses of A and B (a_row_off, a_ch, b_row_off, b_ch, swz);
  - the epilogue's (row, column) mapping, the online log-sum-exp, the group/warp merges, the
    vocabulary split and the combine.
What is defined independently of the kernel, by the PTX ISA:
  - ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8j..8j+7 supply the row addresses of matrix j
    (8 rows of 8 b16, 16 B each, 16-byte aligned); lane l receives in register j the elements
    (row l // 4, columns 2 (l % 4) and 2 (l % 4) + 1) of matrix j;
  - mma.sync m16n8k16 (imported from fused_tc.py, the fragment layouts of the ISA);
  - cp.async completion: a thread's copies of a commit group land at some time between issue
    and the wait_group that retires the group. Both extremes are run: "early" (land at issue:
    catches a copy into a stage that is still being read) and "late" (land at the wait:
    catches a read of a stage whose copies have not been waited for). Each read is also checked
    against the bytes of copies still in flight, explicitly.
Also checked: each 8-address phase of every ldmatrix touches all 32 banks once (no bank
conflicts), and so does every 8-lane phase of the cp.async writes.

  python3 jobs/sim/fused_tc_v2.py
"""
import math, os, random, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_tc import mma, lse_merge  # ISA mma.sync m16n8k16; (max, sum-exp) merge

BM = BN = 128; BK = 64; STAGES = 3; THREADS = 256
ROW_BYTES = BK * 2
A_BYTES = BM * BK * 2; B_BYTES = BN * BK * 2; STAGE_BYTES = A_BYTES + B_BYTES
NEG_INF = -math.inf


def swz(r, ch):  # f2_swz
    return r * ROW_BYTES + ((ch ^ (r & 7)) << 4)


def banks_of(addr):  # the 4 banks of a 16-byte row at a 16-byte-aligned byte address
    assert addr % 16 == 0, f"misaligned 16-byte access at {addr}"
    return [((addr >> 2) + w) % 32 for w in range(4)]


def ldmatrix_x4(smem, addrs, read_log):
    """PTX ISA ldmatrix .x4 .b16 (no .trans). addrs[lane]: byte address supplied by the lane.
    Returns regs[lane][j] = (lo, hi)."""
    regs = [[None] * 4 for _ in range(32)]
    for j in range(4):
        rows = []
        bank_set = set()
        for i in range(8):
            a = addrs[8 * j + i]
            bank_set.update(banks_of(a))
            rows.append([smem[a // 2 + c] for c in range(8)])
            read_log.update(range(a // 2, a // 2 + 8))
        assert len(bank_set) == 32, f"bank conflict in ldmatrix matrix {j}: {sorted(bank_set)}"
        for l in range(32):
            r, c = l // 4, 2 * (l % 4)
            regs[l][j] = (rows[r][c], rows[r][c + 1])
    return regs


def split_for_sms(tiles, row_blocks, sm, steps_per_tile, overhead=4):
    """launch.rs TileSplit::balanced: the per-slice tile count minimising the busiest SM's
    k-steps, ceil(blocks / SMs) x (tiles per block x steps per tile + overhead), ties to fewer
    slices."""
    best = None
    for per in range(1, tiles + 1):
        slices = -(-tiles // per)
        cost = -(-(row_blocks * slices) // sm) * (per * steps_per_tile + overhead)
        key = (cost, slices)
        if best is None or key < best[0]:
            best = (key, slices, per)
    return best[1], best[2]


class Thread:
    def __init__(self):
        self.groups = []      # committed groups, oldest first: lists of (dst_byte, values)
        self.open = []        # copies issued since the last commit


def block_gemm(H, W, n, v, d, row0, vt_begin, vt_end, model, on_tile):
    """One block of the v2a main loop (shared with nearest_tc.cu's candidate kernel, whose loop
    is a line-for-line copy with queries as H and catalogue rows as W): the cp.async producer,
    the stage ring, ldmatrix.x4 + mma.sync, with every check described in the module doc.
    Calls on_tile(vt, acc) at the end of each tile, acc[tid][mi][ni][e] as the kernel's
    registers (on_tile must not keep acc: it is reset after the call). Returns the steps run."""
    ksteps = -(-d // BK)
    steps_run = 0
    total = (vt_end - vt_begin) * ksteps
    smem = [math.nan] * (STAGES * STAGE_BYTES // 2)   # uninitialised shared memory
    threads = [Thread() for _ in range(THREADS)]
    in_flight = {}                                   # half index -> count (not landed)

    def land(copies):
        for dst, vals in copies:
            for c in range(8):
                smem[dst // 2 + c] = vals[c]
                in_flight[dst // 2 + c] -= 1

    # --- producer state, as in the kernel ---
    stride32 = 32 * d
    ld = {"vt": vt_begin, "kt": 0}
    a_rows_left = [n - row0 - (tid >> 3) for tid in range(THREADS)]
    a_src = [(row0 + (tid >> 3)) * d + (tid & 7) * 8 for tid in range(THREADS)]
    b_src = [(ld["vt"] * BN + (tid >> 3)) * d + (tid & 7) * 8 for tid in range(THREADS)]

    def load_step(stage, written):
        k0 = ld["kt"] * BK
        phases = {}
        for tid in range(THREADS):
            k_ok = k0 + (tid & 7) * 8 < d
            b_rows_left = v - ld["vt"] * BN - (tid >> 3)
            dst = stage + swz(tid >> 3, tid & 7)
            for i in range(4):
                ok = k_ok and 32 * i < a_rows_left[tid]
                src = a_src[tid] + i * stride32 + k0
                vals = H[src:src + 8] if ok else [0.0] * 8
                assert len(vals) == 8
                threads[tid].open.append((dst + i * 32 * ROW_BYTES, vals))
                phases.setdefault(("a", i, tid // 8), []).append(dst + i * 32 * ROW_BYTES)
            for i in range(4):
                ok = k_ok and 32 * i < b_rows_left
                src = b_src[tid] + i * stride32 + k0
                vals = W[src:src + 8] if ok else [0.0] * 8
                assert len(vals) == 8
                a = dst + A_BYTES + i * 32 * ROW_BYTES
                threads[tid].open.append((a, vals))
                phases.setdefault(("b", i, tid // 8), []).append(a)
        for addrs in phases.values():  # 8 lanes of a store phase: 32 distinct banks
            bank_set = set(b for a in addrs for b in banks_of(a))
            assert len(bank_set) == 32, "bank conflict in cp.async writes"
        for tid in range(THREADS):
            for dst, _ in threads[tid].open:
                for c in range(8):
                    written.add(dst // 2 + c)
                    in_flight[dst // 2 + c] = in_flight.get(dst // 2 + c, 0) + 1
            if model == "early":
                land(threads[tid].open)
                threads[tid].open = [(dst, None) for dst, _ in threads[tid].open]
        ld["kt"] += 1
        if ld["kt"] == ksteps:
            ld["kt"] = 0; ld["vt"] += 1
            for tid in range(THREADS):
                b_src[tid] += BN * d

    def commit():
        for th in threads:
            th.groups.append(th.open); th.open = []

    def wait_group(keep):
        for th in threads:
            while len(th.groups) > keep:
                g = th.groups.pop(0)
                if model == "late":
                    land(g)

    acc = [[[[0.0] * 4 for _ in range(8)] for _ in range(2)] for _ in range(THREADS)]

    st_read, st_write = 0, STAGES - 1
    for p in range(STAGES - 1):
        if p < total:
            load_step(p * STAGE_BYTES, set())
        commit()
    vt, kt = vt_begin, 0
    for s in range(total):
        wait_group(STAGES - 2)
        # __syncthreads(): all copies waited for by every thread are visible.
        written = set()
        if s + STAGES - 1 < total:
            load_step(st_write * STAGE_BYTES, written)
        commit()
        sa = st_read * STAGE_BYTES; sb = sa + A_BYTES
        read = set()
        for kk in range(BK // 16):
            for warp in range(8):
                wm, wn = warp >> 1, warp & 1
                a_frag = []
                for mi in range(2):
                    addrs = []
                    for lane in range(32):
                        sw = lane & 7
                        a_row_off = (wm * 32 + (lane & 15)) * ROW_BYTES
                        a_ch = lane >> 4
                        addrs.append(sa + a_row_off + mi * 16 * ROW_BYTES + (((kk * 2 + a_ch) ^ sw) << 4))
                    a_frag.append(ldmatrix_x4(smem, addrs, read))
                for p in range(4):
                    addrs = []
                    for lane in range(32):
                        sw = lane & 7
                        b_row_off = (wn * 64 + ((lane >> 4) << 3) + (lane & 7)) * ROW_BYTES
                        b_ch = (lane >> 3) & 1
                        addrs.append(sb + b_row_off + p * 16 * ROW_BYTES + (((kk * 2 + b_ch) ^ sw) << 4))
                    b = ldmatrix_x4(smem, addrs, read)
                    for mi in range(2):
                        for ni, (r0, r1) in ((2 * p, (0, 1)), (2 * p + 1, (2, 3))):
                            c = [acc[warp * 32 + lane][mi][ni] for lane in range(32)]
                            mma(c, a_frag[mi], [[b[lane][r0], b[lane][r1]] for lane in range(32)])
        # The copies issued this step fly while the stage is read: disjoint bytes, and
        # nothing read may still be in flight.
        assert not (read & written), f"step {s}: stage {st_read} read while written"
        assert all(in_flight.get(x, 0) == 0 for x in read), f"step {s}: read before landing"
        assert all(not math.isnan(smem[x]) for x in read), f"step {s}: read uninitialised"
        steps_run += 1
        st_read = 0 if st_read + 1 == STAGES else st_read + 1
        st_write = 0 if st_write + 1 == STAGES else st_write + 1
        kt += 1
        if kt == ksteps:
            on_tile(vt, acc)
            acc = [[[[0.0] * 4 for _ in range(8)] for _ in range(2)] for _ in range(THREADS)]
            kt = 0; vt += 1
    wait_group(0)
    assert vt == vt_end and ld["vt"] == vt_end and ld["kt"] == 0, "producer/consumer drift"
    assert all(c == 0 for c in in_flight.values()), "copies never landed"
    return steps_run


def run(n, v, d, sm, model, seed):
    rnd = random.Random(seed)
    H = [rnd.gauss(0, 1) for _ in range(n * d)]          # row-major [n, d], flat like memory
    W = [rnd.gauss(0, 0.5) for _ in range(v * d)]        # row-major [v, d]
    T = [rnd.randrange(v) for _ in range(n)]
    row_blocks = -(-n // BM); vtiles = -(-v // BN); ksteps = -(-d // BK)
    slices, per = split_for_sms(vtiles, row_blocks, sm, ksteps)
    part_m = [[None] * n for _ in range(slices)]; part_s = [[None] * n for _ in range(slices)]
    tgt_logit = [math.nan] * n
    steps_run = 0
    for slice_ in range(slices):
        for by in range(row_blocks):
            row0 = by * BM
            vt_begin = slice_ * per; vt_end = min(vt_begin + per, vtiles)
            # --- consumer state ---
            run_m = [[NEG_INF] * 4 for _ in range(THREADS)]; run_s = [[0.0] * 4 for _ in range(THREADS)]
            tgt = []
            for tid in range(THREADS):
                warp, lane = tid >> 5, tid & 31; wm, g = warp >> 1, lane >> 2
                tgt.append([T[r] if r < n else None
                            for r in (row0 + wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g for ri in range(4))])

            def on_tile(vt, acc):
                col0 = vt * BN
                for tid in range(THREADS):
                    warp, lane = tid >> 5, tid & 31
                    wm, wn = warp >> 1, warp & 1; g, t = lane >> 2, lane & 3
                    for ri in range(4):
                        mi, h = ri >> 1, ri & 1
                        row = row0 + wm * 32 + mi * 16 + h * 8 + g
                        xs = []
                        for ni in range(8):
                            for e in range(2):
                                col = col0 + wn * 64 + ni * 8 + 2 * t + e
                                val = acc[tid][mi][ni][h * 2 + e]
                                if col < v:
                                    xs.append(val)
                                    if row < n and col == tgt[tid][ri]:
                                        tgt_logit[row] = val
                        lmax = max(xs) if xs else NEG_INF
                        M = max(run_m[tid][ri], lmax)
                        if M != NEG_INF:
                            run_s[tid][ri] = run_s[tid][ri] * math.exp(run_m[tid][ri] - M) + sum(math.exp(x - M) for x in xs)
                            run_m[tid][ri] = M

            steps_run += block_gemm(H, W, n, v, d, row0, vt_begin, vt_end, model, on_tile)
            # Merges: xor 1, 2 within a group, then red[wn][r] across the two column warps.
            red = {}
            for tid in range(THREADS):
                warp, lane = tid >> 5, tid & 31
                if lane & 3:
                    continue
                wm, wn, g = warp >> 1, warp & 1, lane >> 2
                for ri in range(4):
                    m, s_ = NEG_INF, 0.0
                    for o in range(4):
                        m, s_ = lse_merge(m, s_, run_m[tid + o][ri], run_s[tid + o][ri])
                    r = wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g
                    assert (wn, r) not in red
                    red[(wn, r)] = (m, s_)
            for r in range(BM):
                if row0 + r < n:
                    m, s_ = lse_merge(*red[(0, r)], *red[(1, r)])
                    part_m[slice_][row0 + r] = m; part_s[slice_][row0 + r] = s_
    worst = 0.0
    for row in range(n):
        M = max(part_m[j][row] for j in range(slices))
        S = sum(part_s[j][row] * math.exp(part_m[j][row] - M) for j in range(slices) if part_m[j][row] != NEG_INF)
        got = tgt_logit[row] - (M + math.log(S))
        logits = [sum(H[row * d + k] * W[j * d + k] for k in range(d)) for j in range(v)]
        m = max(logits); want = logits[T[row]] - (m + math.log(sum(math.exp(x - m) for x in logits)))
        assert got == got, f"row {row}: NaN (target logit never written)"
        worst = max(worst, abs(got - want))
    print(f"[{model:5}] n={n} v={v} d={d}: {row_blocks} row blocks, {vtiles} tiles, {ksteps} k-steps,"
          f" {slices} slices x {per} tiles, {steps_run} ring steps, max |err| {worst:.2e}", flush=True)
    assert worst < 1e-9
    return slices, per


if __name__ == "__main__":
    # (n, v, d, SMs): one step (d < BK, empty prologue group); a partial row block, partial
    # vocabulary tile, d = 72 not a multiple of BK, 2 slices; exact tiles; 4 tiles in one slice
    # with one k-step each (the epilogue every step while the ring crosses tiles); 3 k-steps
    # (d = 136) over 3 tiles in one slice.
    cases = [(3, 10, 8, 4), (130, 300, 72, 4), (128, 256, 128, 2), (5, 500, 16, 1), (40, 300, 136, 1)]
    quick = "--quick" in sys.argv
    for i, (n, v, d, sm) in enumerate(cases[:2] if quick else cases):
        for model in ("early", "late"):
            run(n, v, d, sm, model, seed=1000 + i)
    print("fused_tc_v2 emulation equals the direct computation")
