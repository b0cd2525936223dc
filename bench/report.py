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
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers_report import BLOCKS as PEER_BLOCKS  # noqa: E402
from stats import ROOT, compare, interval, kept, load, times, with_p  # noqa: E402

DOCS = ["docs/dynamic.md", "README.md", "docs/results.md", "docs/speed.md", "docs/peers.md"]
PAPER_BUDGET = {"flops_saved": 0.436, "top1_drop": 0.4}  # DeiT-S: 4.6 G -> 2.6 G, 79.8 -> 79.4 (Table 1)
PAPER_FIG4 = {0.005: (79.8, 21), 0.01: (79.7, 32), 0.02: (79.4, 44), 0.03: (78.9, 49), 0.04: (78.4, 53),
              0.05: (78.0, 54)}


def predictions(folder):
    with np.load(os.path.join(ROOT, folder, "predictions.npz")) as f:
        return {k: f[k] for k in f.files}


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
                    f"| {rep['searched_top1']:.2f} | {rep['slimmed_top1']:.2f} | "
                    f"{sum(lay['seconds'] for lay in rep['layers']) / 60:.1f} | "
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
    names = [n for n in os.listdir(os.path.join(ROOT, "results", "fig4")) if re.fullmatch(r"eps_[0-9.e-]+\.json", n)]
    points = [load(f"results/fig4/{n}") for n in names]
    dense = load("results/cifar10-proxy/report.json")["dense_top1"]
    rows = ["| ε | kept tokens per layer 1..12 | FLOPs saved | top-1 after the search | after the final fine-tune | "
            "dense − this (95% CI) | paper (DeiT-S): top-1 / saved |", "|---|---|---|---|---|---|---|"]
    for pt in sorted(points, key=lambda p: p["eps"]):
        paper = PAPER_FIG4.get(pt["eps"])
        rows.append(f"| {pt['eps']} | {kept(pt['kept_per_layer'])} | {100 * pt['flops_saved']:.1f}% | "
                    f"{pt['top1_searched']:.2f} | {pt['top1']:.2f} | {interval(pt['dense_minus_this'])} | "
                    + (f"{paper[0]} / {paper[1]}% |" if paper else "– |"))
    sweep = load("results/fig4.json")
    how = (f"Search `{sweep['settings']['search']}`, final fine-tune {sweep['final_epochs']:g} epoch at lr "
           f"{sweep['final_lr']:g} for every point. File: `results/fig4.json`")
    return ("\n".join(rows) + f"\n\nDense {dense:.2f}%. {how} (per point: `results/fig4/eps_<ε>.json`; "
            "predictions `results/fig4_predictions.npz`).")


def table3():
    """The learned pyramid against uniform and linear pruning at its FLOPs (bench/table3.py), two seeds."""
    res = load("results/table3_headline.json")
    rows = ["| row | seed | kept tokens per layer 1..12 | GFLOPs | top-1 before / after the final fine-tune | "
            "learned − this (95% CI) |", "|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        row, seed = name.rsplit(" seed ", 1)
        c = r.get("learned_minus_this")
        rows.append(f"| {row} | {seed} | {kept(r['kept_per_layer'])} | {r['gflops']:.3f} | "
                    f"{r['top1_before_final_ft']:.2f} / {r['top1']:.2f} | {interval(c) if c else ''} |")
    pooled = "; ".join(f"learned − {row}, both seeds together: {interval(c)}" for row, c in res["pooled"].items())
    return ("\n".join(rows) + f"\n\n{pooled}. Paper (DeiT-S, 2.6 G): learned 79.4 against uniform 77.2. "
            "File: `results/table3_headline.json` (predictions `results/table3_headline_predictions.npz`).")


SPEED_RUNTIMES = "results/speed_runtimes_deit_small_cpu_float32.json"  # bench/speed.py's every-runtime run


def speed_runtimes(path=SPEED_RUNTIMES):
    """bench/speed.py's run of every runtime (eager, torch.compile, onnxruntime): per model its batch-1 latency
    and largest-batch throughput; per semantics and runtime the speed-ups beside the FLOPs ratio; the
    absolute figure against timm's dense DeiT-S. The machine (CPU model name) and the runtimes' versions, from the file."""
    res = load(path)
    mach, versions, batches = res["machine"], res["versions"], sorted(res["batches"])
    head = (f"`{res['command']}` (`{path}`): {res['model']}, random weights, {res['dtype']}, {res['threads']} threads "
            f"on {mach['cpu']} ({mach['cores']} cores); " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    gflops = {"dense": res["dense_gflops"], **{f"slimmed {t}": s["gflops"] for t, s in res["semantics"].items()}}
    rows = ["| runtime | model | GFLOPs | " + " | ".join(
        f"batch {b}: ms per call" if b == 1 else f"batch {b}: images/s" for b in batches) + " |",
        "|---|---|---|" + "---|" * len(batches)]
    for label, by_batch in res["rows"].items():
        runtime, model = ("timm (eager)", "dense") if label == "timm dense" else label.split(" ", 1)
        cells = [f"{by_batch[f'batch {b}']['ms']:.1f}" if b == 1 else f"{by_batch[f'batch {b}']['images_per_s']:.1f}"
                 for b in batches]
        rows.append(f"| {runtime} | {model} | {gflops[model]:.2f} | " + " | ".join(cells) + " |")
    table2 = ["| semantics | FLOPs ratio | runtime | " + " | ".join(
        f"batch {b}: speed-up (paired) · of the FLOPs ratio" for b in reversed(batches)) + " |",
        "|---|---|---|" + "---|" * len(batches)]
    for tokens, sem in res["semantics"].items():
        for runtime, by_batch in sem["speedup"].items():
            cells = [f"{times(v['speedup'])} ({times(v['paired'])}) · {v['of_flops_ratio']:.2f}"
                     for v in (by_batch[f"batch {b}"] for b in reversed(batches))]
            table2.append(f"| {tokens} | {sem['flops_ratio']:.2f} | {runtime} | " + " | ".join(cells) + " |")
    out = [head, "", *rows, "", *table2, ""] + [
        f"- **{tokens}**: {sem['masks']}, kept tokens per layer {kept(sem['kept_per_layer'])}, {sem['gflops']:.2f} G."
        for tokens, sem in res["semantics"].items()]
    if res.get("absolute"):
        a = res["absolute"]
        out.append(f"- **Absolute**: the fastest slimmed DeiT-S, `{a['fastest_slimmed']}`, runs "
                   f"{a['images_per_s']:.1f} images/s at batch {a['batch']}: {times(a['over_timm'])} timm's dense "
                   f"DeiT-S in PyTorch eager ({a['timm_dense_eager_images_per_s']:.1f} images/s), in the same rounds.")
    p = res["paper_v100"]
    out.append(f"- The paper: {p['dense_img_s']} → {p['slimmed_img_s']} images/s on a V100 (batch not stated), "
               f"{times(p['speedup'])} for a FLOPs ratio of {p['flops_ratio']:.2f}.")
    for runtime, why in res["runtimes_not_timed"].items():
        out.append(f"- Not timed: {runtime} ({why}).")
    return "\n".join(out)


def speed_summary(path=SPEED_RUNTIMES):
    """The README's speed table: per semantics and runtime, the speed-up over dense at each batch beside the FLOPs
    ratio, with the machine and the versions (the full tables are speed_runtimes')."""
    res = load(path)
    batches = sorted(res["batches"], reverse=True)
    runtimes = list(next(iter(res["semantics"].values()))["speedup"])
    rows = ["| semantics (GFLOPs, FLOPs ratio) | batch | " + " | ".join(runtimes) + " |",
            "|---|---|" + "---|" * len(runtimes)]
    for tokens, sem in res["semantics"].items():
        for b in batches:
            rows.append(f"| {tokens} ({sem['gflops']:.2f} G, {sem['flops_ratio']:.2f}) | {b} | " + " | ".join(
                times(sem["speedup"][rt][f"batch {b}"]["speedup"]) for rt in runtimes) + " |")
    m = res["machine"]
    return ("\n".join(rows) + f"\n\nSlimmed over dense DeiT-S, random weights, {res['dtype']}, {m['cpu']} "
            f"({m['cores']} cores), " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + f". File: `{path}`.")


DYNAMIC = "results/dynamic.json"  # bench/dynamic.py


def dynamic():
    """bench/dynamic.py: DPS-ViT against PS-ViT after the same total fine-tuning, per seed, and at fewer FLOPs."""
    res = load(DYNAMIC)
    rows = ["| seed | model | kept tokens per layer 1..12 | GFLOPs (G included) | top-1 | DPS − PS+, points (95% paired "
            "bootstrap; McNemar p) | Spearman of ŝ against s / top-k recall, per layer (held images) |",
            "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        rows.append(f"| {r['seed']} | PS+ (static masks, fine-tuned again) | {kept(r['counts'])} | {r['ps_gflops']:.4f} | "
                    f"{r['ps_top1']:.2f} | (the reference) | |")
        for key, name in (("dps", "DPS, the static counts"), ("dps_fewer", "DPS, fewer tokens")):
            rho = "; ".join(f"layer {t}: {v[0]:.2f} / {v[1]:.2f}" for t, v in r[f"{key}_spearman_per_layer"].items())
            rows.append(f"| {r['seed']} | {name} | {kept(r[f'{key}_counts'])} | {r[f'{key}_gflops']:.4f} | "
                        f"{r[f'{key}_top1']:.2f} | {with_p(r[f'{key}_minus_ps'])} | {rho} |")
    over = [f"{name} − PS+ over {res[k]['seeds']} seed{'s' if res[k]['seeds'] > 1 else ''}: {interval(res[k])}"
            for k, name in (("dps_minus_ps_over_seeds", "DPS at the static counts"),
                            ("dps_fewer_minus_ps_over_seeds", "DPS at fewer tokens"))]
    sp = "; ".join(f"batch {b}: dynamic {v['dynamic_ms']:.1f} ms against static {v['static_ms']:.1f} ms "
                   f"({v['dynamic_over_static']:.2f}× the static time)" for b, v in res["speed"].items())
    m = res["machine"]
    return ("\n".join(rows) + "\n\n" + "; ".join(over) + f". {res['val_images']} val images. Speed (eager, "
            f"{m['threads']} threads on {m['cpu']}): {sp}. Paper (DeiT-S): PS 79.4% at 2.6 G, DPS 79.5% at 2.4 G. "
            f"File: `{DYNAMIC}` (predictions `results/dynamic_predictions.npz`, each run's folder under "
            f"`results/dynamic/`); command: `{res['command']}`.")


def dynamic_summary():
    """The README's statement of bench/dynamic.py: DPS − PS+ over the seeds, at the static counts and at fewer FLOPs."""
    res = load(DYNAMIC)
    runs = res["runs"]

    def mean(key):
        return sum(r[key] for r in runs) / len(runs)
    rows = ["| model | GFLOPs (G included) | top-1, mean of the seeds | DPS − PS+, seeds together (95% paired bootstrap) |",
            "|---|---|---|---|", f"| PS+ (static masks) | {mean('ps_gflops'):.4f} | {mean('ps_top1'):.2f} | (the reference) |"]
    for key, name in (("dps", "DPS, the static counts"), ("dps_fewer", "DPS, fewer tokens")):
        rows.append(f"| {name} | {mean(f'{key}_gflops'):.4f} | {mean(f'{key}_top1'):.2f} | "
                    f"{interval(res[f'{key}_minus_ps_over_seeds'])} |")
    return ("\n".join(rows) + f"\n\nSeeds {', '.join(str(r['seed']) for r in runs)}; {res['val_images']} val images. "
            f"File: `{DYNAMIC}`.")


BLOCKS = {"expected-line": expected_line, "headline": headline, "search-trace": search_trace,
          "alg1-vs-fast": alg1_vs_fast, "fig4": fig4, "table3": table3, "speed-runtimes": speed_runtimes,
          "speed-summary": speed_summary, "dynamic": dynamic,
          "dynamic-summary": dynamic_summary, **PEER_BLOCKS}
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
