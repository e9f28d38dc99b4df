#!/usr/bin/env python3
"""Warp-level replay of the grounding candidate kernel's top-32 selection
(kernels/nearest_tc_v3.cu, the epilogue of nt3_candidates): the unrolled form (a ballot at
each of the 128 accumulator positions, nt3_insert where some lane's key beats its row's 32nd)
against NT3_SELECT_COMPACT (one pass sets per-thread masks against the starting thresholds,
a rolled loop visits only the positions where some lane's bit is set, re-running the same
ballot against the current threshold). The compact form must make the same insertions in the
same order, so the lists must be equal entry for entry after every tile. The data has ties
(keys on a coarse grid, so the (key, row) order decides), +inf keys (excluded rows, columns
past n) and tiles where almost every key qualifies (the first tiles of a slice).

One warp: lane = 4 g + t owns rows rbase + g (rbase = 8 h) and, at position (h, j, e),
column col0 + 8 j + 2 t + e (the wgmma m64n256 accumulator layout); a list is one entry per
lane, sorted by (key, row).

  python3 jobs/sim/select_compact.py [tiles]     (exit 0 = equal everywhere)
"""
import math
import random
import sys

LIST = 32
INF = math.inf
NONE = 0xFFFFFFFF


def before(k1, i1, k2, i2):
    return k1 < k2 or (k1 == k2 and i1 < i2)


def insert(lists, want, keys, cbase, rbase):
    """nt3_insert: the lanes of `want` in lane order, one warp-wide insertion each."""
    for src in range(32):
        if not (want >> src) & 1:
            continue
        ck, cix = keys[src], cbase + 2 * (src & 3)
        lk, li = lists[rbase + (src >> 2)]
        pos = sum(1 for l in range(LIST) if before(lk[l], li[l], ck, cix))
        if pos < LIST:
            lk.insert(pos, ck)
            li.insert(pos, cix)
            del lk[LIST:], li[LIST:]


def thresholds(lists, h):
    return [lists[8 * h + (lane >> 2)][0][LIST - 1] for lane in range(32)]


def key_at(acc, lane, h, j, e):
    return acc[lane][4 * j + 2 * h + e]


def unrolled(lists, acc, col0):
    for h in range(2):
        thr = thresholds(lists, h)
        for j in range(32):
            for e in range(2):
                keys = [key_at(acc, lane, h, j, e) for lane in range(32)]
                want = sum(1 << lane for lane in range(32) if keys[lane] < thr[lane])
                if want:
                    insert(lists, want, keys, col0 + 8 * j + e, 8 * h)
                    thr = thresholds(lists, h)


def compact(lists, acc, col0, order_bug=False):
    thr = [thresholds(lists, 0), thresholds(lists, 1)]
    m = [[0] * 4 for _ in range(32)]
    for lane in range(32):
        for h in range(2):
            for j in range(32):
                for e in range(2):
                    if key_at(acc, lane, h, j, e) < thr[h][lane]:
                        m[lane][2 * h + (j >> 4)] |= 1 << ((2 * j + e) & 31)
    for w in range(4):
        h = w >> 1
        th = thr[h]
        todo = 0
        for lane in range(32):
            todo |= m[lane][w]
        bits = [b for b in range(32) if (todo >> b) & 1]
        if order_bug:
            bits.reverse()
        for b in bits:
            p = 32 * w + b
            j, e = (p & 63) >> 1, p & 1
            keys = [key_at(acc, lane, h, j, e) for lane in range(32)]
            want = sum(1 << lane for lane in range(32) if keys[lane] < th[lane])
            if want:
                insert(lists, want, keys, col0 + 8 * j + e, 8 * h)
                th = thresholds(lists, h)


def fresh():
    return [([INF] * LIST, [NONE] * LIST) for _ in range(16)]


def tile(rng, kind):
    def one():
        if kind == "coarse":
            return float(rng.randint(0, 40))  # many ties
        if kind == "inf" and rng.random() < 0.2:
            return INF
        return rng.gauss(0.0, 1.0)
    return [[one() for _ in range(128)] for _ in range(32)]


def run(tiles, seed, order_bug=False):
    rng = random.Random(seed)
    for kind in ["gauss", "coarse", "inf"]:
        a, b = fresh(), fresh()
        for t in range(tiles):
            acc = tile(rng, kind)
            unrolled(a, acc, 256 * t)
            compact(b, acc, 256 * t, order_bug)
            if a != b:
                return f"{kind}: lists differ after tile {t}"
    return None


def main():
    tiles = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    err = run(tiles, 20261127)
    if err:
        sys.exit(f"FAILED: {err}")
    print(f"select compact: equal lists after each of {tiles} tiles x 3 kinds of data "
          "(gaussian, coarse ties, +inf)")
    err = run(tiles, 7, order_bug=True)
    if not err:
        sys.exit("FAILED: visiting the positions out of order was not caught")
    print(f"planted bug (positions visited out of order): caught ({err})")


if __name__ == "__main__":
    main()
