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
DOCS = ["docs/dynamic.md", "README.md", "docs/results.md", "docs/speed.md", "docs/peers.md"]
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


def times(x):
    return f"{x:.2f}×"


def speed_runtimes(path=SPEED_RUNTIMES):
    """bench/speed.py's run of every runtime (eager, packed, torch.compile, onnxruntime): per model its batch-1 latency
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


def speed_profile(path=SPEED_RUNTIMES):
    """Where batch-1 time goes in each runtime (bench/speed.py's profile: onnxruntime's profiler, torch.profiler)."""
    res = load(path)
    cats = ["matmul", "attention", "gather", "write-back", "layer norm", "other"]
    rows = ["| runtime | model | profiled ms per call | " + " | ".join(cats) + " |", "|---|---|---|" + "---|" * len(cats)]
    for label, prof in res["profile_b1"].items():
        runtime, model = ("timm (eager)", "dense") if label == "timm dense" else label.split(" ", 1)
        rows.append(f"| {runtime} | {model} | {prof['total_ms']:.1f} | " + " | ".join(
            f"{prof['by_category'].get(c, 0.0):.2f}" for c in cats) + " |")
    return ("\n".join(rows) + f"\n\nBatch 1, milliseconds per call summed over the operators of each kind (self time; "
            "onnxruntime: its profiler's kernel time per node; the others: torch.profiler, whose own overhead is in "
            f"the total). Compiled graphs fuse norms and element-wise work into kernels counted as other. File: `{path}` "
            "(`profile_b1`, with each model's slowest operators).")


PEERS = "results/peers.json"
PEERS_SPEED = "results/peers_speed_deit_small_cpu_float32.json"
PEER_ROWS = ["patch slimming", "ToMe", "ToMe, schedule searched", "EViT", "linear pyramid",  # bench/peers_compare.py
             "patch slimming, removed"]
SELECTION = "results/peers_selection.json"  # bench/peers_select.py
SELECTED_ROWS = ["patch slimming", "ToMe", "EViT", "PPT", "PiToMe"]


def with_p(c):
    return f"{interval(c)}; p = {c['mcnemar_p']:.2g}"


def peers_nearest():
    """bench/peers_compare.py off the shelf: every method on the dense proxy weights at each budget, each peer at the
    setting nearest the budget in FLOPs (the settings its fine-tuned rows use), paired against patch slimming's row
    of the same budget on the same val images."""
    if not os.path.exists(os.path.join(ROOT, PEERS)):
        return f"*Not run yet: `{PEERS}` does not exist; `python bench/peers_compare.py` makes it.*"
    res = load(PEERS)
    depth = len(res["budgets"][next(iter(res["budgets"]))]["rows"]["patch slimming"]["tokens_per_layer"])
    rows = [f"| budget | method | setting | GFLOPs | tokens per layer 1..{depth} | top-1 off the shelf | patch slimming − "
            "this, points (95% paired bootstrap; McNemar p) |", "|---|---|---|---|---|---|---|",
            f"| | dense | | {res['dense_gflops']:.3f} | {kept([res['num_tokens']] * depth)} | {res['dense']['top1']:.2f} | |"]
    after_search = []
    for budget, b in res["budgets"].items():
        for name in PEER_ROWS:
            r = b["rows"].get(name)
            if r is None:
                continue
            if "unreachable" in r:
                rows.append(f"| {budget} | {name} | cannot reach this budget: {r['unreachable'].split(': ask')[0]} "
                            "| | | | |")
                continue
            setting = {"patch slimming": r.get("source", ""), "linear pyramid": "flops.linear_pyramid, patches by "
                       "Eq. 6"}.get(name, r.get("setting", ""))
            vs = with_p(r["ps_minus_this"]) if "ps_minus_this" in r else \
                f"(the reference) − dense: {with_p(r['ps_minus_dense'])}" if "ps_minus_dense" in r else "(the reference)"
            label = f"**{name}**" if name == "patch slimming" else name
            rows.append(f"| {budget} | {label} | {setting} | {r['gflops']:.4f} | {kept(r['tokens_per_layer'])} | "
                        f"{r['top1']:.2f} | {vs} |")
            if name == "patch slimming":
                after_search.append(f"{budget}: {r['top1_after_search']:.2f}")
    return ("\n".join(rows) + f"\n\nTokens per layer: the rows each block updates (patch slimming and the linear pyramid, "
            f"frozen patches, method.md P1) or the tokens each block's attention runs on (ToMe, EViT and patch slimming "
            f"with its patches removed, C1, which remove them). "
            f"Patch slimming's own top-1 after its search (Alg. 1 with its block fine-tuning), for context: "
            f"{'; '.join(after_search)}. {res['val_images']} val images. GFLOPs: {res['flops_note']}. "
            f"File: `{PEERS}` (predictions `results/peers_predictions.npz`); "
            f"command{'s' if len(res['commands']) > 1 else ''}: {', '.join(f'`{c}`' for c in res['commands'])}.")


def pct_of(g, target):
    return f"{100 * g / target:.1f}%"


def peers_selected():
    """bench/peers_select.py: at each budget, each method's setting selected on held-out training images, its val
    top-1 (val read once) and patch slimming − it on the same val images."""
    if not os.path.exists(os.path.join(ROOT, SELECTION)):
        return f"*Not run yet: `{SELECTION}` does not exist; `python bench/peers_select.py` makes it.*"
    res = load(SELECTION)
    rows = ["| budget | method | candidates | selected setting | GFLOPs (of the budget) | held-out top-1 (train) | "
            "val top-1 | patch slimming − this, val (95% paired bootstrap; McNemar p) |", "|---|---|---|---|---|---|---|---|",
            f"| | dense | | | {res['dense_gflops']:.3f} | {res['held_out']['dense_top1']:.2f} | {res['dense']['top1']:.2f} | |"]
    notes = []
    for budget, b in res["budgets"].items():
        for name in SELECTED_ROWS:
            m = b["methods"][name]
            c, v = m["candidates"][m["selected"]], m["val"]
            label = f"**{name}**" if name == "patch slimming" else name
            vs = with_p(v["ps_minus_this"]) if "ps_minus_this" in v else "(the reference)"
            rows.append(f"| {budget} | {label} | {len(m['candidates'])} | {v['setting']} | {v['gflops']:.4f} "
                        f"({pct_of(v['gflops'], b['target_gflops'])}) | {c['held_out_top1']:.2f} | {v['top1']:.2f} | {vs} |")
            if m["note"]:
                notes.append(f"{budget} {name}: {m['note']}")
    h = res["held_out"]
    pairs = "; ".join(f"{budget}: " + ", ".join(f"{k} {interval(c)}" for k, c in b["peer_pairs"].items())
                      for budget, b in res["budgets"].items() if "peer_pairs" in b)
    return ("\n".join(rows) + (f"\n\nThe peers against each other (row − column, points, 95% paired bootstrap on the "
                                f"same val images): {pairs}." if pairs else "") + f"\n\nSelection: {h['images']} training images (seed {h['seed']}, {h['transform']}; "
            f"never val), the highest top-1 of each method's candidates, each at or below the budget and within "
            f"{100 * res['tolerance']:g}% of it where its grid allows"
            + (f" ({'; '.join(notes)})" if notes else "") + f". Val: {res['val_images']} images, read once, for the "
            f"selected settings. GFLOPs: {res['flops_note']}. File: `{SELECTION}` (predictions "
            f"`results/peers_selection_predictions.npz`); command: `{res['command']}`; {res['machine']['cpu']}, "
            f"torch {res['machine']['torch']}.")


def peers_candidates():
    """bench/peers_select.py: every candidate tried, its FLOPs and its held-out top-1 (the selected in bold)."""
    if not os.path.exists(os.path.join(ROOT, SELECTION)):
        return f"*Not run yet: `python bench/peers_select.py` makes `{SELECTION}`.*"
    res = load(SELECTION)
    rows = ["| budget | method | setting | GFLOPs | of the budget | held-out top-1 |", "|---|---|---|---|---|---|"]
    for budget, b in res["budgets"].items():
        for name in SELECTED_ROWS:
            m = b["methods"][name]
            for i, c in enumerate(m["candidates"]):
                bold = "**" if i == m["selected"] else ""
                rows.append(f"| {budget} | {name} | {bold}{c['setting']}{bold} | {c['gflops']:.4f} | "
                            f"{pct_of(c['gflops'], b['target_gflops'])} | {bold}{c['held_out_top1']:.2f}{bold} |")
    return ("\n".join(rows) + f"\n\nThe selected candidate of each method in bold (the highest held-out top-1, "
            f"ties to the first listed). {res['held_out']['images']} held-out training images. File: `{SELECTION}`.")


def peers_compute():
    """bench/peers_select.py: each row's training compute: off the shelf, and the fine-tuned rows of
    results/peers.json (bench/peers_compare.py --finetune)."""
    if not os.path.exists(os.path.join(ROOT, SELECTION)):
        return f"*Not run yet: `python bench/peers_select.py` makes `{SELECTION}`.*"
    res = load(SELECTION)
    rows = ["| row | optimiser steps | images seen | what |", "|---|---|---|---|"]
    for budget, b in res["budgets"].items():
        ps = b["methods"]["patch slimming"]["training"]["search"]
        rows.append(f"| {budget}, off the shelf: ToMe, EViT, PPT, PiToMe | 0 | 0 | none: dense weights; "
                    f"{b['methods']['ToMe']['training']['selection_images']} held-out training images read to select "
                    "each one's setting |")
        rows.append(f"| {budget}, off the shelf: patch slimming | 0 (its masks' search: {ps['optimiser_steps']:,}) | "
                    f"0 ({ps['images_seen']:,}) | dense weights; in brackets, {ps['what']} |")
    old = res["finetuned_old_protocol"]
    ft = old["final_finetune"]
    for budget, b in old["budgets"].items():
        for name, r in b.items():
            search = r["search_before_the_finetune"]
            extra = [v for v in search.values() if isinstance(v, dict)]
            if extra:
                rows.append(f"| {budget}, fine-tuned: {name} | {ft['optimiser_steps']:,} + {extra[0]['optimiser_steps']:,} | "
                            f"{ft['images_seen']:,} + {extra[0]['images_seen']:,} | the final fine-tune ({ft['epochs']:g} "
                            f"epoch, batch {ft['batch_size']}, every block) after {extra[0]['what']}, per seed |")
            else:
                rows.append(f"| {budget}, fine-tuned: {name} | {ft['optimiser_steps']:,} | {ft['images_seen']:,} | the "
                            f"final fine-tune ({ft['epochs']:g} epoch, batch {ft['batch_size']}, every block) from the "
                            "dense weights, per seed |")
    return ("\n".join(rows) + f"\n\nA block fine-tune step trains one block on a batch of {ft['batch_size']}; a final "
            f"fine-tune step trains every block. {res['train_images']:,} training images. File: `{SELECTION}`.")


def peers_finetuned():
    """bench/peers_compare.py --finetune: the headline's final fine-tune for the rows of each budget where it ran."""
    if not os.path.exists(os.path.join(ROOT, PEERS)) or "finetune" not in load(PEERS):
        return ("*Not run yet: `python bench/peers_compare.py --finetune --seeds 0 1` adds it to "
                f"`{PEERS}` (8 to 16 minutes per row and seed on 2 cores).*")
    res = load(PEERS)
    ft = res["finetune"]
    seeds = [f"seed {s}" for s in ft["seeds"]]
    rows = ["| budget | method | GFLOPs | " + " | ".join(f"{s}: top-1 | {s}: patch slimming − this" for s in seeds) +
            " | seeds together: patch slimming − this |", "|---|---|---|" + "---|---|" * len(seeds) + "---|"]
    sources = set()
    for budget, b in res["budgets"].items():
        for name in PEER_ROWS:
            r = b["rows"].get(name, {})
            done = r.get("finetuned")
            if not done:
                continue
            cells = []
            for s in seeds:
                e = done.get(s)
                cells += [f"{e['top1']:.2f}" if e else "not run", with_p(e["ps_minus_this"]) if e and
                          "ps_minus_this" in e else ("(the reference)" if e else "")]
                if e and "source" in e:
                    sources.add(e["source"])
            pooled = interval(r["finetuned_pooled"]) if "finetuned_pooled" in r else ""
            label = f"**{name}**" if name == "patch slimming" else name
            rows.append(f"| {budget} | {label} | {r['gflops']:.4f} | " + " | ".join(cells) + f" | {pooled} |")
    headline = next(iter(res["budgets"]))
    return ("\n".join(rows) + f"\n\n{ft['epochs']:g} epoch{'s' if ft['epochs'] != 1 else ''} at lr {ft['lr']:g}, batch "
            f"{ft['batch_size']}, the light recipe with soft distillation from the dense model (pipeline/finetune.py), "
            f"the same as the headline's. The peers' settings are those nearest the budget in FLOPs (not selected on "
            f"held-out images). At {headline} patch slimming's row is the headline runs' own (its search "
            "with block fine-tuning, then this fine-tune); at another budget every row, patch slimming's too, is "
            f"fine-tuned from the dense weights. {res['val_images']} val images. File: `{PEERS}`"
            + (f"; rows read from other runs: {', '.join(f'`{s}`' for s in sorted(sources))}." if sources else "."))


def peers_speed(path=PEERS_SPEED):
    """bench/peers_speed.py: real speed of each method at the same GFLOPs, DeiT-S shapes."""
    if not os.path.exists(os.path.join(ROOT, path)):
        return "*Not run yet: `python bench/peers_speed.py` makes its results file (run it on a quiet machine).*"
    res = load(path)
    rows = [f"| method | setting | GFLOPs | images/s (batch {res['batch']}) | × dense | batch-1 latency | × dense "
            "(paired) |", "|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        rows.append(f"| {name} | {r['setting']} | {r['gflops']:.2f} | {r['images_per_s']:.1f} | "
                    f"{times(r['speedup_batch'])} | {r['latency_ms_b1']:.1f} ms | {times(r['speedup_b1'])} "
                    f"({times(r['speedup_b1_paired'])}) |")
    m = res["machine"]
    return ("\n".join(rows) + f"\n\n`{res['command']}` (`{path}`): {res['model']}, random weights, {res['dtype']}, "
            f"{m['threads']} threads on {m['cpu']} ({m['cores']} cores), torch {m['torch']}; {res['repeats']} rounds "
            "at the batch, 5 times as many at batch 1, interleaved; medians.")


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


def peers_summary():
    """The README's one table of the peers: at both budgets each method's setting selected on held-out training
    images and its val top-1 off the shelf with patch slimming − it (bench/peers_select.py); at the headline budget
    the fine-tuned rows of bench/peers_compare.py (settings nearest in FLOPs) and the speed of bench/peers_speed.py."""
    if not os.path.exists(os.path.join(ROOT, SELECTION)) or not os.path.exists(os.path.join(ROOT, PEERS)):
        return "*Not run yet: `python bench/peers_select.py` and `python bench/peers_compare.py --finetune` make it.*"
    res, old = load(SELECTION), load(PEERS)
    speed = load(PEERS_SPEED)["rows"] if os.path.exists(os.path.join(ROOT, PEERS_SPEED)) else {}
    budgets = list(res["budgets"])
    head = old["budgets"][budgets[0]]["rows"] if budgets[0] in old["budgets"] else {}
    rows = ["| method | " + " | ".join(f"{b}: top-1 off the shelf, selected (patch slimming − this)" for b in budgets)
            + f" | {budgets[0]}: top-1 fine-tuned, seed mean (patch slimming − this, seeds together) | speed-up at "
            "DeiT-S shapes, batch 32 / batch 1 |", "|---|" + "---|" * len(budgets) + "---|---|",
            f"| dense ({res['dense_gflops']:.3f} G) | " + " | ".join(f"{res['dense']['top1']:.2f}" for _ in budgets)
            + " | | 1× / 1× |"]
    for name in SELECTED_ROWS:
        cells = []
        for b in budgets:
            v = res["budgets"][b]["methods"][name]["val"]
            cells.append(f"{v['top1']:.2f}" + (f" ({interval(v['ps_minus_this'])})" if "ps_minus_this" in v else
                                                " (the reference)"))
        r = head.get("ToMe, schedule searched" if name == "ToMe" else name, {})
        tuned = [e["top1"] for e in r.get("finetuned", {}).values()]
        ft = (f"{sum(tuned) / len(tuned):.2f}" + (f" ({interval(r['finetuned_pooled'])})" if "finetuned_pooled" in r
                                                   else " (the reference)" if name == "patch slimming" else "")
              if tuned else "not run")
        sp = speed.get(name)
        label = f"**{name}**" if name == "patch slimming" else name
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {ft} | "
                    + (f"{times(sp['speedup_batch'])} / {times(sp['speedup_b1'])}" if sp else "not measured") + " |")
    return ("\n".join(rows) + f"\n\nOff the shelf: each method's free settings selected by top-1 on "
            f"{res['held_out']['images']} held-out training images at the budget, then val ({res['val_images']} images) "
            f"read once; 95% paired bootstrap intervals. Fine-tuned: the headline's one-epoch fine-tune on seeds "
            f"{', '.join(map(str, old['finetune']['seeds']))}, the peers at the settings nearest the budget in FLOPs "
            "(ToMe's schedule searched), patch slimming after its search's block fine-tunes (docs/peers.md counts "
            "each row's training). Speed: each method at about 2.6 of DeiT-S's 4.6 GFLOPs, PyTorch eager on this "
            f"CPU. Files: `{SELECTION}`, `{PEERS}`, `{PEERS_SPEED}`.")


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


BLOCKS = {"expected-line": expected_line, "headline": headline, "search-trace": search_trace, "alg1-vs-fast": alg1_vs_fast, "fig4": fig4, "table3": table3,
          "speed-runtimes": speed_runtimes, "speed-summary": speed_summary, "speed-profile": speed_profile,
          "peers": peers_selected, "peers-candidates": peers_candidates,
          "peers-compute": peers_compute, "peers-nearest": peers_nearest, "peers-finetuned": peers_finetuned, "peers-speed": peers_speed,
          "peers-summary": peers_summary, "dynamic": dynamic, "dynamic-summary": dynamic_summary}
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
