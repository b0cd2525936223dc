"""
The result tables of the README and docs/ (arXiv 2106.02852 reproduction), generated from the files in results/,
so that no number in them is typed by hand. Each table sits in a Markdown file between two markers,

    <!-- bench/report.py:NAME -->
    ...generated...
    <!-- /bench/report.py -->

and names the results files it was read from.

    python bench/report.py           # rewrite every block from results/
    python bench/report.py --check   # exit 1 if a block differs from what results/ holds (test_slim runs this)
"""
import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stats import compare  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/results.md"]
PAPER_BUDGET = {"flops_saved": 0.436, "top1_drop": 0.4}  # DeiT-S: 4.6 G -> 2.6 G, 79.8 -> 79.4 (Table 1)
PAPER_FIG4 = {0.005: (79.8, 21), 0.01: (79.7, 32), 0.02: (79.4, 44), 0.03: (78.9, 49), 0.04: (78.4, 53),
              0.05: (78.0, 54)}


def load(path):
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def predictions(folder):
    with np.load(os.path.join(ROOT, folder, "predictions.npz")) as f:
        return {k: f[k] for k in f.files}


def interval(c):
    return f"{c['diff']:+.2f} ({c['ci95'][0]:+.2f} to {c['ci95'][1]:+.2f})"


def kept(counts):
    return " ".join(map(str, counts))


def search_minutes(report):
    return sum(lay["seconds"] for lay in report["layers"]) / 60


def headline():
    """The README's first command on two seeds: dense against slimmed, paired on the same val images."""
    runs = ["results/cifar10-proxy", "results/cifar10-proxy-seed1"]
    reports = [load(f"{r}/report.json") for r in runs]
    dense = reports[0]
    rows = ["| model | seed | top-1 after the search | top-1 after the final fine-tune | GFLOPs (paper counting) | "
            "FLOPs saved | dense − this, points (95% paired bootstrap) | kept tokens per layer 1..12 |",
            "|---|---|---|---|---|---|---|---|",
            f"| dense | | | {dense['dense_top1']:.2f} | {dense['dense_gflops']:.3f} | | | "
            f"{kept([dense['kept_per_layer'][0]] * len(dense['kept_per_layer']))} |"]
    met = []
    for run, rep in zip(runs, reports):
        p = predictions(run)
        c = compare(p["dense"] == p["labels"], p["slimmed"] == p["labels"])
        seed = rep["settings"]["seed"]
        rows.append(f"| **slimmed** (`{run}/`) | {seed} | {rep['searched_top1']:.2f} | **{rep['slimmed_top1']:.2f}** | "
                    f"{rep['slimmed_gflops']:.3f} | "
                    f"**{100 * rep['flops_reduction']:.1f}%** | {interval(c)} | {kept(rep['kept_per_layer'])} |")
        met.append(rep["flops_reduction"] >= PAPER_BUDGET["flops_saved"]
                   and rep["dense_top1"] - rep["slimmed_top1"] <= PAPER_BUDGET["top1_drop"])
    settings = reports[0]["settings"]
    verdict = ("meets the paper's DeiT-S budget (≥ 43.6% fewer FLOPs at ≤ 0.4 points lower top-1) on both seeds"
               if all(met) else f"meets the paper's DeiT-S budget on {sum(met)} of {len(met)} seeds")
    return ("\n".join(rows) + f"\n\nSearch `{settings['search']}` (Alg. 1 as written) at ε = {settings['eps']}, then a "
            f"{reports[0]['final_finetune']['epochs']:g}-epoch final fine-tune. The run {verdict}. Files: "
            f"`{runs[0]}/report.json`, `{runs[1]}/report.json` and their `predictions.npz`.")


def expected_line():
    """The last line the README's first command prints (results/cifar10-proxy/log.txt)."""
    with open(os.path.join(ROOT, "results/cifar10-proxy/log.txt")) as f:
        last = [line.rstrip("\n") for line in f if line.startswith("slimmed:")][-1]
    return "```\n" + last + "\n```"


def search_trace():
    """Per layer of the seed-0 headline search: candidates tried, the kept count, E before and after fine-tuning."""
    rep = load("results/cifar10-proxy/report.json")
    rows = ["| layer t | candidates r tried | kept | E0 → E of the kept r (relative, ε's scale) | E of the kept r, absolute "
            "(Eq. 3) | first r tried: E0 → E | seconds |", "|---|---|---|---|---|---|---|"]
    for lay in rep["layers"]:
        last, first = lay["trials"][-1], lay["trials"][0]
        rows.append(f"| {lay['layer']} | {len(lay['trials'])} | {lay['kept']} | {last['E0']:.4g} → {last['E']:.4g} | "
                    f"{last['E_abs']:.4g} | r = {first['r']}: {first['E0']:.4g} → {first['E']:.4g} | {lay['seconds']:.0f} |")
    return "\n".join(rows) + f"\n\nε = {rep['settings']['eps']}. File: `results/cifar10-proxy/report.json` (`layers[].trials`)."


def alg1_vs_fast():
    """Alg. 1 as written against the fast path at the headline's eps and seed, same final fine-tune."""
    runs = {"alg1": "results/cifar10-proxy", "fast": "results/cifar10-proxy-fast"}
    reports = {k: load(f"{v}/report.json") for k, v in runs.items()}
    rows = ["| search | kept tokens per layer 1..12 | FLOPs saved | top-1 after the search | after the final fine-tune "
            "| search time (min) | whole run (min) |", "|---|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        rows.append(f"| `{name}` (`{runs[name]}/`) | {kept(rep['kept_per_layer'])} | {100 * rep['flops_reduction']:.1f}% "
                    f"| {rep['searched_top1']:.2f} | {rep['slimmed_top1']:.2f} | {search_minutes(rep):.1f} | "
                    f"{rep['wall_seconds'] / 60:.1f} |")
    pa, pf = predictions(runs["alg1"]), predictions(runs["fast"])
    c = compare(pa["slimmed"] == pa["labels"], pf["slimmed"] == pf["labels"])
    eps = reports["alg1"]["settings"]["eps"]
    return ("\n".join(rows) + f"\n\nε = {eps}, seed {reports['alg1']['settings']['seed']}. Alg. 1 minus the fast path "
            f"after the final fine-tune: {interval(c)} points (95% paired bootstrap, McNemar p = {c['mcnemar_p']:.3g}), "
            f"at {100 * (reports['alg1']['flops_reduction'] - reports['fast']['flops_reduction']):+.1f} points of FLOPs "
            "saved. Search time is the sum of the layers' times in `report.json`; the runs shared the 2 cores with "
            "other jobs, so the times are upper bounds.")


def fig4():
    """The eps sweep (bench/eps_sweep.py) beside the paper's Fig. 4 values: every finished point of results/fig4/."""
    folder = os.path.join(ROOT, "results", "fig4")
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"eps_[0-9.e-]+\.json", n)) if os.path.isdir(folder) else []
    if not names:
        return "*Not run yet: `results/fig4/` holds no point; `python bench/eps_sweep.py` makes them.*"
    points = [load(f"results/fig4/{n}") for n in names]
    dense = load("results/cifar10-proxy/report.json")["dense_top1"]
    rows = ["| ε | kept tokens per layer 1..12 | FLOPs saved | top-1 after the search | after the final fine-tune | "
            "dense − this (95% CI) | paper (DeiT-S): top-1 / saved |", "|---|---|---|---|---|---|---|"]
    for pt in sorted(points, key=lambda p: p["eps"]):
        paper = PAPER_FIG4.get(pt["eps"])
        rows.append(f"| {pt['eps']} | {kept(pt['kept_per_layer'])} | {100 * pt['flops_saved']:.1f}% | "
                    f"{pt['top1_searched']:.2f} | {pt['top1']:.2f} | {interval(pt['dense_minus_this'])} | "
                    + (f"{paper[0]} / {paper[1]}% |" if paper else "– |"))
    if os.path.exists(os.path.join(ROOT, "results", "fig4.json")):
        sweep = load("results/fig4.json")
        how = (f"Search `{sweep['settings']['search']}`, final fine-tune {sweep['final_epochs']:g} epoch at lr "
               f"{sweep['final_lr']:g} for every point. File: `results/fig4.json`")
    else:
        how = "The sweep is not finished: only the points above exist. Files"
    return ("\n".join(rows) + f"\n\nDense {dense:.2f}%. {how} (per point: `results/fig4/eps_<ε>.json`; "
            "predictions `results/fig4_predictions.npz`).")


def table3():
    """The learned pyramid against uniform and linear pruning at its FLOPs (bench/table3.py), two seeds."""
    if not os.path.exists(os.path.join(ROOT, "results", "table3_headline.json")):
        return "*Not run yet: `results/table3_headline.json` does not exist; `python bench/table3.py` makes it.*"
    res = load("results/table3_headline.json")
    rows = ["| row | seed | kept tokens per layer 1..12 | GFLOPs | top-1 before / after the final fine-tune | "
            "learned − this (95% CI) |", "|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        row, seed = name.rsplit(" seed ", 1)
        c = r.get("learned_minus_this")
        rows.append(f"| {row} | {seed} | {kept(r['kept_per_layer'])} | {r['gflops']:.3f} | "
                    f"{r['top1_before_final_ft']:.2f} / {r['top1']:.2f} | {interval(c) if c else ''} |")
    pooled = "; ".join(f"learned − {row}, both seeds together: {interval(c)}" for row, c in res.get("pooled", {}).items())
    if not pooled:
        pooled = "Not every row has run on both seeds yet, so there is no pooled interval"
    return ("\n".join(rows) + f"\n\n{pooled}. Paper (DeiT-S, 2.6 G): learned 79.4 against uniform 77.2. "
            "File: `results/table3_headline.json` (predictions `results/table3_headline_predictions.npz`).")


def fast_path_era():
    """The runs made when the fast path was the default (results/fast-path/), ε = 0.003."""
    runs = [("former headline, seed 0", "cifar10-proxy"), ("former headline, seed 1", "cifar10-proxy-seed1"),
            ("Alg. 1 as written (then --literal), seed 0", "literal-eps0.003")]
    runs += [(f"pyramid attempt `{name}`", f"pyramid-attempts/{name}")
             for name in sorted(os.listdir(os.path.join(ROOT, "results/fast-path/pyramid-attempts")))]
    rows = ["| run (`results/fast-path/…`) | kept tokens per layer 1..12 | FLOPs saved | top-1 after the search | after "
            "the final fine-tune | largest step, layers 1..11 |", "|---|---|---|---|---|---|"]
    for label, folder in runs:
        rep = load(f"results/fast-path/{folder}/report.json")
        k = rep["kept_per_layer"]
        step = max(1 - b / a for a, b in zip(k[:-1], k[1:-1] + [k[-1]]))
        searched = rep["searched_top1"] if rep["searched_top1"] is not None else rep["slimmed_top1"]
        after = f"{rep['slimmed_top1']:.2f}" if rep["final_finetune"]["epochs"] > 0 else "–"
        rows.append(f"| {label} (`{folder}/`) | {kept(k)} | {100 * rep['flops_reduction']:.1f}% | {searched:.2f} | "
                    f"{after} | {100 * step:.0f}% |")
    return "\n".join(rows)


BLOCKS = {"expected-line": expected_line, "headline": headline, "search-trace": search_trace, "alg1-vs-fast": alg1_vs_fast, "fig4": fig4, "table3": table3, "fast-path-era": fast_path_era}
PATTERN = re.compile(r"(<!-- bench/report.py:([\w-]+) -->\n)(.*?)(<!-- /bench/report.py -->)", re.S)


def render(text):
    return PATTERN.sub(lambda m: m.group(1) + BLOCKS[m.group(2)]() + "\n" + m.group(4), text)


def main():
    p = argparse.ArgumentParser("Regenerate the result tables of the README and docs/ from results/")
    p.add_argument("--check", action="store_true", help="only check that every block is what results/ holds")
    args = p.parse_args()
    stale = []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        with open(path) as f:
            text = f.read()
        new = render(text)
        if new != text:
            stale.append(doc)
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    if args.check and stale:
        sys.exit(f"error: the tables in {', '.join(stale)} differ from results/: run python bench/report.py")
    print(("stale: " if args.check else "rewrote: ") + ", ".join(stale) if stale else "every table is up to date")


if __name__ == "__main__":
    main()
