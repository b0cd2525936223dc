"""
Real speed of the gathered patch-slimmed forward (arXiv 2106.02852) under both token semantics (METHOD.md P1
"frozen", the paper's; C1 "removed", v1), each at the paper's budget under its own FLOP count: images/s at
batch 32 and batch-1 latency, dense vit.py vs timm's DeiT (an independent implementation) vs slimmed vit.py; on
CPU also every vit.py model with its linear weights prepacked for oneDNN (vit.pack_for_cpu).
Random weights (timing does not depend on them); without --masks, "frozen" runs the paper's Fig. 5 pyramid
(2.66 G) and "removed" a linear pyramid at --gflops (2.6 G), patches chosen at random (scattered, like real
masks). The paper measured 940 -> 1321 img/s on a V100 for 4.6 -> 2.6 G: 1.41x for a FLOPs ratio of 1.77. The median over round-robin repeats is the result; the
fastest call is recorded beside it, and so is the median over rounds of the per-round ratio dense/slimmed (each
round's two calls run back to back, so drift between rounds cancels). Writes results/speed_<model>_<device>_<dtype>.json.

    python bench/speed.py                                  # DeiT-S 224 px, both semantics, CPU
    python bench/speed.py --masks results/cifar10-proxy/masks.json --weights ../shared/models/deit_tiny_p4_cifar10.pth
    python bench/speed.py --device cuda --dtype bfloat16 --batch 64
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flops  # noqa: E402
import vit  # noqa: E402


def interleaved(fns, x, repeats, device):
    """Seconds per call of each fn(x) (a list per fn), timed round-robin (one call of each per round) so that
    the machine's drift affects every model alike; after warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for fn in fns.values():
        for _ in range(3):
            fn(x)
    sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def random_nested(counts, N, seed=0):
    """Nested masks with the given kept counts, patches chosen at random (scattered like real masks)."""
    g, prev, keep = torch.Generator().manual_seed(seed), torch.arange(N), []
    for n in counts:
        prev = torch.cat([prev[:1], prev[1:][torch.randperm(len(prev) - 1, generator=g)[:n - 1]]]).sort().values
        keep.append(prev)
    return keep


FIG5_PYRAMID = [197, 197, 160, 153, 121, 101, 83, 63, 50, 25, 20, 1]  # DeiT-S kept tokens, the paper's Fig. 5 (approx.)


def default_masks(cfg, tokens, gflops):
    """The paper's budget under each semantics' own count: "frozen", the Fig. 5 pyramid for DeiT-S (2.66 G counted as
    the paper does; other models: a linear pyramid at --gflops counted so); "removed", a linear pyramid at --gflops
    (v1 counting). Patches chosen at random, scattered like real masks."""
    if tokens == "frozen" and cfg == vit.PRESETS["deit_small"]:
        counts, label = FIG5_PYRAMID, "Fig. 5 pyramid"
    else:
        counts, label = flops.linear_pyramid(cfg, gflops * 1e9, tokens), f"linear pyramid at {gflops} G"
    return random_nested(counts, cfg.num_tokens), f"random nested, {label}"


def main():
    p = argparse.ArgumentParser("Speed of dense vs patch-slimmed DeiT, under both token semantics")
    p.add_argument("--model", default="deit_small", choices=list(vit.PRESETS))
    p.add_argument("--weights", default=None, help="checkpoint for the architecture (e.g. the proxy); weights unused")
    p.add_argument("--masks", default=None, help="masks.json (timed under its own tokens); default: the paper's "
                   "budget under each semantics (Fig. 5 pyramid frozen, a 2.6 G linear pyramid removed)")
    p.add_argument("--tokens", default=["frozen", "removed"], nargs="+", choices=list(vit.TOKENS),
                   help="semantics to time without --masks")
    p.add_argument("--gflops", type=float, default=2.6, help="pyramid budget (paper's PS-ViT DeiT-S: 2.6)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-timm", action="store_true", help="skip the timm reference")
    p.add_argument("--no-packed", action="store_true", help="skip the oneDNN-prepacked rows (CPU float32 only)")
    p.add_argument("--out", default=None, help="JSON output (default results/speed_<name>_<device>_<dtype>.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    model = vit.load_checkpoint(args.weights) if args.weights else vit.deit(args.model)
    cfg = model.cfg
    if args.masks:
        keep, tokens = vit.load_masks(args.masks, cfg)
        masks = {tokens: (keep, args.masks)}
    else:
        masks = {tokens: default_masks(cfg, tokens, args.gflops) for tokens in args.tokens}
    model = model.to(device, dtype).eval()
    name = args.model if not args.weights else os.path.basename(args.weights).split(".")[0]
    packed = not args.no_packed and device.type == "cpu" and dtype == torch.float32
    variants = {"vit.py": model, **({"packed": vit.pack_for_cpu(model)} if packed else {})}
    fns = {}
    for kind, m in variants.items():
        fns[f"{kind} dense"] = lambda x, m=m: m(x)
        for tokens, (keep, _) in masks.items():
            fns[f"{kind} slimmed {tokens}"] = lambda x, m=m, k=keep, tk=tokens: m(x, keep=k, tokens=tk)
    if not args.no_timm and not args.weights:
        import timm
        fns["timm dense"] = timm.create_model(f"{args.model}_patch16_224", pretrained=False).to(device, dtype).eval()

    dense_gf = flops.count_flops(cfg) / 1e9
    res = {"command": " ".join(["python bench/speed.py"] + sys.argv[1:]), "model": name, "device": args.device,
           "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "batch": args.batch,
           "dense_gflops": dense_gf, "rows": {}, "semantics": {}}
    with torch.inference_mode():
        xb = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
        x1 = torch.randn(1, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
        tb, t1 = interleaved(fns, xb, args.repeats, device), interleaved(fns, x1, args.repeats * 5, device)
    for label in fns:
        b, one = statistics.median(tb[label]), statistics.median(t1[label])
        res["rows"][label] = {"images_per_s": args.batch / b, "latency_ms_b1": 1000 * one,
                              "latency_ms_b1_min": 1000 * min(t1[label]), "images_per_s_max": args.batch / min(tb[label])}
        print(f"{label:24s} {args.batch / b:9.1f} img/s (batch {args.batch})   {1000 * one:8.2f} ms (batch 1; "
              f"fastest {1000 * min(t1[label]):.2f})", flush=True)
    r = res["rows"]
    for tokens, (keep, source) in masks.items():
        gf = flops.count_flops(cfg, keep, tokens=tokens) / 1e9
        sem = res["semantics"][tokens] = {"masks": source, "kept_per_layer": [int(k.numel()) for k in keep],
                                          "gflops": gf, "flops_ratio": dense_gf / gf}
        for kind in variants:
            d, s = f"{kind} dense", f"{kind} slimmed {tokens}"
            suffix = "" if kind == "vit.py" else "_packed"
            sem[f"speedup_batch{suffix}"] = r[s]["images_per_s"] / r[d]["images_per_s"]
            sem[f"speedup_b1{suffix}"] = r[d]["latency_ms_b1"] / r[s]["latency_ms_b1"]
            sem[f"speedup_b1{suffix}_paired"] = statistics.median(a / b for a, b in zip(t1[d], t1[s]))
        print(f"{tokens}: GFLOPs {dense_gf:.2f} -> {gf:.2f} (ratio {sem['flops_ratio']:.2f}); speedup "
              f"{sem['speedup_batch']:.2f}x at batch {args.batch} ({sem['speedup_batch'] / sem['flops_ratio']:.2f} of "
              f"the FLOPs ratio), {sem['speedup_b1']:.2f}x batch-1 latency (paired {sem['speedup_b1_paired']:.2f}x)"
              + (f"; packed {sem['speedup_batch_packed']:.2f}x / {sem['speedup_b1_packed']:.2f}x (paired "
                 f"{sem['speedup_b1_packed_paired']:.2f}x)" if packed else ""))
    if packed:
        res["packed_over_unpacked_dense_b1"] = r["vit.py dense"]["latency_ms_b1"] / r["packed dense"]["latency_ms_b1"]
    if "timm dense" in r:
        res["ours_over_timm"] = r["vit.py dense"]["images_per_s"] / r["timm dense"]["images_per_s"]
        print(f"vit.py/timm dense throughput {res['ours_over_timm']:.3f}")
    out = args.out or os.path.join("results", f"speed_{name}_{args.device}_{args.dtype}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    json.dump(res, open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
