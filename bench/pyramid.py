"""
The reference point of the slim.py issue (arXiv 2106.02852 reproduction): a plain linear pyramid of kept tokens,
the patches of each layer chosen top-down by a score (the paper's significance score by default), with no
fine-tuning at all, evaluated on val. Writes results/pyramid_<score>_<gflops>.json.

    python bench/pyramid.py --gflops-of results/cifar10-proxy/report.json     # same FLOPs as a search result
    python bench/pyramid.py --reduction 0.4 0.5                                # 40% and 50% fewer FLOPs
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import flops  # noqa: E402
import slim  # noqa: E402
import vit  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


def main():
    p = argparse.ArgumentParser("Linear-pyramid baseline without fine-tuning")
    p.add_argument("--weights", default=os.path.join(SHARED, "models", "deit_tiny_p4_cifar10.pth"))
    p.add_argument("--data-path", default=os.path.join(SHARED, "data", "cifar10"))
    p.add_argument("--gflops-of", default=None, help="a report.json: use its slimmed GFLOPs as the budget")
    p.add_argument("--reduction", type=float, nargs="*", default=[], help="FLOP reductions (0.5 = 50%% fewer)")
    p.add_argument("--score", default="significance", choices=list(slim.SCORES) + ["random"])
    p.add_argument("--score-images", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count()))
    model = vit.load_checkpoint(args.weights)
    cfg, dense = model.cfg, flops.count_flops(model.cfg)
    budgets = [dense * (1 - r) for r in args.reduction]
    if args.gflops_of:
        budgets.append(json.load(open(args.gflops_of))["slimmed_gflops"] * 1e9)
    ctx = slim.Ctx(model, torch.device("cpu"), 64)
    train = data.build_dataset(args.data_path, "train", cfg.img_size, train_transform=False)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    xs, _, _ = slim.cache_dense(ctx, data.loader(torch.utils.data.Subset(train, perm[:args.score_images]), 64), "cache")
    val = data.loader(data.build_dataset(args.data_path, "val", cfg.img_size), 250)
    dense_top1 = slim.evaluate(model, val, ctx.device)
    for b in budgets:
        counts = flops.linear_pyramid(cfg, b)
        keep = slim.masks_for_counts(ctx, xs, counts, args.score, args.seed)
        gf = flops.count_flops(cfg, keep) / 1e9
        res = {"command": "python " + " ".join(sys.argv), "score": args.score, "kept_per_layer": counts,
               "gflops": gf, "dense_gflops": dense / 1e9, "flops_reduction": 1 - gf * 1e9 / dense,
               "top1": slim.evaluate(model, val, ctx.device, keep), "dense_top1": dense_top1, "torch": torch.__version__}
        print(json.dumps(res), flush=True)
        os.makedirs("results", exist_ok=True)
        json.dump(res, open(f"results/pyramid_{args.score}_{gf:.3f}G.json", "w"), indent=1)


if __name__ == "__main__":
    main()
