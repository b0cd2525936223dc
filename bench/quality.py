"""
Score quality (METHOD.md §4): how well each patch score ranks the true impact of dropping a patch, per layer.
For layer t, the layers above keep the given masks (default: the proxy run's), layers 1..t are dense, and
every candidate patch (alive after layer t+1's mask is forced in) is dropped alone at layer t; its true impact
is the mean change ||f - f_full|| of the final class feature over held training images. Each score is
averaged over other training images, as the search uses it, and rank-correlated (Spearman) with that truth.
Pretrained weights, no fine-tuning, so the numbers describe the scores, not the search's weights. Every score of
slim.SCORES is measured: Eq. 6 exactly ("significance", P3/C3a), v1's "head-mean", "attn", "class-attn", "random".
Tokens (METHOD.md P1 / C1): by default the masks' own semantics (vit.load_masks), under which the truth, the scores
and the masks above are all run; --tokens overrides them. The committed results were made with the v1 variant
("removed", the proxy run's masks' own).

    python bench/quality.py                                   # proxy masks, 512 score + 128 held images
    python bench/quality.py --tokens frozen                   # the same masks run under the paper's semantics
Writes results/score_quality.json and prints a table.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import slim  # noqa: E402
from pipeline.caches import cache_dense  # noqa: E402
import vit  # noqa: E402
from common import write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


def main():
    p = argparse.ArgumentParser("Rank correlation of patch scores with the true impact, per layer")
    p.add_argument("--weights", default=os.path.join(SHARED, "models", "deit_tiny_p4_cifar10.pth"))
    p.add_argument("--data-path", default=os.path.join(SHARED, "data", "cifar10"))
    p.add_argument("--masks", default=os.path.join(ROOT, "results", "cifar10-proxy-v1", "masks.json"))
    p.add_argument("--score-images", type=int, default=512)
    p.add_argument("--held-images", type=int, default=128)
    p.add_argument("--tokens", default=None, choices=list(vit.TOKENS),
                   help="token semantics to run under (default: the masks' own; the committed results: removed, v1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "score_quality.json"))
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count()))
    model = vit.load_checkpoint(args.weights)
    cfg, N, L = model.cfg, model.cfg.num_tokens, model.cfg.depth
    keep, masks_tokens = vit.load_masks(args.masks, cfg)
    tokens, note = vit.resolve_tokens(masks_tokens, args.tokens, args.masks)
    if note:
        print(note)
    train = data.build_dataset(args.data_path, "train", cfg.img_size, train_transform=False)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_s, n_h = args.score_images, args.held_images

    def cache(idx, desc):
        return cache_dense(model, data.loader(torch.utils.data.Subset(train, idx), args.batch_size), desc).z

    xs_score, xs_held = cache(perm[:n_s], "cache score"), cache(perm[n_s:n_s + n_h], "cache held")
    rows = []
    for t in range(L - 1, 0, -1):
        full = [torch.arange(N)] * t + keep[t:]                  # layers 1..t dense, t+1..L as in the masks
        cand = slim.ranked_candidates(torch.zeros(N), keep[t])  # every patch layer t may drop
        if len(cand) < 3:
            continue
        truth = slim.true_impact(model, xs_held[t - 1], full, tokens, t, cand, args.batch_size)
        row = {"layer": t, "candidates": len(cand)}
        for name in slim.SCORES:  # "random" too: continuous draws, no ties, so its Spearman is defined (near 0)
            s = slim.layer_scores(model, xs_score[t - 1], full, tokens, t, name, args.batch_size, args.seed)
            row[name] = round(slim.spearman(s[cand], truth), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"tokens": tokens, "command": " ".join(["python bench/quality.py"] + sys.argv[1:]),
           "masks": os.path.relpath(args.masks, ROOT), "masks_tokens": masks_tokens, "score_images": n_s,
           "held_images": n_h, "layers": rows, "machine": slim.machine(),
           "mean": {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in slim.SCORES}}
    print(f"{'layer':>5} {'candidates':>10} " + " ".join(f"{k:>13}" for k in slim.SCORES))
    for r in rows:
        print(f"{r['layer']:>5} {r['candidates']:>10} " + " ".join(f"{r[k]:>13.3f}" for k in slim.SCORES))
    print(f"{'mean':>5} {'':>10} " + " ".join(f"{res['mean'][k]:>13.3f}" for k in slim.SCORES))
    write_json(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except vit.UserError as e:
        sys.exit(f"error: {e}")
