"""
The paper's Table 3 on the CIFAR-10 proxy (arXiv 2106.02852; docs/results.md): the pyramid Algorithm 1 learned
against uniform pruning (the same count at every layer 1..L-1) and a linear pyramid at the same FLOPs (P1 counting),
their patches chosen by Eq. 6 top-down (common.masks_for_counts) without block fine-tuning, then the learned run's own
final fine-tune. --reference: slim.py folders, one per seed of the learned pyramid (the first sets the budget).

    python bench/table3.py --reference results/cifar10-proxy results/cifar10-proxy-seed1 --seeds 0 1 \
        --out results/table3_headline
Writes OUT.json (paired intervals against the learned pyramid per seed and over the seeds) and OUT_predictions.npz;
a rerun skips the rows already in OUT.json.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from common import ROOT, light_finetune, machine, masks_for_counts, read_json, run, write_json
import data
import flops
from pipeline.caches import cache_dense
from pipeline.evaluate import accuracy, predict, save_predictions
import vit
from stats import compare, compare_seeds, describe
ROWS, SCORE_IMAGES = ("uniform", "linear"), 512  # bench/peers_compare.py reuses the linear rows at 512 score images


def uniform_counts(cfg, target, tokens):
    """The same kept count n at layers 1..L-1 (and m_L = the prefix tokens) whose FLOPs come closest to target."""
    P = cfg.prefix_tokens
    return min(([n] * (cfg.depth - 1) + [P] for n in range(P, cfg.num_tokens + 1)),
               key=lambda c: abs(flops.count_flops(cfg, counts=c, tokens=tokens) - target))


def main():
    p = argparse.ArgumentParser("Table 3: learned pyramid vs uniform and linear pruning at the same FLOPs")
    p.add_argument("--reference", nargs="+", default=[os.path.join(ROOT, "results", "cifar10-proxy")])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "table3"))
    args = p.parse_args()
    refs = [read_json(os.path.join(r, "report.json")) for r in args.reference]
    ra, tokens, target = refs[0]["args"], refs[0]["tokens"], refs[0]["slimmed_gflops"] * 1e9
    cfg = vit.load_checkpoint(ra["weights"]).cfg
    counts = {"uniform": uniform_counts(cfg, target, tokens), "linear": flops.linear_pyramid(cfg, target, tokens)}
    val = data.build_dataset(ra["data_path"], "val", cfg.img_size)
    train_aug = data.build_dataset(ra["data_path"], "train", cfg.img_size)
    train_eval = data.build_dataset(ra["data_path"], "train", cfg.img_size, train_transform=False)
    res = read_json(args.out + ".json") if os.path.exists(args.out + ".json") else {"rows": {}}
    res.update(command=" ".join(["python bench/table3.py"] + sys.argv[1:]), tokens=tokens, target_gflops=target / 1e9,
               final_epochs=ra["final_epochs"], final_lr=ra["final_lr"], machine=machine())
    for r, ref in zip(args.reference, refs):  # the learned pyramid: from its own run
        res["rows"][f"learned seed {ref['args']['seed']}"] = {
            "folder": os.path.relpath(r, ROOT), "kept_per_layer": ref["kept_per_layer"], "gflops": ref["slimmed_gflops"],
            "top1": ref["slimmed_top1"], "top1_before_final_ft": ref["searched_top1"]}
    preds_path = args.out + "_predictions.npz"
    for row in ROWS:
        for seed in args.seeds:
            name = f"{row} seed {seed}"
            if name in res["rows"]:
                continue
            t0 = time.time()
            model = vit.load_checkpoint(ra["weights"])
            perm = torch.randperm(len(train_eval), generator=torch.Generator().manual_seed(seed)).tolist()
            score_images = torch.utils.data.Subset(train_eval, perm[:SCORE_IMAGES])
            score_cache = cache_dense(model, data.loader(score_images, 64), "cache score images")
            keep = masks_for_counts(model, score_cache.z, counts[row], tokens, "significance", seed)
            before, labels = predict(model, val, keep, tokens, workers=ra["workers"], desc=f"eval {name}")
            light_finetune(model, vit.load_checkpoint(ra["weights"]), keep, tokens, train_aug, ra["final_epochs"],
                           ra["final_lr"], ra["batch_size"], seed, print, ra["workers"])
            after, _ = predict(model, val, keep, tokens, workers=ra["workers"], desc=f"eval {name} fine-tuned")
            save_predictions(preds_path, labels=labels, **{name.replace(" ", "_"): after})
            entry = {"kept_per_layer": counts[row], "gflops": flops.count_flops(cfg, keep, tokens=tokens) / 1e9,
                     "top1_before_final_ft": accuracy(before, labels),
                     "top1": accuracy(after, labels), "seconds": round(time.time() - t0)}
            learned = [r for r, ref in zip(args.reference, refs) if ref["args"]["seed"] == seed]
            if learned:  # paired against the learned pyramid of the same seed, on the same val images
                lp = np.load(os.path.join(learned[0], "predictions.npz"))
                entry["learned_minus_this"] = compare(lp["slimmed"] == lp["labels"], after.numpy() == labels.numpy())
                print(f"{name}: learned minus this {describe(entry['learned_minus_this'])}", flush=True)
            res["rows"][name] = entry
            write_json(args.out + ".json", res)
            print(name, json.dumps(entry), flush=True)
    if len(refs) > 1:  # every seed together: learned minus each row, images resampled jointly
        preds = np.load(preds_path)
        learned = [np.load(os.path.join(r, "predictions.npz")) for r in args.reference]
        seeds = [ref["args"]["seed"] for ref in refs]
        for row in ROWS:
            if all(f"{row}_seed_{seed}" in preds for seed in seeds):
                res.setdefault("pooled", {})[row] = compare_seeds(
                    [lp["slimmed"] == lp["labels"] for lp in learned],
                    [preds[f"{row}_seed_{seed}"] == preds["labels"] for seed in seeds])
                print(f"{row}, seeds {seeds} together: learned minus this {res['pooled'][row]}", flush=True)
    write_json(args.out + ".json", res)
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    run(main)
