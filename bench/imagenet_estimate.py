"""
How long patch slimming (arXiv 2106.02852) takes on ImageNet with DeiT-S (docs/imagenet.md): each stage of slim.py
timed at DeiT-S shapes (random weights and images) through the code slim.py runs, then an ESTIMATE of the full run
with the defaults (SearchSettings, the "deit" recipe), each stage assumed to speed up on a GPU as DeiT-S's dense
forward does (940 img/s on a V100, the paper's Table 1), 8 GPUs at 90% efficiency each.

    python bench/imagenet_estimate.py               # a few minutes on 2 CPU cores
    python bench/imagenet_estimate.py --device cuda # measures a GPU for real (no conversion)
Writes results/imagenet_estimate_<device>.json.
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

from common import ROOT, machine, random_nested, read_json, write_json
import slim
import vit
from pipeline import caches, finetune
from pipeline.evaluate import autocast
from speed import FIG5_PYRAMID
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
V100_DENSE_IMG_S = 940  # DeiT-S dense inference on a V100, the paper's Table 1 (method.md §5)


def timed(fn, repeats):
    """Median seconds of fn() over repeats, after one warm-up call."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def proxy_trials_per_layer():
    """Candidates r tried per layer, the mean over the proxy's headline runs."""
    counts = [len(lay["trials"]) for name in ("cifar10-proxy", "cifar10-proxy-seed1")
              for lay in read_json(os.path.join(ROOT, "results", name, "report.json"))["layers"]]
    return sum(counts) / len(counts)


def main():
    p = argparse.ArgumentParser("Per-stage time of slim.py at DeiT-S shapes, and the ImageNet estimate")
    p.add_argument("--device", default="cpu")
    device, repeats = torch.device(p.parse_args().device), 3
    torch.manual_seed(0)
    model = vit.deit("deit_small").to(device).eval()
    cfg, s, recipe = model.cfg, slim.SearchSettings(), finetune.RECIPES["deit"]
    L, N, B = cfg.depth, cfg.num_tokens, 16  # B: images per timed batch (cache, score, error, eval)
    img = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    loader = [(img, torch.zeros(B, dtype=torch.long))]
    per_image = {}

    cache = caches.cache_dense(model, loader, "cache", device)
    per_image["dense forward"] = timed(lambda: model(img.to(device)), repeats) / B
    per_image["cache"] = timed(lambda: caches.cache_dense(model, loader, "cache", device), repeats) / B
    keep = random_nested(FIG5_PYRAMID, N)
    score_s, error_s = [], []
    for t in range(1, L):  # layer t searched: layers 1..t dense, t+1..L under the Fig. 5 pyramid
        k = [torch.arange(N)] * t + keep[t:]
        score_s.append(timed(lambda: slim.layer_scores(model, cache.z[t - 1], k, "frozen", t, "significance", B),
                             1) / B)
        error_s.append(timed(lambda: slim.layer_error(model, slim.at_layer(cache, t), k, "frozen", "next", t, B),
                             1) / B)
    per_image["score (mean over layers)"] = sum(score_s) / len(score_s)
    per_image["error (mean over layers)"] = sum(error_s) / len(error_s)

    t = 6
    fit = slim.at_layer(cache, t)
    one_step = slim.SearchSettings(ft_steps=1, batch_size=B)
    k = [torch.arange(N)] * (t - 1) + keep[t - 1:]  # layer t pruned, the layers below dense
    per_step_block = timed(lambda: slim.finetune_block(model, t, fit, k, one_step, 0, "ft"), repeats)
    per_step_block *= s.batch_size / B  # at the search's batch (time grows linearly with the batch here)

    teacher = vit.deit("deit_small").to(device).eval()
    ds = torch.utils.data.TensorDataset(img.repeat(2, 1, 1, 1), torch.zeros(2 * B, dtype=torch.long))
    ft = replace(recipe, epochs=1.0, batch_size=B, lr_batch=B, randaugment=False, erase=0.0)
    plan = finetune.Schedule(ds, ft, model.cfg, workers=0)
    per_image["final fine-tune"] = timed(lambda: finetune.finetune(model, teacher, keep, "frozen", plan,
                                                                   lambda m: None), 1) / (2 * B)

    def slimmed_forward():
        with torch.no_grad(), autocast(device):
            model(img.to(device), keep, "frozen")
    per_image["eval (slimmed)"] = timed(slimmed_forward, repeats) / B

    n_cache = s.fit_images + s.held_images
    trials = proxy_trials_per_layer()
    worst = len(range(0, N - 1, slim.default_r_step(cfg))) + 1                  # every r of the grid

    def search_layer(n_trials):  # scores, then per candidate r: E before, a block fine-tune, E after
        return (s.score_images * per_image["score (mean over layers)"]
                + n_trials * (2 * s.held_images * per_image["error (mean over layers)"] + s.ft_steps * per_step_block))
    seconds = {
        "cache": n_cache * per_image["cache"],
        "search (11 layers)": (L - 1) * search_layer(trials),
        "final fine-tune (30 epochs)": recipe.epochs * IMAGENET_TRAIN * per_image["final fine-tune"],
        "eval (3 x 50k)": 3 * IMAGENET_VAL * per_image["eval (slimmed)"] * 1.4,  # dense/searched cost more
    }
    here = sum(seconds.values())
    gpu_speedup = 1.0 if device.type == "cuda" else V100_DENSE_IMG_S * per_image["dense forward"]
    one_gpu = {k: v / gpu_speedup for k, v in seconds.items()}
    eight = {k: v / (8 * 0.9) for k, v in one_gpu.items()}
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else machine()["cpu"],
           "machine": machine(), "per_image_seconds": per_image, "block_finetune_step_seconds": per_step_block,
           "this_device_hours": {k: v / 3600 for k, v in seconds.items()}, "this_device_total_hours": here / 3600,
           "estimate_note": "ESTIMATE, not measured: every stage assumed to speed up like DeiT-S dense inference "
                            f"({V100_DENSE_IMG_S} img/s on a V100, the paper's Table 1), 8 GPUs at 90% efficiency",
           "gpu_speedup_assumed": gpu_speedup, "search": s.search, "trials_per_layer": trials,
           "trials_per_layer_worst": worst,
           "search_worst_case_1_gpu_hours": (L - 1) * search_layer(worst) / gpu_speedup / 3600,
           "estimate_1_gpu_hours": {k: v / 3600 for k, v in one_gpu.items()},
           "estimate_1_gpu_total_hours": sum(one_gpu.values()) / 3600,
           "estimate_8_gpu_hours": {k: v / 3600 for k, v in eight.items()},
           "estimate_8_gpu_total_hours": sum(eight.values()) / 3600,
           "command": "python " + " ".join(sys.argv)}
    out = os.path.join(ROOT, "results", f"imagenet_estimate_{device.type}.json")
    write_json(out, res)
    print("\n".join(f"{k:28s} {1000 * v:9.1f} ms per image" for k, v in per_image.items()))
    print(f"block fine-tune step: {per_step_block:.2f} s per {s.batch_size} images; hours on this device "
          f"{res['this_device_hours']}; ESTIMATE on 1 GPU {res['estimate_1_gpu_hours']}, on 8 "
          f"{res['estimate_8_gpu_hours']} ({trials:.1f} candidates per layer); wrote {out}")


if __name__ == "__main__":
    main()
