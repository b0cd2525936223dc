"""
DPS-ViT against PS-ViT on the CIFAR-10 proxy (arXiv 2106.02852, Sec. 4.4 and Table 1; method.md P6, C8;
docs/dynamic.md). Per seed, from a finished static run (slim.py --out DIR, with slimmed.pth):
- PS+: the static model fine-tuned again with its masks, by the DPS runs' recipe;
- DPS: `slim.py --dynamic --from DIR` at the static counts (G fitted, then that fine-tune with G in place);
- DPS at fewer tokens: the same at 2.4/2.6 of the FLOPs (the paper's DeiT-S: DPS 79.5% at 2.4 G, PS 79.4% at 2.6 G).
Any other flag (--final-epochs, --predictor-steps, ...) passes through to slim.py.

    python bench/dynamic.py --static results/cifar10-proxy results/cifar10-proxy-seed1 --seeds 0 1
Writes OUT.json, OUT_predictions.npz, OUT_picture.png and one slim.py folder per run under OUT/; every stage resumes.
"""
import argparse
import os
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from common import ROOT, folder_log, interleaved, machine, pyplot, read_json, write_json
import data
from pipeline.cli import cli
import vit
from pipeline import finetune
from pipeline.dynamic import DynamicSlimmed
from pipeline.evaluate import accuracy, predict, save_predictions
from stats import compare, compare_seeds, describe
PAPER = {"DeiT-S": {"PS": [79.4, 2.6], "DPS": [79.5, 2.4], "dense": [79.8, 4.6]}, "ratio": 2.4 / 2.6}
RUNS = {"dps": 1.0, "dps_fewer": PAPER["ratio"]}  # run -> FLOPs over the static model's


def dynamic_run(static_dir, out, seed, ratio, slim_flags):
    """slim.py --dynamic --from static_dir -> out (resumes); its dynamic.json."""
    cli(["--dynamic", "--from", static_dir, "--out", out, "--seed", str(seed), "--flops-ratio", str(ratio), *slim_flags])
    return read_json(os.path.join(out, "dynamic.json"))


def static_continued(static_dir, out, ft, val, args, log):
    """PS+: the static model of static_dir fine-tuned again with its own masks, with the DPS run's recipe ft (a dict
    of FinetuneSettings); resumable (out/finetune.pt). Returns (top-1, per-image predictions, labels)."""
    os.makedirs(out, exist_ok=True)
    model = vit.load_checkpoint(os.path.join(static_dir, "slimmed.pth"))
    report = read_json(os.path.join(static_dir, "report.json"))
    s = finetune.FinetuneSettings(**ft)
    if s.epochs > 0:
        teacher = vit.load_checkpoint(report["args"]["weights"]) if s.distill != "none" else None
        cfg = model.cfg
        train = data.build_dataset(report["args"]["data_path"], "train", cfg.img_size, randaugment=s.randaugment,
                                   erase=s.erase, mean=cfg.mean, std=cfg.std)
        finetune.finetune(model, teacher, model.keep, model.tokens, finetune.Schedule(train, s, cfg, args.workers), log,
                          finetune.Checkpoint(os.path.join(out, "finetune.pt"), {"from": os.path.abspath(static_dir)}))
    preds, labels = predict(model, val, model.keep, model.tokens, 250, args.workers, desc="eval PS+")
    return accuracy(preds, labels), preds, labels


def picture(dyn, val, path, images=6):
    """The patches each of `images` val images (one per class) keeps at each layer that chooses: kept bright, the
    rest greyed. Returns what it drew."""
    plt = pyplot()
    cfg, P = dyn.cfg, dyn.cfg.prefix_tokens
    g = cfg.img_size // cfg.patch_size
    layers = [t for t in range(1, cfg.depth + 1) if P < dyn.counts[t - 1] < ([cfg.num_tokens] + dyn.counts)[t - 1]]
    idx = [next(i for i, y in enumerate(val.targets) if y == c) for c in range(min(images, cfg.num_classes))]
    img = torch.stack([val[i][0] for i in idx])
    with torch.no_grad():
        _, keep = dyn.run_blocks(dyn.vit.embed(img))
    drawn = {"images": idx, "layers": layers, "counts": dyn.counts,
             "kept": {t: keep[t - 1][:, P:].sub(P).tolist() for t in layers}}
    if plt is None or not layers:
        return drawn
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    cols = len(layers) + 1
    fig, axes = plt.subplots(len(idx), cols, figsize=(1.6 * cols, 1.6 * len(idx)), squeeze=False)
    for r in range(len(idx)):
        rgb = (img[r] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[r, 0].imshow(rgb)
        for c, t in enumerate(layers, 1):
            m = torch.zeros(g * g)
            m[keep[t - 1][r, P:] - P] = 1
            shade = np.kron(m.view(g, g).numpy(), np.ones((cfg.patch_size, cfg.patch_size)))[..., None]
            axes[r, c].imshow(rgb * (0.25 + 0.75 * shade))
            if r == 0:
                axes[r, c].set_title(f"layer {t}: {dyn.counts[t - 1] - P}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("DPS-ViT: the patches each image keeps (bright)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return drawn


def speed(dyn, static, batches, repeats):
    """Seconds per forward (median of round-robin repeats, after warm-up) of the static model with its masks and of
    the dynamic one, at each batch size, with random images; eager, under torch.inference_mode."""
    cfg, out = dyn.cfg, {}
    fns = {"static": lambda x: static(x, keep=static.keep, tokens=static.tokens), "dynamic": dyn}
    with torch.inference_mode():
        for b in batches:
            times = interleaved(fns, torch.randn(b, 3, cfg.img_size, cfg.img_size), repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            out[b] = {"static_ms": round(1e3 * med["static"], 3), "dynamic_ms": round(1e3 * med["dynamic"], 3),
                      "dynamic_over_static": round(med["dynamic"] / med["static"], 3)}
    return out


def main():
    p = argparse.ArgumentParser("DPS-ViT against PS-ViT on the proxy (Sec. 4.4); other flags go to slim.py --dynamic")
    p.add_argument("--static", nargs="+", required=True, help="finished static runs, one per seed (slim.py --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "dynamic"))
    args, slim_flags = p.parse_known_args()
    if len(args.static) != len(args.seeds):
        sys.exit("error: give one --static folder per --seeds value")
    log, t_start = folder_log(args.out), time.time()
    log(f"python bench/dynamic.py {shlex.join(sys.argv[1:])}")
    runs, preds, corrects = [], {}, {"ps": [], **{k: [] for k in RUNS}}
    for static_dir, seed in zip(args.static, args.seeds):
        dps = {k: dynamic_run(static_dir, os.path.join(args.out, f"{k}_seed{seed}"), seed, ratio,
                              slim_flags + ["--workers", str(args.workers)]) for k, ratio in RUNS.items()}
        cfg = vit.load_checkpoint(os.path.join(static_dir, "slimmed.pth")).cfg
        val = data.build_dataset(read_json(os.path.join(static_dir, "report.json"))["args"]["data_path"],
                                 "val", cfg.img_size, mean=cfg.mean, std=cfg.std)
        ps_top1, ps_preds, labels = static_continued(static_dir, os.path.join(args.out, f"ps_seed{seed}"),
                                                     dps["dps"]["final_finetune"], val, args, log)
        preds[f"ps_seed{seed}"], correct = ps_preds, {"ps": ps_preds.numpy() == labels.numpy()}
        for key in RUNS:
            f = np.load(os.path.join(args.out, f"{key}_seed{seed}", "dynamic_predictions.npz"))
            assert np.array_equal(f["labels"], labels.numpy()), "the runs saw different val images"
            preds[f"{key}_seed{seed}"], correct[key] = torch.as_tensor(f["dynamic"]), f["dynamic"] == labels.numpy()
        for k in corrects:
            corrects[k].append(correct[k])
        row = {"seed": seed, "static": static_dir, "ps_top1": ps_top1, "ps_gflops": dps["dps"]["static_gflops"],
               "ps_before_extra_finetune_top1": dps["dps"]["static_top1"], "counts": dps["dps"]["kept_per_layer"]}
        for key, run in dps.items():
            row.update({f"{key}_top1": run["dynamic_top1"], f"{key}_fitted_top1": run["fitted_top1"],
                        f"{key}_gflops": run["gflops"], f"{key}_predictor_gflops": run["predictor_gflops"],
                        f"{key}_counts": run["kept_per_layer"], f"{key}_spearman_per_layer": {
                            lay["layer"]: [lay["spearman"], lay["top_k_recall"]] for lay in run["layers"]},
                        f"{key}_minus_ps": compare(correct[key], correct["ps"])})
            log(f"seed {seed}: {key} {run['dynamic_top1']:.2f}% at {run['gflops']:.4f} G against PS+ {ps_top1:.2f}% at "
                f"{row['ps_gflops']:.4f} G: {describe(row[f'{key}_minus_ps'])}")
        runs.append(row)
    save_predictions(args.out + "_predictions.npz", labels=labels, **preds)
    dyn = DynamicSlimmed.from_checkpoint(*vit.read_checkpoint(os.path.join(args.out, f"dps_seed{args.seeds[0]}",
                                                                          "dynamic.pth")))
    static = vit.load_checkpoint(os.path.join(args.static[0], "slimmed.pth"))
    torch.manual_seed(0)
    result = {
        "question": "DPS-ViT against PS-ViT at equal counts after the same total fine-tuning, and at fewer FLOPs",
        "paper": PAPER, "runs": runs,
        **{f"{k}_minus_ps_over_seeds": compare_seeds(corrects[k], corrects["ps"]) for k in RUNS},
        "val_images": len(labels), "picture": picture(dyn, val, args.out + "_picture.png"),
        "speed": speed(dyn.cpu().eval(), static.eval(), [32, 1], 30),
        "threads": torch.get_num_threads(), "wall_seconds": round(time.time() - t_start, 1),
        "command": f"python bench/dynamic.py {shlex.join(sys.argv[1:])}", "machine": machine()}
    write_json(args.out + ".json", result)
    for key in RUNS:
        c = result[f"{key}_minus_ps_over_seeds"]
        log(f"{key} - PS+ over {c['seeds']} seeds: {c['diff']:+.2f} points (95% paired bootstrap "
            f"{c['ci95'][0]:+.2f} to {c['ci95'][1]:+.2f})")
    for b, v in result["speed"].items():
        log(f"batch {b}: static {v['static_ms']:.2f} ms, dynamic {v['dynamic_ms']:.2f} ms "
            f"({v['dynamic_over_static']:.2f}x the static time)")
    log(f"wrote {args.out}.json, {args.out}_predictions.npz, {args.out}_picture.png")


if __name__ == "__main__":
    main()
