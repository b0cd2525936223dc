"""
The reference point of the slim.py issue (arXiv 2106.02852 reproduction): a plain linear pyramid of kept tokens,
the patches of each layer chosen top-down by a score, with no fine-tuning at all, evaluated on val. With
--final-epochs, the same end-to-end distillation fine-tune slim.py gives a searched network (pipeline/finetune.py,
same loader, seed and learning rate) follows, so the pyramid can be compared with the headline run at equal FLOPs
and equal final training.

--tokens (METHOD.md P1 / C1) is the token semantics everywhere: the FLOP count the pyramid is fitted to, the scores,
evaluation and the final fine-tune. It defaults to "removed": the committed results were made with the v1 variant,
and --score then defaults to "head-mean", the score v1 called "significance"; with --tokens frozen it defaults to
"significance" (Eq. 6 exactly, P3). Writes <out-dir>/pyramid_significance_<gflops>[_ft<epochs>].json for those v1
defaults (the committed file names), <out-dir>/pyramid_<score>_<tokens>_<gflops>[_ft<epochs>].json otherwise.

    python bench/pyramid.py --gflops-of results/cifar10-proxy-v1/report.json     # same FLOPs as a search result
    python bench/pyramid.py --reduction 0.4 0.5                                # 40% and 50% fewer FLOPs
    python bench/pyramid.py --gflops-of results/cifar10-proxy-v1/report.json --final-epochs 2 --final-lr 3e-4
    python bench/pyramid.py --reduction 0.5 --tokens frozen                    # the paper's semantics and score
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import flops  # noqa: E402
import slim  # noqa: E402
from pipeline.caches import cache_dense  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.finetune import RECIPES, light_finetune  # noqa: E402
from common import add_semantics_args, read_json, score_of, write_json  # noqa: E402
import vit  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


def main():
    p = argparse.ArgumentParser("Linear-pyramid baseline without fine-tuning")
    p.add_argument("--weights", default=os.path.join(SHARED, "models", "deit_tiny_p4_cifar10.pth"))
    p.add_argument("--data-path", default=os.path.join(SHARED, "data", "cifar10"))
    p.add_argument("--gflops-of", default=None, help="a report.json: use its slimmed GFLOPs as the budget")
    p.add_argument("--reduction", type=float, nargs="*", default=[], help="FLOP reductions (0.5 = 50%% fewer)")
    add_semantics_args(p, "patch score", slim.SCORES)
    p.add_argument("--score-images", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--final-epochs", type=float, default=0, help="end-to-end fine-tune after (as slim.py's)")
    p.add_argument("--final-lr", type=float, default=RECIPES["light"].lr)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out-dir", default="results", help="folder the JSON files are written to")
    args = p.parse_args()
    tokens = args.tokens
    score = score_of(args)
    torch.set_num_threads(min(2, os.cpu_count()))
    torch.manual_seed(args.seed)
    model = vit.load_checkpoint(args.weights)
    cfg, dense = model.cfg, flops.count_flops(model.cfg)
    budgets = [dense * (1 - r) for r in args.reduction]
    if args.gflops_of:  # a FLOP budget: the pyramid's counts are fitted to it under --tokens' own count
        budgets.append(read_json(args.gflops_of)["slimmed_gflops"] * 1e9)
    train = data.build_dataset(args.data_path, "train", cfg.img_size, train_transform=False)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    subset = torch.utils.data.Subset(train, perm[:args.score_images])
    xs = cache_dense(model, data.loader(subset, args.batch_size), "cache").z
    val = data.build_dataset(args.data_path, "val", cfg.img_size)
    dense_top1 = evaluate(model, val)
    train_aug = data.build_dataset(args.data_path, "train", cfg.img_size) if args.final_epochs > 0 else None
    # the committed file names for the v1 defaults (v1 called head-mean "significance"); any other run is named in full
    label = "significance" if (score, tokens) == ("head-mean", "removed") else f"{score}_{tokens}"
    for b in budgets:
        counts = flops.linear_pyramid(cfg, b, tokens)
        keep = slim.masks_for_counts(model, xs, counts, tokens, score, args.seed, args.batch_size)
        gf = flops.count_flops(cfg, keep, tokens=tokens) / 1e9
        res = {"tokens": tokens, "command": "python " + " ".join(sys.argv), "score": score, "kept_per_layer": counts,
               "gflops": gf, "dense_gflops": dense / 1e9, "flops_reduction": 1 - gf * 1e9 / dense,
               "top1": evaluate(model, val, keep, tokens), "dense_top1": dense_top1, "torch": torch.__version__}
        name = os.path.join(args.out_dir, f"pyramid_{label}_{gf:.3f}G")
        if args.final_epochs > 0:  # as slim.main does after its search
            t0, student = time.time(), vit.load_checkpoint(args.weights)
            light_finetune(student, model, keep, tokens, train_aug, args.final_epochs, args.final_lr, args.batch_size,
                           args.seed, print, args.workers)
            res.update(top1_no_ft=res["top1"], top1=evaluate(student, val, keep, tokens),
                       final_epochs=args.final_epochs, final_lr=args.final_lr, ft_seconds=round(time.time() - t0))
            name += f"_ft{args.final_epochs:g}"
        print(json.dumps(res), flush=True)
        os.makedirs(args.out_dir, exist_ok=True)
        write_json(name + ".json", res)


if __name__ == "__main__":
    try:
        main()
    except vit.UserError as e:
        sys.exit(f"error: {e}")
