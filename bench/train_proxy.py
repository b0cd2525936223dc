"""
The recipe of the shipped CIFAR-10 proxy (models/README.md), written down as code: a DeiT of DeiT-Tiny width and
depth, patch 4, 32 px, trained from scratch on CIFAR-10's train/ with vit.py's model, and saved in the release format
the rest of the project loads ({"model": state_dict with timm names, "config": the geometry, ...}). It stands in for
the released ImageNet DeiT weights of the patch-slimming paper (arXiv 2106.02852) where those cannot be used.

    python bench/train_proxy.py --data-path data/cifar10 --out models/my_proxy.pth   # the recipe: 5 epochs

Recipe: AdamW lr 1e-3, weight decay 0.05, batch 128 (incomplete last batch dropped), 5 epochs, a linear warm-up over
the first half epoch then a cosine decay to 1e-5 (per step), label smoothing 0.1, a random 32-px crop of the 4-px
reflect-padded image and a horizontal flip (data.build_transform at 32 px), ImageNet mean/std. The shipped file took
6,734 s on 2 CPU threads and scores 61.36% on data/cifar10/val. A rerun is not promised to give the same bytes.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import vit  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402

PROXY = vit.ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=12, num_heads=3)
GEOMETRY = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes", "qkv_bias")


def learning_rate(step, total, warmup, peak, floor):
    """Linear warm-up from 0 over `warmup` steps, then a cosine from `peak` down to `floor` at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def train(args):
    torch.manual_seed(args.seed)
    model = vit.VisionTransformer(PROXY)
    train_set = data.build_dataset(args.data_path, "train", PROXY.img_size)  # crop of the padded image + flip
    val_set = data.build_dataset(args.data_path, "val", PROXY.img_size)
    loader = data.loader(train_set, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed, drop_last=True)
    if len(loader) == 0:
        sys.exit(f"error: {args.data_path}/train has fewer images than --batch-size {args.batch_size}")
    total = max(1, round(args.epochs * len(loader)))
    warmup = round(args.warmup_epochs * len(loader))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    log, step, t0 = [], 0, time.time()
    while step < total:
        model.train()
        for images, labels in loader:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, total, warmup, args.lr, args.min_lr)
            loss = F.cross_entropy(model(images), labels, label_smoothing=args.smoothing)
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
    recipe = (f"AdamW lr {args.lr:g} wd {args.weight_decay:g}, batch {args.batch_size}, {args.epochs:g} epochs, warmup "
              f"{args.warmup_epochs:g} epoch, cosine to {args.min_lr:g}, label smoothing {args.smoothing:g}, random "
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
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5, help="where the cosine ends")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data loading processes")
    args = p.parse_args()
    for name in ("epochs", "batch_size", "lr"):
        if not getattr(args, name) > 0 or not math.isfinite(getattr(args, name)):
            sys.exit(f"error: --{name.replace('_', '-')} must be a positive number (got {getattr(args, name)})")
    try:
        train(args)
    except vit.UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
