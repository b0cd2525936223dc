"""Helpers shared by the bench scripts of the patch-slimming reproduction (arXiv 2106.02852): the repository's paths
(importing this puts the project's modules on the path), JSON files, a log to <folder>/log.txt, matplotlib when it
is installed (requirements-bench.txt), round-robin timing and random nested masks."""
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # vit, slim, flops, data, pipeline
PROXY = os.path.join(ROOT, "models", "deit_tiny_p4_cifar10.pth")  # the shipped CIFAR-10 proxy (models/README.md)
CIFAR10 = os.path.join(ROOT, "data", "cifar10")  # written once by python slim.py --data cifar10


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


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
    """matplotlib.pyplot with the file-only Agg backend, or None (with a message) when matplotlib is absent."""
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
