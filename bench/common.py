"""Helpers shared by the bench scripts of the patch-slimming reproduction (arXiv 2106.02852). Importing this puts the
project's modules on the path."""
import json
import os
import sys
import time
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # vit, slim, flops, data, pipeline

import slim  # noqa: E402
import vit  # noqa: E402
from pipeline import finetune  # noqa: E402
from pipeline.distributed import machine  # noqa: E402, F401 (the scripts record it)
from pipeline.resume import write_atomically as write_json  # noqa: E402, F401 (never half a results file)


def run(main):
    """A script's main(), a vit.UserError printed as one line, never as a traceback."""
    try:
        main()
    except vit.UserError as e:
        sys.exit(f"error: {e}")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def folder_log(folder):
    """A log(msg) that prints and appends to <folder>/log.txt (the folder is created)."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, "log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        f.write(msg + "\n")
        f.flush()
    return log


def pyplot():
    """matplotlib.pyplot (the file-only Agg backend), or None with a message when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-bench.txt): no plot written")
        return None
    return plt


def interleaved(fns, x, repeats, device=torch.device("cpu")):
    """Seconds per call of each fn(x) (a list per fn), timed round-robin (one call of each per round, so that the
    machine's drift hits every model alike), after 3 warm-up calls each."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for fn in fns.values():
        for _ in range(3):
            fn(x)
    sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def random_nested(counts, N, seed=0):
    """Nested masks with the given kept counts (token 0 always kept), patches chosen at random, scattered like real
    masks."""
    g, prev, keep = torch.Generator().manual_seed(seed), torch.arange(N), []
    for n in counts:
        prev = torch.cat([prev[:1], prev[1:][torch.randperm(len(prev) - 1, generator=g)[:n - 1]]]).sort().values
        keep.append(prev)
    return keep


@torch.no_grad()
def masks_for_counts(model, z, counts, tokens, score="significance", seed=0, batch_size=64):
    """Baseline masks with given kept-token counts |m_1|..|m_L|: top-down like Alg. 1 (each layer scored with the
    layers above already pruned), but each layer simply keeps its count of best-scoring patches, with no error
    test and no fine-tuning. score: a key of SCORES. z: the dense cache's Z_0 .. (z[t-1] enters block t)."""
    N, L = model.cfg.num_tokens, model.cfg.depth
    keep = [torch.arange(N)] * (L - 1) + [vit.prefix_mask(model.cfg)]
    for t in range(L - 1, 0, -1):
        forced = keep[t]
        scores = slim.layer_scores(model, z[t - 1], slim.with_layer(keep, t, torch.arange(N)), tokens, t, score,
                              batch_size, seed)
        cand = slim.ranked_candidates(scores, forced)
        keep[t - 1] = torch.cat([forced, cand[:max(0, counts[t - 1] - len(forced))]]).sort().values
    return keep


def light_finetune(student, teacher, keep, tokens, train_ds, epochs, lr, batch_size, seed, log, workers=2):
    """The "light" recipe with the given epochs, lr (at batch_size) and seed, without a checkpoint: the same final
    fine-tune the bench scripts give every network they compare."""
    s = replace(finetune.RECIPES["light"], epochs=epochs, lr=lr, lr_batch=batch_size, batch_size=batch_size, seed=seed)
    return finetune.finetune(student, teacher, keep, tokens, finetune.Schedule(train_ds, s, student.cfg, workers), log)
