#!/usr/bin/env python3
"""Compare two `llm4dsr inspect-scores` tables (the same windows, e.g. CPU f32 against a GPU run):
per window and item the first-token, full-title and full-mean scores. Prints the largest
absolute difference per column, how many windows agree on the most suspect item per column,
and exits 1 when a difference exceeds --tol (and the item lists differ, or nothing was parsed).

  python3 jobs/stage_compare.py cpu.txt gpu.txt [--tol 0.005] [--label "GPU f32"]
"""
import re
import sys

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+\d+\s+(-?\d+\.\d+) \[\s*\d+\]\s+(-?\d+\.\d+) \[\s*\d+\]\s+"
                 r"(-?\d+\.\d+) \[\s*\d+\]")
HEAD = re.compile(r"^window (\d+) ")


def parse(path):
    windows, cur = {}, None
    for line in open(path, encoding="utf-8"):
        m = HEAD.match(line)
        if m:
            cur = int(m.group(1))
            windows[cur] = []
            continue
        m = ROW.match(line)
        if m and cur is not None:
            windows[cur].append((int(m.group(2)), [float(m.group(i)) for i in (3, 4, 5)]))
    return windows


def main():
    args = [a for a in sys.argv[1:]]
    tol, label = 0.005, "second"
    if "--tol" in args:
        i = args.index("--tol")
        tol = float(args[i + 1])
        del args[i:i + 2]
    if "--label" in args:
        i = args.index("--label")
        label = args[i + 1]
        del args[i:i + 2]
    a, b = parse(args[0]), parse(args[1])
    if not a or a.keys() != b.keys():
        print(f"FAILED ({label}): windows {sorted(a)[:5]}... vs {sorted(b)[:5]}...")
        return 1
    cols = ["first-token", "full-title", "full-mean"]
    worst = [0.0, 0.0, 0.0]
    agree = [0, 0, 0]
    for w in a:
        if [i for i, _ in a[w]] != [i for i, _ in b[w]]:
            print(f"FAILED ({label}): window {w} lists other items")
            return 1
        for c in range(3):
            xa = [s[c] for _, s in a[w]]
            xb = [s[c] for _, s in b[w]]
            worst[c] = max(worst[c], max(abs(x - y) for x, y in zip(xa, xb)))
            agree[c] += xa.index(max(xa)) == xb.index(max(xb))
    n = len(a)
    print(f"{label}: {n} windows, {sum(len(v) for v in a.values())} items")
    for c in range(3):
        print(f"  {cols[c]:12s} max |diff| {worst[c]:.4f}, most suspect item agrees in {agree[c]}/{n} windows")
    if max(worst) > tol:
        print(f"FAILED ({label}): a difference above {tol}")
        return 1
    print(f"OK ({label}): every score within {tol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
