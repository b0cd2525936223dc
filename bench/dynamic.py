"""
DPS-ViT against PS-ViT on the CIFAR-10 proxy (arXiv 2106.02852, Sec. 4.4 and Table 1; method.md P6, C8). For each
seed, from a finished static run (slim.py --out DIR, holding slimmed.pth after PS's own final fine-tune):
- PS+: the static model fine-tuned again with its masks, E epochs (the DPS runs' recipe);
- DPS: `slim.py --dynamic --from DIR` at the static counts: G fitted, then the same E epochs with G in place;
- DPS at fewer tokens: the same with --flops-ratio 2.4/2.6 (the paper's DeiT-S: DPS 79.5% at 2.4 G, PS 79.4% at 2.6 G).
Reports top-1 and GFLOPs (G included), paired bootstrap intervals of DPS - PS+ per seed and over the seeds, G's
Spearman against the exact per-image Eq. 6 per layer, a picture of the patches images keep, and the dynamic forward's
speed against the static one (eager, round-robin).

    python bench/dynamic.py --static results/cifar10-proxy results/cifar10-proxy-seed1 --seeds 0 1
Writes OUT.json (with the command and the machine), OUT_predictions.npz, OUT_picture.png and one slim.py folder per
run under OUT/; every stage resumes.
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from common import ROOT, folder_log, interleaved, pyplot, read_json, write_json
import data
from pipeline.distributed import machine  # noqa: E402
from pipeline.cli import cli  # noqa: E402
import vit
from pipeline import finetune
from pipeline.dynamic import DynamicSlimmed
from pipeline.evaluate import accuracy, predict, save_predictions
from stats import compare, compare_seeds, describe
PAPER = {"DeiT-S": {"PS": [79.4, 2.6], "DPS": [79.5, 2.4], "dense": [79.8, 4.6]}, "ratio": 2.4 / 2.6}


def dynamic_run(static_dir, out, seed, ratio, args):
    """slim.py --dynamic --from static_dir -> out (resumes); its dynamic.json."""
    argv = ["--dynamic", "--from", static_dir, "--out", out, "--seed", str(seed), "--flops-ratio", str(ratio),
            "--fit-images", str(args.fit_images), "--held-images", str(args.held_images), "--predictor-steps",
            str(args.predictor_steps), "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    argv += ["--final-epochs", str(args.final_epochs)] if args.final_epochs is not None else []
    argv += ["--final-lr", str(args.final_lr)] if args.final_lr is not None else []
    argv += ["--val-per-class", str(args.val_per_class)] if args.val_per_class else []
    cli(argv)
    with open(os.path.join(out, "dynamic.json")) as f:
        return json.load(f)


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
        finetune.finetune(model, teacher, model.keep, model.tokens, train, s, os.path.join(out, "finetune.pt"),
                          {"from": os.path.abspath(static_dir)}, log, args.workers)
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
    p = argparse.ArgumentParser("DPS-ViT against PS-ViT on the proxy (Sec. 4.4)")
    p.add_argument("--static", nargs="+", required=True, help="finished static runs, one per seed (slim.py --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ratio", type=float, default=PAPER["ratio"], help="FLOPs of the fewer-token DPS over PS's")
    p.add_argument("--final-epochs", type=float, default=None, help="E (default: each static run's own)")
    p.add_argument("--final-lr", type=float, default=None)
    p.add_argument("--fit-images", type=int, default=4096)
    p.add_argument("--held-images", type=int, default=1024)
    p.add_argument("--predictor-steps", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=None, help="quick runs: the first k val images per class")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--speed-batches", type=int, nargs="+", default=[32, 1])
    p.add_argument("--speed-repeats", type=int, default=30)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "dynamic"))
    args = p.parse_args()
    if len(args.static) != len(args.seeds):
        sys.exit("error: give one --static folder per --seeds value")
    log, t_start = folder_log(args.out), time.time()
    log(f"python bench/dynamic.py {shlex.join(sys.argv[1:])}")
    runs, preds, corrects = [], {}, {"ps": [], "dps": [], "dps_fewer": []}
    for static_dir, seed in zip(args.static, args.seeds):
        dps = dynamic_run(static_dir, os.path.join(args.out, f"dps_seed{seed}"), seed, 1.0, args)
        fewer = dynamic_run(static_dir, os.path.join(args.out, f"dps_fewer_seed{seed}"), seed, args.ratio, args)
        cfg = vit.load_checkpoint(os.path.join(static_dir, "slimmed.pth")).cfg
        val_all = data.build_dataset(read_json(os.path.join(static_dir, "report.json"))["args"]["data_path"],
                                     "val", cfg.img_size, mean=cfg.mean, std=cfg.std)
        val = data.subset(val_all, per_class=args.val_per_class) if args.val_per_class else val_all
        ps_top1, ps_preds, labels = static_continued(static_dir, os.path.join(args.out, f"ps_seed{seed}"),
                                                     dps["final_finetune"], val, args, log)
        got = {}
        for key, run in (("dps", dps), ("dps_fewer", fewer)):
            f = np.load(os.path.join(args.out, f"{key}_seed{seed}", "dynamic_predictions.npz"))
            assert np.array_equal(f["labels"], labels.numpy()), "the runs saw different val images"
            got[key] = f["dynamic"]
        correct = {"ps": ps_preds.numpy() == labels.numpy(), **{k: v == labels.numpy() for k, v in got.items()}}
        for k in corrects:
            corrects[k].append(correct[k])
        preds.update({f"ps_seed{seed}": ps_preds, **{f"{k}_seed{seed}": torch.as_tensor(v) for k, v in got.items()}})
        row = {"seed": seed, "static": static_dir, "ps_top1": ps_top1, "ps_gflops": dps["static_gflops"],
               "ps_before_extra_finetune_top1": dps["static_top1"], "counts": dps["kept_per_layer"]}
        for key, run in (("dps", dps), ("dps_fewer", fewer)):
            row.update({f"{key}_top1": run["dynamic_top1"], f"{key}_fitted_top1": run["fitted_top1"],
                        f"{key}_gflops": run["gflops"], f"{key}_predictor_gflops": run["predictor_gflops"],
                        f"{key}_counts": run["kept_per_layer"], f"{key}_spearman_per_layer": {
                            lay["layer"]: [lay["spearman"], lay["top_k_recall"]] for lay in run["layers"]},
                        f"{key}_minus_ps": compare(correct[key], correct["ps"])})
            log(f"seed {seed}: {key} {run['dynamic_top1']:.2f}% at {run['gflops']:.4f} G against PS+ {ps_top1:.2f}% at "
                f"{dps['static_gflops']:.4f} G: {describe(row[f'{key}_minus_ps'])}")
        runs.append(row)
    labels_np = labels.numpy()
    save_predictions(args.out + "_predictions.npz", labels=labels, **preds)
    dyn = DynamicSlimmed.from_checkpoint(*vit.read_checkpoint(os.path.join(args.out, f"dps_seed{args.seeds[0]}",
                                                                          "dynamic.pth")))
    static = vit.load_checkpoint(os.path.join(args.static[0], "slimmed.pth"))
    torch.manual_seed(0)
    result = {
        "question": "DPS-ViT against PS-ViT at equal counts after the same total fine-tuning, and at fewer FLOPs",
        "paper": PAPER, "runs": runs,
        "dps_minus_ps_over_seeds": compare_seeds(corrects["dps"], corrects["ps"]),
        "dps_fewer_minus_ps_over_seeds": compare_seeds(corrects["dps_fewer"], corrects["ps"]),
        "val_images": len(labels_np), "picture": picture(dyn, val_all, args.out + "_picture.png"),
        "speed": speed(dyn.cpu().eval(), static.eval(), args.speed_batches, args.speed_repeats),
        "threads": torch.get_num_threads(), "wall_seconds": round(time.time() - t_start, 1),
        "command": f"python bench/dynamic.py {shlex.join(sys.argv[1:])}", "machine": machine()}
    write_json(args.out + ".json", result)
    for key in ("dps", "dps_fewer"):
        c = result[f"{key}_minus_ps_over_seeds"]
        log(f"{key} - PS+ over {c['seeds']} seeds: {c['diff']:+.2f} points (95% paired bootstrap "
            f"{c['ci95'][0]:+.2f} to {c['ci95'][1]:+.2f})")
    for b, v in result["speed"].items():
        log(f"batch {b}: static {v['static_ms']:.2f} ms, dynamic {v['dynamic_ms']:.2f} ms "
            f"({v['dynamic_over_static']:.2f}x the static time)")
    log(f"wrote {args.out}.json, {args.out}_predictions.npz, {args.out}_picture.png")


if __name__ == "__main__":
    main()
