"""
Paired statistics for "A beats B" on the same val images (arXiv 2106.02852 reproduction, README claims): per-image
correctness of two models, a paired bootstrap interval of the accuracy difference and McNemar's exact test.
Predictions are stored compactly by the bench scripts: results/<name>_predictions.npz, one uint8/int16 array of
predicted classes per model, plus "labels". At the end, the formatting bench/report.py's tables share.
"""
import json
import math
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mcnemar_p(correct_a, correct_b):
    """Two-sided exact McNemar p-value: images where exactly one of the two models is right."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
    n, k = n01 + n10, min(n01, n10)
    if n == 0:
        return 1.0
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


def compare_seeds(corrects_a, corrects_b, samples=10000, seed=0):
    """A against B over one or more seeds on the same images: the mean over seeds of the accuracy difference (points),
    with a 95% percentile bootstrap that resamples images jointly for every seed (a seed's runs share the val images,
    so the seeds are not independent samples). corrects_a, corrects_b: lists (one per seed) of per-image correctness."""
    a, b = np.asarray(corrects_a, dtype=np.float64), np.asarray(corrects_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.shape[1], size=(samples, a.shape[1]))
    diffs = 100 * (a[:, idx].mean(axis=(0, 2)) - b[:, idx].mean(axis=(0, 2)))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": round(100 * (a.mean() - b.mean()), 2), "ci95": [round(float(lo), 2), round(float(hi), 2)],
            "seeds": len(a)}


def compare(correct_a, correct_b):
    """One seed: the difference (points), its 95% paired bootstrap interval, McNemar p, images where they disagree."""
    c = compare_seeds([correct_a], [correct_b])
    disagree = int((np.asarray(correct_a, bool) != np.asarray(correct_b, bool)).sum())
    return {"diff": c["diff"], "ci95": c["ci95"], "mcnemar_p": round(mcnemar_p(correct_a, correct_b), 4),
            "disagree": disagree}


def describe(c):
    return f"{c['diff']:+.2f} points (95% paired bootstrap {c['ci95'][0]:+.2f} to {c['ci95'][1]:+.2f}; McNemar p = {c['mcnemar_p']:.3g})"


# ----------------------------------------------------------------------------- formatting for bench/report.py
def load(path):
    """A results file, its path relative to the repository."""
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def interval(c):
    return f"{c['diff']:+.2f} ({c['ci95'][0]:+.2f} to {c['ci95'][1]:+.2f})"


def with_p(c):
    return f"{interval(c)}; p = {c['mcnemar_p']:.2g}"


def kept(counts):
    return " ".join(map(str, counts))


def times(x):
    return f"{x:.2f}×"
