"""
The recipe of the shipped CIFAR-10 proxy (models/README.md) as code: a DeiT of DeiT-Tiny width and depth, patch 4,
32 px, trained from scratch on CIFAR-10's train/ with vit.py's model and saved in the release format the project loads
(a stand-in for the released ImageNet DeiT weights of arXiv 2106.02852). AdamW, batch 128 (the last incomplete batch
dropped), a linear warm-up over half an epoch then a cosine per step, label smoothing, the 32-px training transform
of data.py. A rerun is not promised to give the shipped file's bytes.

    python bench/train_proxy.py --data-path data/cifar10 --out models/my_proxy.pth   # the recipe: 5 epochs
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from common import run
import data
import vit
from pipeline import flags
from pipeline.evaluate import evaluate

PROXY = vit.ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=12, num_heads=3)
GEOMETRY = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes", "qkv_bias")
LR, MIN_LR, WEIGHT_DECAY, SMOOTHING, SEED = 1e-3, 1e-5, 0.05, 0.1, 0  # AdamW's peak, the cosine's end; label smoothing


def learning_rate(step, total, warmup, peak, floor):
    """Linear warm-up from 0 over `warmup` steps, then a cosine from `peak` down to `floor` at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def train(args):
    torch.manual_seed(SEED)
    model = vit.VisionTransformer(PROXY)
    train_set = data.build_dataset(args.data_path, "train", PROXY.img_size)  # crop of the padded image + flip
    val_set = data.build_dataset(args.data_path, "val", PROXY.img_size)
    loader = data.loader(train_set, args.batch_size, shuffle=True, workers=args.workers, seed=SEED, drop_last=True)
    if len(loader) == 0:
        sys.exit(f"error: {args.data_path}/train has fewer images than --batch-size {args.batch_size}")
    total = max(1, round(args.epochs * len(loader)))
    warmup = round(args.warmup_epochs * len(loader))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    log, step, t0 = [], 0, time.time()
    while step < total:
        model.train()
        for images, labels in loader:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, total, warmup, LR, MIN_LR)
            loss = F.cross_entropy(model(images), labels, label_smoothing=SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % len(loader) == 0 or step == total:  # after each epoch, and at the end
                top1 = evaluate(model, val_set, workers=args.workers, desc="val") / 100
                log.append({"step": step, "epoch": round(step / len(loader), 3), "val_top1": top1,
                            "seconds": round(time.time() - t0, 1)})
                print(f"step {step}/{total}: loss {loss.item():.3f}, val top-1 {100 * top1:.2f}%", flush=True)
            if step == total:
                break
    recipe = (f"AdamW lr {LR:g} wd {WEIGHT_DECAY:g}, batch {args.batch_size}, {args.epochs:g} epochs, warmup "
              f"{args.warmup_epochs:g} epoch, cosine to {MIN_LR:g}, label smoothing {SMOOTHING:g}, random "
              f"32px crop of 4px reflect-padded image + horizontal flip, ImageNet mean/std, "
              f"{torch.get_num_threads()} CPU threads")
    checkpoint = {"model": model.state_dict(), "config": {k: getattr(PROXY, k) for k in GEOMETRY},
                  "val_top1": log[-1]["val_top1"], "train_log": log, "recipe": recipe}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(checkpoint, args.out + ".tmp")  # a killed run leaves no half file
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}: val top-1 {100 * log[-1]['val_top1']:.2f}% after {step} steps")


def main():
    p = argparse.ArgumentParser(description="train the CIFAR-10 proxy DeiT (models/README.md) from scratch")
    p.add_argument("--data-path", default=data.CIFAR10_DIR, help="CIFAR-10 as DIR/{train,val}/<class>/ "
                   "(python slim.py --data cifar10 writes it)")
    p.add_argument("--out", required=True, help="the checkpoint to write (.pth)")
    p.add_argument("--epochs", type=flags.positive, default=5.0)
    p.add_argument("--batch-size", type=flags.count, default=128)
    p.add_argument("--warmup-epochs", type=flags.non_negative, default=0.5)
    p.add_argument("--workers", type=flags.non_negative_int, default=2, help="data loading processes")
    train(p.parse_args())


if __name__ == "__main__":
    run(main)
