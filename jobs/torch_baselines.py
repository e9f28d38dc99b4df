#!/usr/bin/env python3
"""PyTorch baselines for the custom kernels, at the shapes of benches/kernels.rs.

The head of ../shared/bench/hf_scoring_baseline.py's full-title case is
    logits.float() -> log_softmax -> gather
over the [N, V] logits of the LM head (N = windows x items x title tokens). This times exactly
that head on random bf16 inputs (the transformer body is the same for every scoring method),
plus the bare bf16 GEMM h @ W^T (what cuBLAS achieves on the matrix part), and the grounding
search as chunked exact-f32 (and TF32) matmul + topk. Prints a markdown table with the same
columns and the same floor model as the Rust benchmark, then one JSON line per case.

  python3 jobs/torch_baselines.py [--quick]
"""
import argparse, json, sys
import torch

H100 = dict(name="H100 SXM", bf16=790e12, fp32=67e12, tf32=395e12, bw=3.0e12, exps=16 * 132 * 1.98e9)
H200 = dict(H100, name="H200", bw=4.3e12)

SCORING = [("smollm2-135m b64", 64 * 80, 49152, 576), ("qwen2-0.5b-like b64", 64 * 80, 151936, 896),
           ("llama3-8b b16", 16 * 80, 128256, 4096), ("llama3-8b b32", 32 * 80, 128256, 4096)]
NEAREST = [("1M x 4096, 1024 q", 1024, 1_000_000, 4096, 10), ("100k x 384, 1024 q", 1024, 100_000, 384, 10)]


def timed(fn, warm=2, reps=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def floor_s(card, flops, bytes_, exps, peak):
    return max(flops / card[peak], bytes_ / card["bw"], exps / card["exps"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: torch baselines: no CUDA device", file=sys.stderr)
        return
    name = torch.cuda.get_device_name()
    card = H200 if "H200" in name else H100
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for label, n, v, d in (SCORING[:1] if a.quick else SCORING):
        h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        w = (torch.randn(v, d, device="cuda", dtype=torch.bfloat16, generator=g) * (3.0 / d ** 0.5))
        t = torch.randint(0, v, (n, 1), device="cuda", generator=g)
        flops, base_bytes = 2.0 * n * v * d, 2.0 * (v * d + n * d) + 8.0 * n

        def head():  # the baseline's: logits.float() -> log_softmax -> gather
            return torch.log_softmax((h @ w.T).float(), -1).gather(1, t)

        def gemm():
            return h @ w.T

        torch.cuda.reset_peak_memory_stats()
        ms = timed(head)
        peak = torch.cuda.max_memory_allocated() / 2**30
        shape = f"{label}: N={n} V={v} d={d}"
        # bytes: bf16 logits written + read by .float(), f32 written, read+written by
        # log_softmax, read by gather: at least 2+2+4+4+4 bytes per logit
        rows.append(("torch head (matmul+float+log_softmax+gather)", shape, ms, flops,
                     base_bytes + 16.0 * n * v, n * v, "bf16", f"peak {peak:.2f} GiB"))
        ms = timed(gemm)
        rows.append(("torch bf16 GEMM only (cuBLAS)", shape, ms, flops, base_bytes + 2.0 * n * v, 0, "bf16", ""))
        del h, w, t
        torch.cuda.empty_cache()
    for label, b, n, d, k in (NEAREST[1:] if a.quick else NEAREST):
        q = torch.randn(b, d, device="cuda", generator=g)
        c = torch.randn(n, d, device="cuda", generator=g)
        cn = (c * c).sum(1)
        qn = (q * q).sum(1)
        chunk = 131072

        def search():
            best_d = best_i = None
            for s in range(0, n, chunk):
                d2 = qn[:, None] + cn[None, s:s + chunk] - 2.0 * (q @ c[s:s + chunk].T)
                dv, di = torch.topk(d2, k, dim=1, largest=False)
                di = di + s
                if best_d is None:
                    best_d, best_i = dv, di
                else:
                    cd, ci = torch.cat([best_d, dv], 1), torch.cat([best_i, di], 1)
                    best_d, o = torch.topk(cd, k, dim=1, largest=False)
                    best_i = ci.gather(1, o)
            return best_d, best_i

        flops, bytes_ = 2.0 * b * n * d, 4.0 * (n * d + b * d + n) + 8.0 * b * k
        shape = f"{label}: B={b} I={n} d={d} k={k}"
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            ms = timed(search, warm=1, reps=3)
            rows.append((f"torch chunked matmul+topk ({'tf32' if tf32 else 'exact f32'})", shape, ms, flops,
                         bytes_, 0, "tf32" if tf32 else "fp32", ""))
        torch.backends.cuda.matmul.allow_tf32 = False
        del q, c, cn, qn
        torch.cuda.empty_cache()

    print(f"\n## PyTorch baselines on {name} (torch {torch.__version__}; floor model of {card['name']})")
    print("| case | shape | time ms | TB/s | TFLOP/s | floor ms | % of floor | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for case, shape, ms, flops, bytes_, exps, peak, note in rows:
        fl = floor_s(card, flops, bytes_, exps, peak) * 1e3
        print(f"| {case} | {shape} | {ms:.3f} | {bytes_ / ms / 1e9:.3f} | {flops / ms / 1e9:.2f} | "
              f"{fl:.3f} | {100 * fl / ms:.1f}% | {note} |")
    for case, shape, ms, flops, bytes_, exps, peak, note in rows:
        print(json.dumps(dict(case=case, shape=shape, ms=round(ms, 4), device=name, note=note)))


if __name__ == "__main__":
    main()
