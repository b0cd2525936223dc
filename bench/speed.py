"""
Real speed of the gathered patch-slimmed forward (arXiv 2106.02852) in every runtime: dense against slimmed under both
token semantics (METHOD.md P1 "frozen", the paper's; C1 "removed", v1), each at the paper's budget under its own FLOP
count, at several batch sizes, all models and runtimes timed round-robin in one run. Runtimes (--runtimes):
- eager: vit.py's model(x, keep=..., tokens=...) as a user calls it (the masks checked on every call);
- packed: the same with its linear weights prepacked for oneDNN (vit.pack_for_cpu; CPU float32 only);
- compile: torch.compile of the model with its masks baked in (pipeline/export.StaticSlimmed), one graph per batch
  size (dynamic=False), with inductor's freezing on the CPU (weights constant-folded and prepacked);
- onnxruntime: the ONNX file pipeline/export.py writes, CPU execution provider, intra-op threads = --threads, every
  graph optimisation on (CPU only), its idle threads not spin-waiting: in the round-robin they would compete with
  PyTorch's thread pool in the same process (with spinning on, the first run measured onnxruntime's batch-1 slimmed
  model slower than its dense one, 0.89x, results/speed_runtimes_deit_small_cpu_float32_ort_spinning.json, where
  onnxruntime alone in a process gives about 1.5x).
timm's dense DeiT (an independent implementation, eager) runs in the same rounds: the absolute reference.

Random weights (timing does not depend on them); without --masks, "frozen" runs the paper's Fig. 5 pyramid (2.66 G)
and "removed" a linear pyramid at --gflops (2.6 G), patches chosen at random (scattered, like real masks). The paper
measured 940 -> 1321 img/s on a V100 for 4.6 -> 2.6 G: 1.41x for a FLOPs ratio of 1.77 (PAPER_V100).
The median over the rounds is the result; the fastest call is recorded beside it, and so is the median over rounds
of the per-round ratio dense/slimmed (each round's calls run back to back, so drift between rounds cancels).
Targets (the issue's): at the largest batch, a speed-up >= 0.95 of the FLOPs ratio in every runtime; at batch 1,
>= 1.5x in at least one runtime (aim: 0.9 of the FLOPs ratio). Where the time goes at batch 1 is profiled per
runtime and model (onnxruntime's profiler; torch.profiler for the others), grouped into matmuls, attention,
gather, write-back, layer norm and the rest. Writes results/speed_runtimes_<model>_<device>_<dtype>.json with the
command, the machine (slim.machine(): CPU model name, cores) and the runtimes' versions.

    python bench/speed.py                                   # DeiT-S 224 px, both semantics, CPU, every runtime
    python bench/speed.py --repeats 2 --runtimes eager onnxruntime --no-profile   # a quick check
    python bench/speed.py --masks results/cifar10-proxy/masks.json --weights ../shared/models/deit_tiny_p4_cifar10.pth
    python bench/speed.py --device cuda --dtype bfloat16 --batches 1 64 256 --runtimes eager compile
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flops  # noqa: E402
import slim  # noqa: E402
import vit  # noqa: E402
from pipeline import export  # noqa: E402

RUNTIMES = ("eager", "packed", "compile", "onnxruntime")
PAPER_V100 = {"dense_img_s": 940, "slimmed_img_s": 1321, "speedup": 1321 / 940, "flops_ratio": 4.6 / 2.6,
              "note": "DeiT-S on a V100, the paper's Table 1 (batch not stated): 940 -> 1321 img/s, 1.41x"}
TARGETS = {"batch_of_flops_ratio": 0.95, "b1_speedup": 1.5, "b1_aim_of_flops_ratio": 0.9}


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


def runtime_fns(runtime, model, masks, device, threads, folder):
    """{model label: fn(x)} of one runtime: "dense" and "slimmed <tokens>" for each semantics in masks."""
    variants = {"dense": (None, "frozen"), **{f"slimmed {t}": (keep, t) for t, (keep, _) in masks.items()}}
    if runtime == "eager":
        return {v: (lambda x, k=k, t=t: model(x, keep=k, tokens=t)) for v, (k, t) in variants.items()}
    if runtime == "packed":
        packed = vit.pack_for_cpu(model)
        return {v: (lambda x, k=k, t=t: packed(x, keep=k, tokens=t)) for v, (k, t) in variants.items()}
    if runtime == "compile":
        import torch._dynamo.config as dynamo
        dynamo.recompile_limit = 64  # one graph per model (they share StaticSlimmed.forward's code) and batch size
        if device.type == "cpu":
            import torch._inductor.config as inductor
            inductor.freezing = True  # weights as constants, prepacked: inductor's CPU inference setting
        return {v: torch.compile(export.StaticSlimmed(model, k, t).eval(), dynamic=False) for v, (k, t) in variants.items()}
    if runtime == "onnxruntime":
        cpu_model = model.float().cpu()
        fns = {}
        for v, (k, t) in variants.items():
            path = export.export_onnx(cpu_model, os.path.join(folder, v.replace(" ", "_") + ".onnx"), k, t)
            session = export.ort_session(path, threads, spinning=False)  # timed round-robin beside PyTorch
            fns[v] = lambda x, s=session: s.run(["logits"], {"img": x})[0]
        return fns
    raise ValueError(runtime)


CATEGORIES = [  # (category, substrings of op names): where batch-1 time goes
    ("matmul", ("matmul", "gemm", "addmm", "aten::mm", "bmm", "linear", "conv")),
    ("attention", ("softmax", "scaled_dot_product", "attention", "flash")),
    ("gather", ("gather", "index_select")),
    ("write-back", ("scatter", "index_copy", "index_put")),
    ("layer norm", ("layernorm", "layer_norm")),
]


def category(op):
    low = op.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_torch(fn, x, calls):
    """ms per call by operator (self CPU time, torch.profiler) of fn(x)."""
    from torch.profiler import ProfilerActivity, profile
    fn(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn(x)
    return {e.key: e.self_cpu_time_total / 1000 / calls for e in prof.key_averages() if e.self_cpu_time_total > 0}


def profile_ort(path, x, calls, threads):
    """ms per call by ONNX operator type (onnxruntime's profiler: kernel time per node) of the ONNX file path."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.enable_profiling = threads, True
    opts.profile_file_prefix = os.path.splitext(path)[0] + "_profile"
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    session.run(["logits"], {"img": x})  # warm-up, also profiled: skipped below by counting only the last calls
    for _ in range(calls):
        session.run(["logits"], {"img": x})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-calls]["ts"] if len(runs) >= calls else 0
    out = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"]["op_name"]
            out[op] = out.get(op, 0.0) + e["dur"] / 1000 / calls
    return out


def summarise(by_op, top=8):
    """A profile by operator -> {"total_ms", "by_category": {category: ms}, "top_ops": {op: ms}}."""
    cats = {}
    for op, ms in by_op.items():
        cats[category(op)] = cats.get(category(op), 0.0) + ms
    ops = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:top])
    return {"total_ms": sum(by_op.values()), "by_category": cats, "top_ops": ops}


def get_args_parser():
    p = argparse.ArgumentParser("Speed of dense vs patch-slimmed DeiT in every runtime, both token semantics")
    p.add_argument("--model", default="deit_small", choices=list(vit.PRESETS))
    p.add_argument("--weights", default=None, help="checkpoint for the architecture (e.g. the proxy); weights unused")
    p.add_argument("--masks", default=None, help="masks.json (timed under its own tokens); default: the paper's "
                   "budget under each semantics (Fig. 5 pyramid frozen, a 2.6 G linear pyramid removed)")
    p.add_argument("--tokens", default=["frozen", "removed"], nargs="+", choices=list(vit.TOKENS),
                   help="semantics to time without --masks")
    p.add_argument("--gflops", type=float, default=None, help="pyramid budget (default: the paper's PS-ViT DeiT-S "
                   "2.6 G; other models: the same 2.6/4.6 of their dense GFLOPs)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes, each timed in its own rounds")
    p.add_argument("--repeats", type=int, default=10, help="rounds at the largest batch; batch 1 runs 5x as many")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-timm", action="store_true", help="skip the timm reference")
    p.add_argument("--profile-calls", type=int, default=20, help="batch-1 calls profiled per runtime and model (0: "
                   "no profile)")
    p.add_argument("--note", default=None, help="a sentence recorded in the file and shown under its tables (e.g. "
                   "that the machine was not quiet)")
    p.add_argument("--out", default=None, help="JSON output (default results/speed_runtimes_<name>_<device>_<dtype>.json)")
    return p


def usable_runtimes(asked, device, dtype, log):
    """The asked runtimes this device, dtype and install can run; each one left out is logged with why."""
    reasons = {}
    if device.type != "cpu" or dtype != torch.float32:
        reasons["packed"] = "oneDNN prepacking is for CPU float32 only"
        reasons["onnxruntime"] = "timed here on the CPU in float32 only"
    for name in ("onnxruntime",):
        try:
            export.require("onnx", "onnxscript", "onnxruntime")
        except vit.UserError as e:
            reasons.setdefault(name, str(e))
    skipped = {r: reasons[r] for r in asked if r in reasons}
    for r, why in skipped.items():
        log(f"{r}: not timed ({why})")
    return [r for r in asked if r not in reasons], skipped


def main(args):
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = vit.load_checkpoint(args.weights) if args.weights else vit.deit(args.model)
    cfg = model.cfg
    if args.masks:
        keep, tokens = vit.load_masks(args.masks, cfg)
        masks = {tokens: (keep, args.masks)}
    else:
        gflops = args.gflops or (2.6 if cfg == vit.PRESETS["deit_small"] else
                                 round(flops.count_flops(cfg) / 1e9 * 2.6 / 4.6, 4))
        masks = {tokens: default_masks(cfg, tokens, gflops) for tokens in args.tokens}
    name = args.model if not args.weights else os.path.basename(args.weights).split(".")[0]
    out = args.out or os.path.join("results", f"speed_runtimes_{name}_{args.device}_{args.dtype}.json")
    folder = tempfile.mkdtemp(prefix="speed_onnx_")  # the ONNX files timed and onnxruntime's profiles
    runtimes, skipped = usable_runtimes(args.runtimes, device, dtype, print)
    model = model.to(device, dtype).eval()
    fns, built = {}, {}
    for runtime in runtimes:
        t0 = time.perf_counter()
        for variant, fn in runtime_fns(runtime, model, masks, device, args.threads, folder).items():
            fns[f"{runtime} {variant}"] = fn
        built[runtime] = round(time.perf_counter() - t0, 1)
    if not args.no_timm and not args.weights:
        import timm
        timm_model = timm.create_model(f"{args.model}_patch16_224", pretrained=False).to(device, dtype).eval()
        fns["timm dense"] = lambda x: timm_model(x)

    dense_gf = flops.count_flops(cfg) / 1e9
    versions = {"torch": torch.__version__}
    if "onnxruntime" in runtimes:
        import onnxruntime
        versions["onnxruntime"] = onnxruntime.__version__
    if "timm dense" in fns:
        import timm
        versions["timm"] = timm.__version__
    res = {"command": shlex.join(["python", "bench/speed.py", *sys.argv[1:]]), "note": args.note, "model": name,
           "device": args.device, "dtype": args.dtype, "machine": slim.machine(), "versions": versions,
           "threads": torch.get_num_threads(), "runtimes": runtimes, "runtimes_not_timed": skipped,
           "setup_seconds": built, "batches": args.batches, "dense_gflops": dense_gf, "paper_v100": PAPER_V100,
           "targets": TARGETS, "rows": {}, "semantics": {}, "profile_b1": {}}
    times = {}
    with torch.inference_mode():
        for b in sorted(args.batches, reverse=True):
            x = torch.randn(b, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
            x_np = x.float().cpu().numpy()
            call = {k: (lambda _, fn=fn, k=k: fn(x_np if k.startswith("onnxruntime") else x)) for k, fn in fns.items()}
            repeats = args.repeats * (5 if b == 1 else 1)
            times[b] = interleaved(call, None, repeats, device)
            for label, ts in times[b].items():
                med = statistics.median(ts)
                res["rows"].setdefault(label, {})[f"batch {b}"] = {
                    "ms": 1000 * med, "ms_fastest": 1000 * min(ts), "images_per_s": b / med}
                print(f"{label:32s} batch {b:4d}: {1000 * med:9.2f} ms/call, {b / med:9.1f} img/s "
                      f"(fastest {1000 * min(ts):.2f} ms)", flush=True)
    big = max(args.batches)
    for tokens, (keep, source) in masks.items():
        gf = flops.count_flops(cfg, keep, tokens=tokens) / 1e9
        ratio = dense_gf / gf
        sem = res["semantics"][tokens] = {"masks": source, "kept_per_layer": [int(k.numel()) for k in keep],
                                          "gflops": gf, "flops_ratio": ratio, "speedup": {}}
        for runtime in runtimes:
            d, s = f"{runtime} dense", f"{runtime} slimmed {tokens}"
            sem["speedup"][runtime] = {f"batch {b}": {
                "speedup": statistics.median(times[b][d]) / statistics.median(times[b][s]),
                "paired": statistics.median(a / c for a, c in zip(times[b][d], times[b][s]))} for b in args.batches}
            for b in args.batches:
                sp = sem["speedup"][runtime][f"batch {b}"]
                sp["of_flops_ratio"] = sp["speedup"] / ratio
        sem["targets_met"] = targets_met(sem, runtimes, args.batches)
        print(f"{tokens}: GFLOPs {dense_gf:.2f} -> {gf:.2f} (FLOPs ratio {ratio:.2f}); " + "; ".join(
            f"{rt} " + ", ".join(f"b{b} {sem['speedup'][rt][f'batch {b}']['speedup']:.2f}x" for b in args.batches)
            for rt in runtimes) + f" (paper, V100: {PAPER_V100['speedup']:.2f}x for a FLOPs ratio of "
            f"{PAPER_V100['flops_ratio']:.2f}); targets {sem['targets_met']}", flush=True)
    if "timm dense" in fns and runtimes:
        slimmed = {k: v[f"batch {big}"]["images_per_s"] for k, v in res["rows"].items() if " slimmed " in k}
        fastest = max(slimmed, key=slimmed.get)
        timm_img_s = res["rows"]["timm dense"][f"batch {big}"]["images_per_s"]
        res["absolute"] = {"batch": big, "fastest_slimmed": fastest, "images_per_s": slimmed[fastest],
                           "timm_dense_eager_images_per_s": timm_img_s, "over_timm": slimmed[fastest] / timm_img_s}
        print(f"absolute, batch {big}: {fastest} {slimmed[fastest]:.1f} img/s against timm dense (eager) "
              f"{timm_img_s:.1f} img/s: {slimmed[fastest] / timm_img_s:.2f}x (paper, V100: "
              f"{PAPER_V100['dense_img_s']} -> {PAPER_V100['slimmed_img_s']} img/s)", flush=True)
    if args.profile_calls and device.type == "cpu" and 1 in args.batches:
        with torch.inference_mode():  # the input made as the timed ones were, so no compiled graph is rebuilt
            x = torch.randn(1, 3, cfg.img_size, cfg.img_size)
            for label, fn in fns.items():
                if label.startswith("onnxruntime"):
                    path = os.path.join(folder, label.split(" ", 1)[1].replace(" ", "_") + ".onnx")
                    by_op = profile_ort(path, x.numpy(), args.profile_calls, args.threads)
                else:
                    by_op = profile_torch(fn, x, args.profile_calls)
                res["profile_b1"][label] = summarise(by_op)
                cats = res["profile_b1"][label]["by_category"]
                print(f"profile {label:32s} batch 1: " + ", ".join(f"{c} {ms:.2f}" for c, ms in
                                                                 sorted(cats.items(), key=lambda kv: -kv[1])) + " ms",
                      flush=True)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {out}")
    return res


def targets_met(sem, runtimes, batches):
    """The issue's targets for one semantics: the largest batch >= 0.95 of the FLOPs ratio in every runtime; batch 1
    >= 1.5x in at least one runtime; the aim, batch 1 >= 0.9 of the FLOPs ratio in at least one."""
    big, sp = max(batches), sem["speedup"]
    met = {f"batch {big} >= {TARGETS['batch_of_flops_ratio']} of the FLOPs ratio in every runtime":
           bool(runtimes) and all(sp[r][f"batch {big}"]["of_flops_ratio"] >= TARGETS["batch_of_flops_ratio"]
                                  for r in runtimes)}
    if 1 in batches:
        met[f"batch 1 >= {TARGETS['b1_speedup']}x in a runtime"] = any(
            sp[r]["batch 1"]["speedup"] >= TARGETS["b1_speedup"] for r in runtimes)
        met[f"aim: batch 1 >= {TARGETS['b1_aim_of_flops_ratio']} of the FLOPs ratio in a runtime"] = any(
            sp[r]["batch 1"]["of_flops_ratio"] >= TARGETS["b1_aim_of_flops_ratio"] for r in runtimes)
    return met


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except vit.UserError as e:
        sys.exit(f"error: {e}")
