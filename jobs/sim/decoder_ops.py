#!/usr/bin/env python3
"""Emulate kernels/decoder_ops.cu's gathers, its add + RMS norm's warp-per-row mapping and
kernels/attention_softmax.cu's row mapping
thread by thread in plain Python (the grid-stride loops, the 32-bit word addressing of 16-bit
values, the row -> mask-row mapping), and compare with the layouts the decoder expects, built
directly. Written because the decoder gathers had not yet run on a GPU. No GPU needed.

  python3 jobs/sim/decoder_ops.py
"""
import random


def gather_heads_first_w32(src_words, rows, b, heads, n, words, grid, block):
    total = b * heads * n * words
    dst = [None] * total
    for blk in range(grid):
        for th in range(block):
            i = blk * block + th
            while i < total:
                w = i % words
                rest = i // words
                j = rest % n
                rest //= n
                h = rest % heads
                bi = rest // heads
                row = rows[bi * n + j]
                dst[i] = src_words[(row * heads + h) * words + w]
                i += grid * block
    return dst


def gather_token_major_w32(src_words, rows, t, heads, n, words, grid, block):
    total = t * heads * words
    dst = [None] * total
    for blk in range(grid):
        for th in range(block):
            i = blk * block + th
            while i < total:
                w = i % words
                rest = i // words
                h = rest % heads
                r = rows[rest // heads]
                bi, j = r // n, r % n
                dst[i] = src_words[((bi * heads + h) * n + j) * words + w]
                i += grid * block
    return dst


def as_words(values, per_word):
    """16-bit values in pairs (little-endian: element 2k in the low half)."""
    return [tuple(values[k:k + per_word]) for k in range(0, len(values), per_word)]


def flat(words):
    return [v for w in words for v in w]


def grid_stride(total):  # crates/kernels/src/candle_cuda.rs::grid_stride, with a small cap
    return max(1, min(-(-total // 256), 3)), 256


def check(p, heads, hd, b, n, esize, seed):
    rnd = random.Random(seed)
    per_word = 4 // esize
    src = [("x", r, h, c) for r in range(p) for h in range(heads) for c in range(hd)]
    rows = [rnd.randrange(p) for _ in range(b * n)]
    words = hd * esize // 4
    g, blk = grid_stride(b * heads * n * words)
    got = flat(gather_heads_first_w32(as_words(src, per_word), rows, b, heads, n, words, g, blk))
    want = [src[(rows[bi * n + j] * heads + h) * hd + c]
            for bi in range(b) for h in range(heads) for j in range(n) for c in range(hd)]
    assert got == want, "gather_heads_first"
    back = [rnd.randrange(b * n) for _ in range(17)]
    g, blk = grid_stride(len(back) * heads * words)
    got2 = flat(gather_token_major_w32(as_words(got, per_word), back, len(back), heads, n, words, g, blk))
    want2 = [src[(rows[r] * heads + h) * hd + c] for r in back for h in range(heads) for c in range(hd)]
    assert got2 == want2, "gather_token_major"


def mask_rows(b, heads, n, mask_batches):
    """attention_softmax.cu: row r of the scores [b, heads, n, s] reads mask row
    (mask_batches == 1 ? 0 : r / rows_per_batch) * n + r % n."""
    rows_per_batch = heads * n
    out = []
    for r in range(b * heads * n):
        bb = 0 if mask_batches == 1 else r // rows_per_batch
        out.append(bb * n + r % n)
    want = [(bi if mask_batches > 1 else 0) * n + j
            for bi in range(b) for h in range(heads) for j in range(n)]
    assert out == want, "mask rows"


def add_rms_norm_16(x_words, delta_words, w_words, rows, d, blocks, block=256):
    """add_rms_norm_{bf16,f16}: warp (global thread / 32) = row, lane strides over the row's
    d / 2 words; out = [s of every row, then n of every row], word-addressed. Returns which
    (row, value) each output word slot holds and which lanes wrote it."""
    words = d // 2
    out = [None] * (2 * rows * words)
    for blk in range(blocks):
        for th in range(block):
            gt = blk * block + th
            row, lane = gt >> 5, th & 31
            if row >= rows:
                continue
            base = row * words
            for i in range(lane, words, 32):
                a, b = x_words[base + i], delta_words[base + i]
                out[base + i] = ("s", a, b)
            for i in range(lane, words, 32):
                out[rows * words + base + i] = ("n", out[base + i], w_words[i])
    return out


def check_add_rms(rows, d, seed):
    words = d // 2
    x = [("x", r, k) for r in range(rows) for k in range(words)]
    dl = [("dl", r, k) for r in range(rows) for k in range(words)]
    w = [("w", k) for k in range(words)]
    blocks = max(1, -(-rows // 8))  # decoder_ops.rs: rows.div_ceil(8) blocks of 256 threads
    got = add_rms_norm_16(x, dl, w, rows, d, blocks)
    want = [("s", ("x", r, k), ("dl", r, k)) for r in range(rows) for k in range(words)]
    want += [("n", ("s", ("x", r, k), ("dl", r, k)), ("w", k)) for r in range(rows) for k in range(words)]
    assert got == want, f"add_rms_norm rows={rows} d={d}"


if __name__ == "__main__":
    for seed, (rows, d) in enumerate([(1, 2), (7, 64), (9, 576), (17, 130), (3, 4096)]):
        check_add_rms(rows, d, seed)
    cases = 0
    for seed, (p, heads, hd, b, n) in enumerate(
            [(5, 1, 2, 1, 1), (23, 3, 8, 4, 5), (40, 9, 64, 3, 7), (13, 2, 6, 2, 3)]):
        for esize in (2, 4):
            check(p, heads, hd, b, n, esize, seed)
            cases += 1
        for mb in (1, b):
            mask_rows(b, heads, n, mb)
    print(f"decoder_ops: {cases} gather cases, the softmax mask rows and the add + RMS norm "
          "rows x words match the direct layouts")
