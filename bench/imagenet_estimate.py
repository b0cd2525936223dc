"""
How long patch slimming (arXiv 2106.02852) takes on ImageNet with DeiT-S: each stage of slim.py timed on this
machine at full DeiT-S shapes (224 px, 197 tokens, random weights, synthetic images; timing does not depend on
either), per image or per step, then an ESTIMATE of the full run on 1 and 8 GPUs. Nothing here ran on ImageNet.

The stages, run through the code slim.py runs (so the estimate moves with it):
- cache: the dense Z_0 .. Z_L of the fit + held sample (pipeline/caches.cache_dense), per image;
- score: Eq. 6 for one layer (slim.layer_scores, averaged over layers 1..11), per image;
- error: E_{t+1} (slim.layer_error, two pruned blocks), per image;
- block fine-tune: one step of slim.finetune_block at the search's batch, per step;
- final fine-tune: one step of DeiT's recipe (pipeline/finetune.py: slimmed student forward + backward, dense
  teacher forward) at the Fig. 5 pyramid, per image;
- eval: the slimmed model's forward, per image.
The estimate counts, for the default settings (SearchSettings: Alg. 1 as written, the "deit" recipe): 5,120 cached
images; per layer the scores over 512 images and, for each candidate r tried, a block fine-tune of 100 steps between
two error passes over 1,024 held images (E before and after). The candidates tried per layer are the mean of the
proxy's headline runs (results/cifar10-proxy*/report.json; --trials-per-layer overrides it), and the worst case,
every r of the grid (0, 10, ..., 190, 196: 21 per layer), is given beside it; the final fine-tune's 30 epochs of 1,281,167
images; 50,000 val images evaluated three times (dense, searched, slimmed). A GPU is assumed to run every stage
as much faster than this CPU as it runs DeiT-S's dense forward: 940 img/s on a V100 (the paper's Table 1); 8 GPUs
are assumed to split every stage 8 ways at 90% efficiency, which is optimistic for the search (its block
fine-tunes see only batch 64 / 8 per GPU). Writes results/imagenet_estimate_<device>.json.

    python bench/imagenet_estimate.py               # about 4 minutes on 2 CPU cores
    python bench/imagenet_estimate.py --device cuda # measures a GPU for real (no conversion), bf16
"""
import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import slim  # noqa: E402
import vit  # noqa: E402
from pipeline import caches, finetune  # noqa: E402
from pipeline.evaluate import autocast  # noqa: E402
from speed import FIG5_PYRAMID  # noqa: E402
from common import write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
V100_DENSE_IMG_S = 940  # DeiT-S dense inference on a V100, the paper's Table 1 (METHOD.md §5)


def timed(fn, repeats):
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def scattered_masks(cfg, counts, seed=0):
    """Nested masks with the given counts, patches chosen at random (scattered like real masks); class token kept."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.tensor([0]), 1 + torch.randperm(cfg.num_tokens - 1, generator=g)])
    return [order[:n].sort().values for n in counts]


def proxy_trials_per_layer():
    """Candidates r tried per layer, the mean over the proxy's headline runs (3 where they are absent)."""
    counts = []
    for name in ("cifar10-proxy", "cifar10-proxy-seed1"):
        path = os.path.join(ROOT, "results", name, "report.json")
        if os.path.exists(path):
            with open(path) as f:
                counts += [len(lay["trials"]) for lay in json.load(f)["layers"]]
    return sum(counts) / len(counts) if counts else 3.0


def main():
    p = argparse.ArgumentParser("Per-stage time of slim.py at DeiT-S shapes, and the ImageNet estimate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=16, help="images per timed batch (cache, score, error, eval)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trials-per-layer", type=float, default=None, help="candidates r Alg. 1 tries per layer "
                   "(default: the mean of the proxy's headline runs)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = vit.deit("deit_small").to(device).eval()
    cfg, s, recipe = model.cfg, slim.SearchSettings(), finetune.RECIPES["deit"]
    L, N, B = cfg.depth, cfg.num_tokens, args.images
    img = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    loader = [(img, torch.zeros(B, dtype=torch.long))]
    per_image = {}

    cache = caches.cache_dense(model, loader, "cache", device)
    per_image["dense forward"] = timed(lambda: model(img.to(device)), args.repeats) / B
    per_image["cache"] = timed(lambda: caches.cache_dense(model, loader, "cache", device), args.repeats) / B
    keep = scattered_masks(cfg, FIG5_PYRAMID)
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
    per_step_block = timed(lambda: slim.finetune_block(model, t, fit, k, one_step, 0, "ft"), args.repeats)
    per_step_block *= s.batch_size / B  # at the search's batch (time grows linearly with the batch here)

    teacher = vit.deit("deit_small").to(device).eval()
    ds = torch.utils.data.TensorDataset(img.repeat(2, 1, 1, 1), torch.zeros(2 * B, dtype=torch.long))
    ft = replace(recipe, epochs=1.0, batch_size=B, lr_batch=B, randaugment=False, erase=0.0)
    per_image["final fine-tune"] = timed(lambda: finetune.finetune(model, teacher, keep, "frozen", ds, ft, None, {},
                                                                   lambda m: None, workers=0), 1) / (2 * B)

    def slimmed_forward():
        with torch.no_grad(), autocast(device):
            model(img.to(device), keep, "frozen")
    per_image["eval (slimmed)"] = timed(slimmed_forward, args.repeats) / B

    n_cache = s.fit_images + s.held_images
    trials = args.trials_per_layer or proxy_trials_per_layer()
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
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else slim.machine()["cpu"],
           "machine": slim.machine(), "per_image_seconds": per_image, "block_finetune_step_seconds": per_step_block,
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
    out = args.out or os.path.join(ROOT, "results", f"imagenet_estimate_{device.type}.json")
    write_json(out, res)
    for k, v in per_image.items():
        print(f"{k:28s} {1000 * v:9.1f} ms per image")
    print(f"{'block fine-tune step':28s} {per_step_block:9.2f} s per step of {s.batch_size} images")
    print(f"on this device: {here / 3600:.1f} h; ESTIMATE on 1 V100-class GPU: {sum(one_gpu.values()) / 3600:.1f} h, "
          f"on 8: {sum(eight.values()) / 3600:.1f} h (final fine-tune {one_gpu['final fine-tune (30 epochs)'] / 3600:.1f} h"
          f" / {eight['final fine-tune (30 epochs)'] / 3600:.1f} h); the search: {trials:.1f} candidates per layer, "
          f"{one_gpu['search (11 layers)'] / 3600:.2f} h on 1 GPU ({res['search_worst_case_1_gpu_hours']:.2f} h if "
          f"every r of the grid were tried); wrote {out}")


if __name__ == "__main__":
    main()
