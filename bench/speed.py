"""
Real speed of dense against patch-slimmed DeiT (arXiv 2106.02852) under both token semantics (method.md P1 "frozen",
the paper's; C1 "removed"), each at the paper's budget under its own FLOP count, in every runtime of docs/speed.md:
eager (vit.py's forward), compile (pipeline/export.StaticSlimmed, inductor's freezing on the CPU: weights prepacked)
and onnxruntime (pipeline/export.py's file, idle threads not spinning), with timm's dense DeiT beside them; every
model and runtime timed round-robin in one run (common.interleaved). Random weights and patches. Writes
results/speed_runtimes_<model>_<device>_<dtype>.json.

    python bench/speed.py                                   # DeiT-S 224 px, both semantics, CPU, every runtime
    python bench/speed.py --repeats 2 --runtimes eager onnxruntime     # a quick check
    python bench/speed.py --device cuda --dtype bfloat16 --batches 1 64 256 --runtimes eager compile
"""
import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile

import torch

from common import interleaved, machine, random_nested, run, write_json  # peers_speed imports interleaved from here
import flops
import vit
from pipeline import export

RUNTIMES = ("eager", "compile", "onnxruntime")
PAPER_V100 = {"dense_img_s": 940, "slimmed_img_s": 1321, "speedup": 1321 / 940, "flops_ratio": 4.6 / 2.6,
              "note": "DeiT-S on a V100, the paper's Table 1 (batch not stated): 940 -> 1321 img/s, 1.41x"}
FIG5_PYRAMID = [197, 197, 160, 153, 121, 101, 83, 63, 50, 25, 20, 1]  # DeiT-S kept tokens, the paper's Fig. 5 (approx.)


def default_masks(cfg, tokens, gflops):
    """The paper's budget under each semantics' own count: "frozen", the Fig. 5 pyramid for DeiT-S (2.66 G counted as
    the paper does; other models: a linear pyramid at gflops); "removed", a linear pyramid at gflops."""
    if tokens == "frozen" and cfg == vit.PRESETS["deit_small"]:
        counts, label = FIG5_PYRAMID, "Fig. 5 pyramid"
    else:
        counts, label = flops.linear_pyramid(cfg, gflops * 1e9, tokens), f"linear pyramid at {gflops} G"
    return random_nested(counts, cfg.num_tokens), f"random nested, {label}"


def compiled(module, device):
    """torch.compile of module for inference: one graph per batch size; on the CPU, inductor's freezing (weights as
    constants, prepacked for oneDNN), its CPU inference setting."""
    import torch._dynamo.config as dynamo
    dynamo.recompile_limit = 64  # one graph per model (several share one forward's code) and batch size
    if device.type == "cpu":
        import torch._inductor.config as inductor
        inductor.freezing = True
    return torch.compile(module.eval(), dynamic=False)


def runtime_fns(runtime, model, masks, device, threads, folder):
    """{model label: fn(x)} of one runtime: "dense" and "slimmed <tokens>" for each semantics in masks."""
    variants = {"dense": (None, "frozen"), **{f"slimmed {t}": (keep, t) for t, (keep, _) in masks.items()}}
    if runtime == "eager":
        return {v: (lambda x, k=k, t=t: model(x, keep=k, tokens=t)) for v, (k, t) in variants.items()}
    if runtime == "compile":
        return {v: compiled(export.StaticSlimmed(model, k, t), device) for v, (k, t) in variants.items()}
    fns, cpu_model = {}, model.float().cpu()  # onnxruntime
    for v, (k, t) in variants.items():
        path = os.path.join(folder, v.replace(" ", "_") + ".onnx")
        session = export.ort_session(export.export_onnx(cpu_model, path, k, t), threads, spinning=False)
        fns[v] = lambda x, s=session: s.run(["logits"], {"img": x})[0]
    return fns


def usable_runtimes(asked, device, dtype):
    """The asked runtimes this device, dtype and install can run, and {runtime left out: why}."""
    reasons = {}
    if device.type != "cpu" or dtype != torch.float32:
        reasons = {"onnxruntime": "timed here on the CPU in float32 only"}
    try:
        export.require("onnx", "onnxscript", "onnxruntime")
    except vit.UserError as e:
        reasons.setdefault("onnxruntime", str(e))
    skipped = {r: reasons[r] for r in asked if r in reasons}
    for r, why in skipped.items():
        print(f"{r}: not timed ({why})")
    return [r for r in asked if r not in reasons], skipped


def build(args, model, device, dtype, threads, folder):
    """The masks of each semantics, {label: fn} of every runtime and model (timm's too), the runtimes, those left out."""
    cfg = model.cfg
    gflops = 2.6 if cfg == vit.PRESETS["deit_small"] else round(flops.count_flops(cfg) / 1e9 * 2.6 / 4.6, 4)
    masks = {tokens: default_masks(cfg, tokens, gflops) for tokens in ("frozen", "removed")}
    runtimes, skipped = usable_runtimes(args.runtimes, device, dtype)
    model = model.to(device, dtype).eval()
    fns = {f"{rt} {v}": fn for rt in runtimes
           for v, fn in runtime_fns(rt, model, masks, device, threads, folder).items()}
    if not args.weights:
        import timm
        fns["timm dense"] = timm.create_model("deit_small_patch16_224", pretrained=False).to(device, dtype).eval()
    return masks, fns, runtimes, skipped


def main():
    p = argparse.ArgumentParser("Speed of dense vs patch-slimmed DeiT-S in every runtime, both token semantics")
    p.add_argument("--weights", default=None, help="a checkpoint whose architecture is timed instead (weights unused)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes, each timed in its own rounds")
    p.add_argument("--repeats", type=int, default=10, help="rounds at the largest batch; batch 1 runs 5x as many")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="default results/speed_runtimes_<name>_<device>_<dtype>.json")
    args = p.parse_args()
    device, dtype, threads = torch.device(args.device), getattr(torch, args.dtype), torch.get_num_threads()
    model = vit.load_checkpoint(args.weights) if args.weights else vit.deit("deit_small")
    cfg, name = model.cfg, os.path.basename(args.weights).split(".")[0] if args.weights else "deit_small"
    out = args.out or os.path.join("results", f"speed_runtimes_{name}_{args.device}_{args.dtype}.json")
    folder = tempfile.mkdtemp(prefix="speed_onnx_")  # the ONNX files timed
    masks, fns, runtimes, skipped = build(args, model, device, dtype, threads, folder)
    used = [m for m, on in (("onnxruntime", "onnxruntime" in runtimes), ("timm", "timm dense" in fns)) if on]
    dense_gf = flops.count_flops(cfg) / 1e9
    res = {"command": shlex.join(["python", "bench/speed.py", *sys.argv[1:]]), "model": name, "device": args.device,
           "dtype": args.dtype, "machine": machine(),
           "versions": {"torch": torch.__version__, **{m: __import__(m).__version__ for m in used}}, "threads": threads,
           "runtimes": runtimes, "runtimes_not_timed": skipped, "batches": args.batches, "dense_gflops": dense_gf,
           "paper_v100": PAPER_V100, "rows": {}, "semantics": {}}
    times = {}
    with torch.inference_mode():
        for b in sorted(args.batches, reverse=True):
            x = torch.randn(b, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
            x_np = x.float().cpu().numpy()
            call = {k: (lambda _, fn=fn, k=k: fn(x_np if k.startswith("onnxruntime") else x)) for k, fn in fns.items()}
            times[b] = interleaved(call, None, args.repeats * (5 if b == 1 else 1), device)
            for label, ts in times[b].items():
                med = statistics.median(ts)
                res["rows"].setdefault(label, {})[f"batch {b}"] = {
                    "ms": 1000 * med, "ms_fastest": 1000 * min(ts), "images_per_s": b / med}
                print(f"{label:32s} batch {b:4d}: {1000 * med:9.2f} ms/call, {b / med:9.1f} img/s", flush=True)
    for tokens, (keep, source) in masks.items():
        gf = flops.count_flops(cfg, keep, tokens=tokens) / 1e9
        sem = res["semantics"][tokens] = {"masks": source, "kept_per_layer": [int(k.numel()) for k in keep],
                                          "gflops": gf, "flops_ratio": dense_gf / gf, "speedup": {}}
        for rt in runtimes:
            d, s = ({b: t[f"{rt} {m}"] for b, t in times.items()} for m in ("dense", f"slimmed {tokens}"))
            sem["speedup"][rt] = {f"batch {b}": {
                "speedup": statistics.median(d[b]) / statistics.median(s[b]),
                "paired": statistics.median(a / c for a, c in zip(d[b], s[b])),
                "of_flops_ratio": statistics.median(d[b]) / statistics.median(s[b]) * gf / dense_gf} for b in times}
        print(f"{tokens}: GFLOPs {dense_gf:.2f} -> {gf:.2f}; " + "; ".join(f"{rt} " + ", ".join(
            f"{b} {v['speedup']:.2f}x" for b, v in sem["speedup"][rt].items()) for rt in runtimes), flush=True)
    res["absolute"] = absolute(res, max(args.batches)) if "timm dense" in fns and runtimes else None
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    write_json(out, res)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {out}")


def absolute(res, big):
    """The fastest slimmed model at the largest batch against timm's dense DeiT in eager PyTorch, same rounds."""
    slimmed = {k: v[f"batch {big}"]["images_per_s"] for k, v in res["rows"].items() if " slimmed " in k}
    fastest, timm_img_s = max(slimmed, key=slimmed.get), res["rows"]["timm dense"][f"batch {big}"]["images_per_s"]
    print(f"absolute, batch {big}: {fastest} {slimmed[fastest]:.1f} img/s against timm dense (eager) {timm_img_s:.1f} "
          f"img/s: {slimmed[fastest] / timm_img_s:.2f}x", flush=True)
    return {"batch": big, "fastest_slimmed": fastest, "images_per_s": slimmed[fastest],
            "timm_dense_eager_images_per_s": timm_img_s, "over_timm": slimmed[fastest] / timm_img_s}


if __name__ == "__main__":
    run(main)
