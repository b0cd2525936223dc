"""
Evaluation for slim.py (patch slimming, arXiv 2106.02852): top-1 and per-image predictions, sharded over the
processes of a torchrun launch with every val image counted exactly once, and the compact predictions file the
paired comparisons of bench/stats.py read.
"""
import os
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import Subset

import data
from pipeline import distributed
from pipeline.resume import write_atomically


def autocast(device):
    """bfloat16 autocast on CUDA, float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def predict(model, ds, keep=None, tokens="frozen", batch_size=250, workers=2, desc="eval"):
    """Predicted classes and labels of every readable image of dataset ds, (M,) each, in ds order, with masks keep
    under `tokens` (an unusable file: an error, or skipped and counted, as ds's registry says: data.bad_files). Under
    torchrun rank r predicts images r, r+K, ... and all ranks get the gathered result."""
    model.eval()
    device = next(model.parameters()).device
    positions = distributed.shard(len(ds))
    loader = data.loader(PositionTagged(Subset(ds, positions), positions), batch_size, workers=workers)
    preds, labels, where = [], [], []
    for img, (y, pos) in distributed.progress(loader, desc=desc):
        with autocast(device):
            preds.append(model(img.to(device), keep=keep, tokens=tokens).argmax(-1).cpu())
        labels.append(y)
        where.append(pos)
    mine = [torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for v in (preds, labels, where)]
    gathered = distributed.all_gather(mine)
    preds, labels, where = (torch.cat([g[i] for g in gathered]) for i in range(3))
    order = where.argsort()
    return preds[order], labels[order]


class PositionTagged(torch.utils.data.Dataset):
    """Items (image, (label, position in the full dataset)), so that sharded predictions go back in order."""

    def __init__(self, dataset, positions):
        self.dataset, self.positions = dataset, positions

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return item if isinstance(item, data.BadFile) else (item[0], (item[1], self.positions[i]))


def accuracy(preds, labels):
    """Top-1 (%) of predicted classes against labels (tensors of the same shape), to 4 decimals (a count of 1 in
    10^6 images): what results files hold, without float noise such as 61.36000000000001."""
    return round(100.0 * (preds == labels).double().mean().item(), 4)


def evaluate(model, ds, keep=None, tokens="frozen", batch_size=250, workers=2, desc="eval"):
    """Top-1 (%) of model with masks keep (under token semantics `tokens`) on dataset ds."""
    return accuracy(*predict(model, ds, keep, tokens, batch_size, workers, desc=desc))


def save_predictions(path, **preds):
    """Add per-image predictions (name -> (M,) tensor; "labels" among them) to a compact .npz, keeping what is there:
    what paired comparisons between models read (bench/stats.py)."""
    arrays = dict(np.load(path)) if os.path.exists(path) else {}
    arrays.update({k: v.numpy().astype(np.int16) for k, v in preds.items()})
    write_atomically(path, arrays)
