"""
Why batch-1 latency falls less than FLOPs (bench/speed.py): the rate of one F.linear (the GEMMs that are ~90%
of DeiT-S's time) at the token counts a slimmed layer keeps, against the dense 197 tokens. Batch 1, float32,
the CPU's default threads; the median of 50 calls after warm-up. Writes results/gemm_<device>.json.

    python bench/gemm.py
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import slim  # noqa: E402

SHAPES = {"q / proj (384 -> 384)": (384, 384), "kv (384 -> 768)": (384, 768), "qkv (384 -> 1152)": (384, 1152),
          "fc1 (384 -> 1536)": (384, 1536), "fc2 (1536 -> 384)": (1536, 384)}
TOKENS = [197, 184, 158, 133, 107, 81, 56]


def rate(m, k, n, repeats=50):
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    for _ in range(5):
        F.linear(x, w, b)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.linear(x, w, b)
        ts.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(ts) / 1e9  # GFLOP/s (2 per multiply-accumulate)


def main():
    rate(197, 384, 1536, repeats=200)  # warm the thread pool and the clock before anything is recorded
    rows = {name: {m: round(rate(m, k, n), 1) for m in TOKENS} for name, (k, n) in SHAPES.items()}
    print(f"{'GFLOP/s at tokens':24s}" + "".join(f"{m:>7d}" for m in TOKENS))
    for name, r in rows.items():
        print(f"{name:24s}" + "".join(f"{r[m]:7.0f}" for m in TOKENS))
    rel = {m: round(statistics.mean(r[m] / r[197] for r in rows.values()), 3) for m in TOKENS}
    print(f"{'mean rate / rate at 197':24s}" + "".join(f"{rel[m]:7.2f}" for m in TOKENS))
    os.makedirs("results", exist_ok=True)
    json.dump({"command": "python bench/gemm.py", "gflops_per_s": rows, "relative_to_197": rel,
               "machine": slim.machine()}, open("results/gemm_cpu.json", "w"), indent=1)
    print("wrote results/gemm_cpu.json")


if __name__ == "__main__":
    main()
