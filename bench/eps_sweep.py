"""
The paper's Fig. 4 on the CIFAR-10 proxy (arXiv 2106.02852; docs/results.md): for each eps, Algorithm 1 with
slim.py's defaults (any other slim.py flag passes through), then the same end-to-end fine-tune for every point.

    python bench/eps_sweep.py --eps 0.001 0.002 0.005 0.01 0.02 --final-epochs 0.5
Writes results/fig4/eps_<eps>.json as each point finishes (a rerun skips it; a search resumes from
eps_<eps>_state.pt), then results/fig4.json, fig4.png and fig4_predictions.npz.
"""
import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from common import ROOT, folder_log, light_finetune, machine, pyplot, read_json, run, write_json
import data
import flops
import slim
from pipeline import cli, run as pipeline_run
from pipeline.caches import cache_search_sets
from pipeline.evaluate import accuracy, predict, save_predictions
import vit
from stats import compare, describe


def main():
    p = argparse.ArgumentParser("Fig. 4: eps against FLOPs saved and top-1 (CIFAR-10 proxy)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.002, 0.005, 0.01, 0.02])
    p.add_argument("--final-epochs", type=float, default=0.5, help="the same end-to-end fine-tune for every point")
    p.add_argument("--final-lr", type=float, default=3e-4)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "fig4"))
    args, rest = p.parse_known_args()
    proxy = ["--data", "folder", "--data-path", data.CIFAR10_DIR, "--weights", vit.PROXY_CHECKPOINT, "--out", args.out]
    sargs = cli.complete_args(cli.get_args_parser().parse_args(proxy + rest))
    cli.check_args(sargs)
    pretrained = pipeline_run.load_model(sargs)[0].to(torch.device(sargs.device))
    cfg, log, t_start = pretrained.cfg, folder_log(args.out), time.time()
    s = pipeline_run.settings_from_args(sargs, cfg)
    log(f"bench/eps_sweep.py {' '.join(sys.argv[1:])}\nsearch settings: {json.dumps(asdict(s))}")
    val = data.build_dataset(sargs.data_path, "val", cfg.img_size)
    train_aug = data.build_dataset(sargs.data_path, "train", cfg.img_size)
    preds_path = args.out + "_predictions.npz"
    dense_preds, labels = predict(pretrained, val, workers=sargs.workers, desc="eval dense")
    save_predictions(preds_path, dense=dense_preds, labels=labels)
    dense_top1, dense_gflops = accuracy(dense_preds, labels), flops.count_flops(cfg) / 1e9
    log(f"dense: top-1 {dense_top1:.2f}%, {dense_gflops:.3f} GFLOPs")
    model = copy.deepcopy(pretrained)
    fit, held = cache_search_sets(model, train_aug, sargs.data_path, s, sargs.workers, log)
    points = []
    for eps in args.eps:
        path = os.path.join(args.out, f"eps_{eps}.json")
        if os.path.exists(path):
            points.append(read_json(path))
            continue
        t0 = time.time()
        model.load_state_dict(pretrained.state_dict())
        s.eps = eps
        state = slim.search(model, fit, held, s, log, os.path.join(args.out, f"eps_{eps}_state.pt"))
        keep, t_search = state["keep"], time.time() - t0
        searched, _ = predict(model, val, keep, s.tokens, workers=sargs.workers, desc="eval searched")
        light_finetune(model, pretrained, keep, s.tokens, train_aug, args.final_epochs, args.final_lr, sargs.batch_size,
                       sargs.seed, log, sargs.workers)
        final, _ = predict(model, val, keep, s.tokens, workers=sargs.workers, desc="eval fine-tuned")
        save_predictions(preds_path, **{f"eps_{eps}_searched": searched, f"eps_{eps}_final": final})
        gf = flops.count_flops(cfg, keep, tokens=s.tokens) / 1e9
        pt = {"eps": eps, "tokens": s.tokens, "kept_per_layer": flops.kept_counts(cfg, keep), "gflops": gf,
              "flops_saved": 1 - gf / dense_gflops, "top1_searched": accuracy(searched, labels),
              "top1": accuracy(final, labels), "dense_minus_this": compare(dense_preds == labels, final == labels),
              "layers": state["layers"], "search_seconds": round(t_search, 1), "seconds": round(time.time() - t0, 1)}
        write_json(path, pt)
        log(f"eps {eps}: {100 * pt['flops_saved']:.1f}% fewer FLOPs, top-1 {pt['top1_searched']:.2f} after the search, "
            f"{pt['top1']:.2f} after the final fine-tune; dense minus this: {describe(pt['dense_minus_this'])}")
        points.append(pt)
    summary = {"command": " ".join(["python bench/eps_sweep.py"] + sys.argv[1:]), "dense_top1": dense_top1,
               "dense_gflops": dense_gflops, "final_epochs": args.final_epochs, "final_lr": args.final_lr,
               "settings": asdict(s), "machine": machine(), "wall_seconds_this_run": round(time.time() - t_start, 1),
               "points": [{k: v for k, v in p.items() if k != "layers"} for p in points]}
    write_json(args.out + ".json", summary)
    plot(summary, args.out + ".png")


def plot(summary, path):
    plt = pyplot()
    if plt is None:
        return
    pts = sorted(summary["points"], key=lambda p: p["eps"])
    fig, ax1 = plt.subplots(figsize=(6, 3.8))
    ax2 = ax1.twinx()
    x = [p["eps"] for p in pts]
    ax1.plot(x, [p["top1"] for p in pts], "o-", color="C0", label="top-1 after final fine-tune")
    ax1.plot(x, [p["top1_searched"] for p in pts], "o--", color="C0", alpha=0.5, label="top-1 after the search")
    ax1.axhline(summary["dense_top1"], color="k", lw=0.8, ls=":", label="dense")
    ax2.plot(x, [100 * p["flops_saved"] for p in pts], "s-", color="C1", label="FLOPs saved (paper counting)")
    ax1.set_xscale("log")
    ax1.set_xlabel("ε")
    ax1.set_ylabel("CIFAR-10 val top-1 (%)", color="C0")
    ax2.set_ylabel("FLOPs saved (%)", color="C1")
    ax1.legend(fontsize=7, loc="lower left")
    ax2.legend(fontsize=7, loc="lower right")
    ax1.set_title("Fig. 4 on the proxy: ε against accuracy and FLOPs saved", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
