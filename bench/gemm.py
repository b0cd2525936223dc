"""
Where batch-1 latency goes (bench/speed.py measures the totals). Batch 1, float32, the CPU's default threads.

1. The rate of one linear layer (the GEMMs are ~75% of DeiT-S's time) at the token counts a slimmed layer keeps,
   with MKL (F.linear, PyTorch's default) and with the weight prepacked for oneDNN (vit.PackedLinear).
2. Per block of DeiT-S, slimmed to the linear pyramid at 2.6 GFLOPs: its time against its FLOPs share of the
   dense block's time. The excess is what a layer costs beyond its FLOPs. Timed twice: in the real forward
   (weights stream from memory: 85 MB per forward, more than the 32 MB L3) and one block at a time, repeated
   (its 7 MB of weights stay in cache). The difference between the two is the cost of reading the weights.
3. How each kind of operator in a block speeds up from 1 thread to all threads, at 197, 120 and 56 tokens: the
   batch-1 speedup of slimming is larger on 1 thread than on 2 (results/speed_*_1thread.json), and this says which
   operators lose parallel efficiency as the token count falls.

Part 2 uses --tokens (METHOD.md P1 / C1) for the pyramid's FLOP count and the slimmed blocks' forward. It
defaults to "removed": the committed results were made with the v1 variant (pruned rows leave the sequence, so keys
and values shrink with the kept count); "frozen" times the paper's blocks (keys/values from all N rows).

    python bench/gemm.py                        # -> results/gemm_cpu.json
    python bench/gemm.py --tokens frozen --out /tmp/gemm_frozen.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flops  # noqa: E402
import slim  # noqa: E402
import vit  # noqa: E402
from speed import random_nested  # noqa: E402

SHAPES = {"q / proj (384 -> 384)": (384, 384), "kv (384 -> 768)": (384, 768), "qkv (384 -> 1152)": (384, 1152),
          "fc1 (384 -> 1536)": (384, 1536), "fc2 (1536 -> 384)": (1536, 384)}
TOKENS = [197, 184, 158, 133, 107, 81, 56]


def median_s(fn, repeats, warmup=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemm_rates(repeats=50):
    """GFLOP/s (2 per multiply-accumulate) per shape and token count, MKL and oneDNN-prepacked."""
    out = {"mkl": {}, "onednn": {}}
    for name, (k, n) in SHAPES.items():
        lin = torch.nn.Linear(k, n)
        packed = vit.PackedLinear(lin)
        out["mkl"][name], out["onednn"][name] = {}, {}
        for m in TOKENS:
            x = torch.randn(1, m, k)
            out["mkl"][name][m] = round(2 * m * k * n / median_s(lambda: lin(x), repeats) / 1e9, 1)
            out["onednn"][name][m] = round(2 * m * k * n / median_s(lambda: packed(x), repeats) / 1e9, 1)
    return out


def block_times(model, keep, tokens="removed", repeats=30):
    """ms per block, dense and slimmed (masks keep under `tokens`), in a full forward (cold weights) and alone (hot
    weights). Block t gets the input the slimmed forward gives it and the index vit.masks_plan gives it."""
    cfg = model.cfg
    _, gather = vit.masks_plan(keep, cfg, tokens)  # gather[t-1]: the rows block t updates (None: all of them)
    x = model.embed(torch.randn(1, 3, cfg.img_size, cfg.img_size))
    ins = {"dense": [x] * cfg.depth, "slimmed": [x]}
    for t in range(1, cfg.depth):
        ins["slimmed"].append(model.blocks[t - 1](ins["slimmed"][-1], gather[t - 1], tokens))
    idx = {"dense": [None] * cfg.depth, "slimmed": gather}
    res = {}
    for kind in ("dense", "slimmed"):
        cold = [[] for _ in range(cfg.depth)]
        for _ in range(repeats):  # the whole stack in order, as the forward runs it
            for l, blk in enumerate(model.blocks):
                t0 = time.perf_counter()
                blk(ins[kind][l], idx[kind][l], tokens)
                cold[l].append(time.perf_counter() - t0)
        hot = [median_s(lambda: blk(ins[kind][l], idx[kind][l], tokens), repeats)
               for l, blk in enumerate(model.blocks)]
        res[kind] = {"cold_ms": [1000 * statistics.median(c) for c in cold], "hot_ms": [1000 * h for h in hot]}
    return res


def thread_scaling(repeats=100):
    """Per operator of a DeiT-S block: time on 1 thread / time on all threads, at batch 1."""
    threads, out = torch.get_num_threads(), {}
    fc1, fc2, ln = (vit.PackedLinear(torch.nn.Linear(384, 1536)), vit.PackedLinear(torch.nn.Linear(1536, 384)),
                    torch.nn.LayerNorm(384))
    for n in (197, 120, 56):
        x, y, q, kv = torch.randn(1, n, 384), torch.randn(1, n, 1536), torch.randn(1, 6, n, 64), torch.randn(1, 6, n + 13, 64)
        ops = {"fc1 (oneDNN)": lambda: fc1(x), "fc2 (oneDNN)": lambda: fc2(y), "attention (SDPA)":
               lambda: F.scaled_dot_product_attention(q, kv, kv), "gelu": lambda: F.gelu(y), "layernorm": lambda: ln(x)}
        out[n] = {}
        for name, fn in ops.items():
            torch.set_num_threads(1)
            one = median_s(fn, repeats)
            torch.set_num_threads(threads)
            out[n][name] = round(one / median_s(fn, repeats), 2)
    return out


def main():
    p = argparse.ArgumentParser("Where batch-1 latency goes: GEMM rates, per-block time against FLOPs, thread scaling")
    p.add_argument("--tokens", default="removed", choices=list(vit.TOKENS),
                   help="token semantics of the slimmed blocks: removed (v1, C1; the committed results) or frozen (P1)")
    p.add_argument("--out", default="results/gemm_cpu.json")
    args = p.parse_args()
    torch.manual_seed(0)
    median_s(lambda: F.linear(torch.randn(197, 384), torch.randn(1536, 384)), 200)  # warm threads and clock
    rates = gemm_rates()
    print(f"{'GFLOP/s at tokens':30s}" + "".join(f"{m:>7d}" for m in TOKENS))
    for lib in rates:
        for name, r in rates[lib].items():
            print(f"{lib + ' ' + name:30s}" + "".join(f"{r[m]:7.0f}" for m in TOKENS))
    rel = {lib: {m: round(statistics.mean(r[m] / r[197] for r in rates[lib].values()), 3) for m in TOKENS}
           for lib in rates}

    cfg = vit.PRESETS["deit_small"]
    counts = flops.linear_pyramid(cfg, 2.6e9, args.tokens)
    keep = random_nested(counts, cfg.num_tokens)
    dense_layer = flops.layer_flops(cfg, [cfg.num_tokens] * cfg.depth)
    share = [a / b for a, b in zip(flops.layer_flops(cfg, counts, args.tokens), dense_layer)]
    blocks = {}
    base = vit.deit("deit_small").eval()
    for label, model in (("mkl", base), ("onednn", vit.pack_for_cpu(base))):
        t = block_times(model, keep, args.tokens)
        rows = []
        for where in ("cold_ms", "hot_ms"):
            d, s = t["dense"][where], t["slimmed"][where]
            rows.append({"where": where[:-3], "dense_ms": d, "slimmed_ms": s,
                         "excess_ms": [si - fi * statistics.mean(d) for si, fi in zip(s, share)]})
        blocks[label] = rows
        print(f"\n{label}: per block (kept {counts}, tokens {args.tokens}), ms")
        for r in rows:
            for key in ("dense_ms", "slimmed_ms", "excess_ms"):
                print(f"  {r['where']:4s} {key[:-3]:8s}" + " ".join(f"{v:5.2f}" for v in r[key]) + f"  sum {sum(r[key]):5.1f}")
            print(f"  {r['where']:4s} blocks {sum(r['dense_ms']) / sum(r['slimmed_ms']):.2f}x faster, FLOPs {len(share) / sum(share):.2f}x")
    scaling = thread_scaling()
    print(f"\nspeedup from 1 to {torch.get_num_threads()} threads, batch 1 (tokens: {list(scaling)})")
    for name in scaling[197]:
        print(f"  {name:18s}" + "".join(f"{scaling[n][name]:7.2f}" for n in scaling))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    json.dump({"tokens": args.tokens, "command": " ".join(["python bench/gemm.py"] + sys.argv[1:]),
               "gflops_per_s": rates, "relative_to_197": rel, "kept_per_layer": counts, "flops_share_per_layer": share,
               "blocks_b1": blocks, "thread_scaling": scaling, "machine": slim.machine()}, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
