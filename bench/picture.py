"""
The kept patches drawn over images (arXiv 2106.02852, Fig. 5; docs/results.md): per layer, the patches whose tokens
it updates, the others faded (frozen or removed, by the masks' own semantics, method.md P1 / C1), on one val image
of each of 4 classes; below, the kept counts per layer against a linear pyramid of the same FLOPs.

    python bench/picture.py --masks results/cifar10-proxy/masks.json --out results/fig5_picture
    python bench/picture.py --masks OUT/masks.json --data-path /data/imagenet --out OUT/picture
Writes OUT.png and OUT.json (the masks, their tokens, counts and the images drawn).
"""
import argparse
import os
import sys

import numpy as np
import torch

from common import ROOT, pyplot, run, write_json
import data
import flops
import vit


def patch_mask(keep_l, cfg):
    """(grid, grid) bool: which patches' tokens survive a layer (token i >= 1 is patch i-1, row-major)."""
    g = cfg.img_size // cfg.patch_size
    m = torch.zeros(g * g, dtype=torch.bool)
    m[keep_l[keep_l > 0] - 1] = True
    return m.view(g, g).numpy()


def main():
    p = argparse.ArgumentParser("Draw the kept-patch pyramid over images")
    p.add_argument("--masks", default=os.path.join(ROOT, "results", "cifar10-proxy", "masks.json"))
    p.add_argument("--data-path", default=data.CIFAR10_DIR)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "fig5_picture"))
    args = p.parse_args()
    plt = pyplot()
    if plt is None:
        sys.exit("error: bench/picture.py draws with matplotlib")
    cfg = vit.masks_config(args.masks)
    keep, tokens = vit.load_masks(args.masks, cfg)
    counts, dense, gf = flops.kept_counts(cfg, keep), flops.count_flops(cfg), flops.count_flops(cfg, keep, tokens=tokens)
    pyramid = flops.linear_pyramid(cfg, gf, tokens)
    ds = data.build_dataset(args.data_path, "val", cfg.img_size)
    ds.transform.transforms = ds.transform.transforms[:-1]  # the val transform without Normalize: draw the image itself
    idx = data.subset(ds, per_class=1).indices[:4]  # the first image of each of the first 4 classes

    L = cfg.depth
    fig = plt.figure(figsize=(1.15 * (L + 1), 1.2 * len(idx) + 2.6))
    gs = fig.add_gridspec(len(idx) + 1, L + 1, height_ratios=[1] * len(idx) + [1.8], hspace=0.15, wspace=0.05)
    for r, i in enumerate(idx):
        img = ds[i][0].permute(1, 2, 0).numpy()
        for c in range(L + 1):
            ax = fig.add_subplot(gs[r, c])
            shown = img.copy()
            if c > 0:
                m = patch_mask(keep[c - 1], cfg).repeat(cfg.patch_size, 0).repeat(cfg.patch_size, 1)
                shown[~m] = 0.8 + 0.2 * shown[~m]  # pruned (frozen or removed): faded to light grey
            ax.imshow(np.clip(shown, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("input" if c == 0 else f"layer {c}\n{counts[c - 1] - 1} patches", fontsize=7)
            if c == 0:
                ax.set_ylabel(ds.classes[ds.targets[i]], fontsize=7)
    ax = fig.add_subplot(gs[len(idx), :])
    x = np.arange(1, L + 1)
    ax.bar(x, counts, color="C0", label=f"searched masks: {gf / 1e9:.3f} GFLOPs counted as {tokens} "
           f"({100 * (1 - gf / dense):.0f}% fewer)")
    ax.plot(x, pyramid, "k.--", label="linear pyramid, same FLOPs")
    ax.axhline(cfg.num_tokens, color="grey", lw=0.8, ls=":", label=f"dense: {cfg.num_tokens} tokens")
    for xi, n in zip(x, counts):
        ax.text(xi, n + 1, str(n), ha="center", fontsize=7)
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("updated tokens (incl. class)" if tokens == "frozen" else "kept tokens (incl. class)")
    ax.legend(fontsize=7, loc="upper right")
    grey = "grey: frozen (still keys/values)" if tokens == "frozen" else "grey: removed"
    fig.suptitle(f"Patches kept by each layer ({os.path.relpath(args.masks, ROOT)}, tokens {tokens}); {grey}",
                 fontsize=9)
    fig.savefig(args.out + ".png", dpi=120, bbox_inches="tight")
    write_json(args.out + ".json", {
        "tokens": tokens, "command": " ".join(["python bench/picture.py"] + sys.argv[1:]),
        "masks": os.path.relpath(args.masks, ROOT), "kept_per_layer": counts, "gflops": gf / 1e9,
        "linear_pyramid_same_flops": pyramid, "images": [os.path.relpath(ds.samples[i][0], args.data_path) for i in idx]})
    print(f"wrote {args.out}.png and {args.out}.json")


if __name__ == "__main__":
    run(main)
