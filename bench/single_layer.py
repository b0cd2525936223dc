"""
One layer pruned alone, no fine-tuning (arXiv 2106.02852, Fig. 6 and Fig. 7; docs/results.md), on the shipped CIFAR-10
proxy: layer t keeps the (1 - rate) best-scoring patches and the class token, layers above keep the same (masks nest,
m_L = e_0), layers below are dense. Layer t is scored as Alg. 1 first sees it (layers 1..L-1 dense, m_L = e_0) on
512 training images. The val split's dense Z_0..Z_L is cached once, so each point runs only blocks t..L.

    python bench/single_layer.py --figure 6   # every layer 1..11, ratio 0.2 / 0.5 / 0.8, Eq. 6 order
    python bench/single_layer.py --figure 7   # layers 3, 7, 11, rate 0.1 .. 0.9: Eq. 6 vs attn vs random (+ others)
Writes results/fig<N>.json (with paired intervals against Eq. 6), fig<N>_predictions.npz and fig<N>.png.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from common import ROOT, machine, pyplot, run, write_json
import data
import flops
import slim
from pipeline.caches import cache_dense
import vit
from stats import compare
FIGURES = {  # the paper's settings: layers, rates, scores
    6: ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0.2, 0.5, 0.8], ["significance"]),
    7: ([3, 7, 11], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        ["significance", "attn", "random", "class-attn", "head-mean"]),
}
SCORE_IMAGES = 512


@torch.no_grad()
def predictions(model, z_in, keep, tokens, t, batch_size=250):
    """Predicted classes of the val images whose Z_{t-1} is z_in, blocks t..L run under keep."""
    out = []
    for i in range(0, len(z_in), batch_size):
        f = slim.tail_features(model, z_in[i:i + batch_size], keep, tokens, t)
        out.append(model.classify(f).argmax(-1))
    return torch.cat(out).numpy().astype(np.int16)


def main():
    p = argparse.ArgumentParser("One layer pruned alone, no fine-tuning (the paper's Fig. 6 and Fig. 7)")
    p.add_argument("--figure", type=int, choices=list(FIGURES), required=True)
    p.add_argument("--data-path", default=data.CIFAR10_DIR)
    args = p.parse_args()
    t_start, out = time.time(), os.path.join(ROOT, "results", f"fig{args.figure}")
    layers, rates, scores = FIGURES[args.figure]
    model = vit.load_checkpoint(vit.PROXY_CHECKPOINT)
    cfg, N, L = model.cfg, model.cfg.num_tokens, model.cfg.depth
    train = data.build_dataset(args.data_path, "train", cfg.img_size, train_transform=False)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    score_cache = cache_dense(model, data.loader(torch.utils.data.Subset(train, perm[:SCORE_IMAGES]), 64),
                              "cache score images")
    val = data.build_dataset(args.data_path, "val", cfg.img_size)
    labels = np.asarray(val.targets, dtype=np.int16)
    val_cache = cache_dense(model, data.loader(val, 250), "cache val")
    preds = {"labels": labels, "dense": val_cache.logits.argmax(-1).numpy().astype(np.int16)}
    dense_top1 = float(100 * (preds["dense"] == labels).mean())
    print(f"dense: top-1 {dense_top1:.2f}% on {len(labels)} val images", flush=True)
    top = [torch.arange(N)] * (L - 1) + [torch.tensor([0])]  # what Alg. 1 sees first: m_L = e_0, the rest dense
    points = []
    for t in layers:
        for score in scores:
            s = slim.layer_scores(model, score_cache.z[t - 1], top, "frozen", t, score, 64, 0)
            ranked = slim.ranked_candidates(s, torch.tensor([0]))  # every patch, best first
            for rate in rates:
                n_keep = round((1 - rate) * (N - 1))
                m_t = torch.cat([torch.tensor([0]), ranked[:n_keep]]).sort().values
                keep = [torch.arange(N)] * (t - 1) + [m_t] * (L - t) + [torch.tensor([0])]
                key = f"t{t}_r{rate}_{score}"
                preds[key] = predictions(model, val_cache.z[t - 1], keep, "frozen", t)
                top1 = float(100 * (preds[key] == labels).mean())
                pt = {"layer": t, "rate": rate, "score": score, "kept_patches": n_keep, "top1": round(top1, 2),
                      "gflops": flops.count_flops(cfg, keep, tokens="frozen") / 1e9}
                if score != "significance":  # paired against the paper's score at the same layer and rate
                    pt["significance_minus_this"] = compare(preds[f"t{t}_r{rate}_significance"] == labels,
                                                            preds[key] == labels)
                points.append(pt)
                print(json.dumps(pt), flush=True)
    res = {"command": " ".join(["python bench/single_layer.py"] + sys.argv[1:]), "tokens": "frozen",
           "figure": args.figure, "dense_top1": dense_top1, "val_images": len(labels), "score_images": SCORE_IMAGES,
           "points": points, "machine": machine(), "seconds": round(time.time() - t_start, 1)}
    write_json(out + ".json", res)
    np.savez_compressed(out + "_predictions.npz", **preds)
    plot(res, out + ".png")
    print(f"wrote {out}.json, {out}_predictions.npz, {out}.png")


def plot(res, path):
    plt = pyplot()
    if plt is None:
        return
    pts = res["points"]
    if res["figure"] == 6:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for rate in sorted({p["rate"] for p in pts}):
            xy = sorted((p["layer"], p["top1"]) for p in pts if p["rate"] == rate)
            ax.plot(*zip(*xy), marker="o", label=f"pruning ratio {rate}")
        ax.set_xlabel("layer pruned (alone)")
        ax.set_xticks(sorted({p["layer"] for p in pts}))
    else:
        layers = sorted({p["layer"] for p in pts})
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6), sharey=True)
        for ax, t in zip(axes, layers):
            for score in dict.fromkeys(p["score"] for p in pts):
                xy = sorted((p["rate"], p["top1"]) for p in pts if p["layer"] == t and p["score"] == score)
                ax.plot(*zip(*xy), marker="o", ms=3, label=score)
            ax.set_title(f"layer {t}")
            ax.set_xlabel("pruning rate")
            ax.axhline(res["dense_top1"], color="k", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        ax = axes[0]
    ax.axhline(res["dense_top1"], color="k", lw=0.8, ls=":", label="dense")
    ax.set_ylabel("CIFAR-10 val top-1 (%), no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Fig. {res['figure']} on the proxy: one layer pruned alone (tokens = {res['tokens']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
