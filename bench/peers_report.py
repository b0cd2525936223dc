"""
The tables of docs/peers.md and the README's summary of the token reducers beside patch slimming (arXiv 2106.02852
reproduction), generated from results/ by bench/report.py (the blocks named peers*): the selection on held-out
training images and its val numbers (bench/peers_select.py), every candidate, each row's training, the fine-tuned
rows (bench/peers_select.py --finetune), the settings nearest in FLOPs (bench/peers_compare.py) and the speed
(bench/peers_speed.py).
"""
import collections
import os

from stats import ROOT, interval, kept, load, times, with_p

PEERS = "results/peers.json"  # bench/peers_compare.py
PEERS_SPEED = "results/peers_speed_deit_small_cpu_float32.json"  # bench/peers_speed.py
PEER_ROWS = ["patch slimming", "ToMe", "ToMe, schedule searched", "EViT", "linear pyramid", "patch slimming, removed"]
SELECTION = "results/peers_selection.json"  # bench/peers_select.py
METHODS = ["patch slimming", "ToMe", "EViT", "PPT", "PiToMe"]


def missing(path, command):
    if not os.path.exists(os.path.join(ROOT, path)):
        return f"*Not run yet: `{command}` makes `{path}`.*"
    return None


def bold(name):
    return f"**{name}**" if name == "patch slimming" else name


def pct_of(g, target):
    return f"{100 * g / target:.1f}%"


def peers_selected():
    """At each budget, each method's setting selected on held-out training images, its val top-1 (val read once) and
    patch slimming − it on the same val images."""
    if missing(SELECTION, "python bench/peers_select.py"):
        return missing(SELECTION, "python bench/peers_select.py")
    res = load(SELECTION)
    rows = ["| budget | method | candidates | selected setting | GFLOPs (of the budget) | held-out top-1 (train) | "
            "val top-1 | patch slimming − this, val (95% paired bootstrap; McNemar p) |", "|---|---|---|---|---|---|---|---|",
            f"| | dense | | | {res['dense_gflops']:.3f} | {res['held_out']['dense_top1']:.2f} | {res['dense']['top1']:.2f} | |"]
    notes = []
    for budget, b in res["budgets"].items():
        for name in METHODS:
            m = b["methods"][name]
            c, v = m["candidates"][m["selected"]], m["val"]
            vs = with_p(v["ps_minus_this"]) if "ps_minus_this" in v else "(the reference)"
            rows.append(f"| {budget} | {bold(name)} | {len(m['candidates'])} | {v['setting']} | {v['gflops']:.4f} "
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
    """Every candidate tried, its FLOPs and its held-out top-1 (the selected in bold)."""
    if missing(SELECTION, "python bench/peers_select.py"):
        return missing(SELECTION, "python bench/peers_select.py")
    res = load(SELECTION)
    rows = ["| budget | method | setting | GFLOPs | of the budget | held-out top-1 |", "|---|---|---|---|---|---|"]
    for budget, b in res["budgets"].items():
        for name in METHODS:
            m = b["methods"][name]
            for i, c in enumerate(m["candidates"]):
                mark = "**" if i == m["selected"] else ""
                rows.append(f"| {budget} | {name} | {mark}{c['setting']}{mark} | {c['gflops']:.4f} | "
                            f"{pct_of(c['gflops'], b['target_gflops'])} | {mark}{c['held_out_top1']:.2f}{mark} |")
    return ("\n".join(rows) + f"\n\nThe selected candidate of each method in bold (the highest held-out top-1, "
            f"ties to the first listed). {res['held_out']['images']} held-out training images. File: `{SELECTION}`.")


def peers_compute():
    """Each row's training compute: off the shelf, fine-tuned (every method from the dense weights) and patch
    slimming's own runs (its search's block fine-tunes, then the same fine-tune)."""
    if missing(SELECTION, "python bench/peers_select.py"):
        return missing(SELECTION, "python bench/peers_select.py")
    res = load(SELECTION)
    rows = ["| row | optimiser steps | images seen | what |", "|---|---|---|---|"]
    ft = res.get("finetune")
    for budget, b in res["budgets"].items():
        ps = b["methods"]["patch slimming"]["training"]["search"]
        rows.append(f"| {budget}, off the shelf: ToMe, EViT, PPT, PiToMe | 0 | 0 | none: dense weights; "
                    f"{b['methods']['ToMe']['training']['selection_images']} held-out training images read to select "
                    "each one's setting |")
        rows.append(f"| {budget}, off the shelf: patch slimming | 0 (its masks' search: {ps['optimiser_steps']:,}) | "
                    f"0 ({ps['images_seen']:,}) | dense weights; in brackets, {ps['what']} |")
        if ft:
            rows.append(f"| {budget}, fine-tuned: every method, patch slimming's masks included | "
                        f"{ft['optimiser_steps']:,} | {ft['images_seen']:,} | the final fine-tune ({ft['epochs']:g} "
                        f"epoch, batch {ft['batch_size']}, every block) from the dense weights, per seed |")
        for seed, own in b.get("ps_own_runs", {}).items():
            t = own["training"]
            rows.append(f"| {budget}, patch slimming's own run, {seed} | {ft['optimiser_steps']:,} + "
                        f"{t['optimiser_steps']:,} | {ft['images_seen']:,} + {t['images_seen']:,} | the same final "
                        f"fine-tune, from the weights of {t['what']} (`{own['source']}`) |")
    return ("\n".join(rows) + "\n\nA block fine-tune step trains one block on a batch of 64; a final fine-tune step "
            f"trains every block. {res['train_images']:,} training images. File: `{SELECTION}`.")


def peers_finetuned():
    """Every method's selected setting after the same final fine-tune from the dense weights, per seed, paired against
    patch slimming's masks after the same fine-tune; at the headline budget also patch slimming's own runs minus each
    row (those had its search's block fine-tunes first: more training)."""
    command = "python bench/peers_select.py --finetune --seeds 0 1"
    if missing(SELECTION, command) or "finetune" not in load(SELECTION):
        return f"*Not run yet: `{command}` adds the fine-tuned rows to `{SELECTION}`.*"
    res = load(SELECTION)
    ft = res["finetune"]
    seeds = [f"seed {s}" for s in ft["seeds"]]
    rows = ["| budget | method | GFLOPs | " + " | ".join(f"{s}: top-1 | {s}: patch slimming − this" for s in seeds) +
            " | seeds together: patch slimming − this | seeds together: patch slimming's own runs − this |",
            "|---|---|---|" + "---|---|" * len(seeds) + "---|---|"]
    for budget, b in res["budgets"].items():
        own = b.get("ps_own_runs")
        if own:
            rows.append(f"| {budget} | patch slimming's own runs | {b['methods']['patch slimming']['val']['gflops']:.4f}"
                        " | " + " | ".join(f"{own[s]['top1']:.2f} | " if s in own else "not run | " for s in seeds)
                        + " | | (the reference) |")
        for name in METHODS:
            m = b["methods"][name]
            done = m.get("finetuned", {})
            cells = []
            for s in seeds:
                e = done.get(s)
                cells += [f"{e['top1']:.2f}" if e else "not run", with_p(e["ps_minus_this"]) if e and
                          "ps_minus_this" in e else ("(the reference)" if e and name == "patch slimming" else "")]
            together = [interval(m[k]) if k in m else "" for k in ("finetuned_seeds_together",
                                                                    "finetuned_seeds_together_own_runs")]
            if not together[1]:  # fewer seeds than asked so far: each seed's own
                together[1] = "; ".join(f"{s}: {interval(e['ps_own_run_minus_this'])}" for s, e in done.items()
                                        if "ps_own_run_minus_this" in e)
            if name == "patch slimming" and not together[0]:
                together[0] = "(the reference)"
            rows.append(f"| {budget} | {bold(name)} | {m['val']['gflops']:.4f} | " + " | ".join(cells) + " | "
                        + " | ".join(together) + " |")
    cpus = collections.Counter(f"{e['machine']['cpu']} ({e['machine']['cores']} cores)" for b in res["budgets"].values()
                               for m in b["methods"].values() for e in m.get("finetuned", {}).values())
    machines = ", ".join(f"{cpu}: {n} rows" for cpu, n in cpus.most_common())
    return ("\n".join(rows) + f"\n\nEvery row: its selected setting (the table above), {ft['epochs']:g} epoch at lr "
            f"{ft['lr']:g}, batch {ft['batch_size']}, the light recipe with soft distillation from the dense model "
            f"(pipeline/finetune.py, the headline's), started from the dense weights: {ft['optimiser_steps']:,} steps "
            "each. Patch slimming's own runs are the headline's (`results/cifar10-proxy*/`): the same fine-tune after "
            f"its search's block fine-tunes, more training (counted above). {res['val_images']} val images; 95% paired "
            "bootstrap, McNemar p; seeds together resamples the images jointly over both seeds. File: "
            f"`{SELECTION}` (each row's seconds and machine; predictions `results/peers_selection_predictions.npz`); "
            f"command: `{command}`; run on {machines}.")


def peers_nearest():
    """bench/peers_compare.py: every method on the dense proxy weights at each budget, each peer at the setting
    nearest the budget in FLOPs, paired against patch slimming's row of the same budget on the same val images."""
    if missing(PEERS, "python bench/peers_compare.py"):
        return missing(PEERS, "python bench/peers_compare.py")
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
            rows.append(f"| {budget} | {bold(name)} | {setting} | {r['gflops']:.4f} | {kept(r['tokens_per_layer'])} | "
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


def peers_speed(path=PEERS_SPEED):
    """bench/peers_speed.py: real speed of each method at the same GFLOPs, DeiT-S shapes."""
    if missing(path, "python bench/peers_speed.py"):
        return missing(path, "python bench/peers_speed.py")
    res = load(path)
    rows = [f"| runtime | method | setting | GFLOPs | images/s (batch {res['batch']}) | × dense | batch-1 latency | "
            "× dense (paired) |", "|---|---|---|---|---|---|---|---|"]
    for rt, by_name in res["runtimes"].items():
        for name, r in by_name.items():
            rows.append(f"| {rt} | {name} | {r['setting']} | {r['gflops']:.2f} | {r['images_per_s']:.1f} | "
                        f"{times(r['speedup_batch'])} | {r['latency_ms_b1']:.1f} ms | {times(r['speedup_b1'])} "
                        f"({times(r['speedup_b1_paired'])}) |")
    m = res["machine"]
    return ("\n".join(rows) + f"\n\n`{res['command']}` (`{path}`): {res['model']}, random weights, {res['dtype']}, "
            f"{m['threads']} threads on {m['cpu']} ({m['cores']} cores), torch {m['torch']}; {res['repeats']} rounds "
            "at the batch, 5 times as many at batch 1, every model of every runtime interleaved; medians; each "
            "runtime's ratios to its own dense model.")


def peers_summary():
    """The README's one table of the peers: at each budget each method's selected setting off the shelf and, where
    run, after the same fine-tune (seed mean, patch slimming − it over the seeds), and the speed at DeiT-S shapes."""
    if missing(SELECTION, "python bench/peers_select.py"):
        return missing(SELECTION, "python bench/peers_select.py")
    res = load(SELECTION)
    speed = load(PEERS_SPEED)["runtimes"] if os.path.exists(os.path.join(ROOT, PEERS_SPEED)) else {}
    budgets = list(res["budgets"])
    rows = ["| method | " + " | ".join(f"{b}: off the shelf (patch slimming − this) | {b}: fine-tuned, seed mean "
                                       "(patch slimming − this, seeds together)" for b in budgets)
            + "".join(f" | speed-up at DeiT-S shapes, {rt}, batch 32 / batch 1" for rt in speed) + " |",
            "|---|" + "---|---|" * len(budgets) + "---|" * len(speed),
            f"| dense ({res['dense_gflops']:.3f} G) | " + " | ".join(f"{res['dense']['top1']:.2f} | " for _ in budgets)
            + " | 1× / 1×" * len(speed) + " |"]
    for name in METHODS:
        cells = []
        for b in budgets:
            m = res["budgets"][b]["methods"][name]
            v = m["val"]
            cells.append(f"{v['top1']:.2f}" + (f" ({interval(v['ps_minus_this'])})" if "ps_minus_this" in v else
                                                " (the reference)"))
            done = m.get("finetuned", {})
            tuned = [e["top1"] for e in done.values()]
            if "finetuned_seeds_together" in m:
                vs = f" ({interval(m['finetuned_seeds_together'])})"
            elif len(done) == 1 and "ps_minus_this" in next(iter(done.values())):
                vs = f" ({interval(next(iter(done.values()))['ps_minus_this'])}; {next(iter(done))} only)"
            elif name == "patch slimming" and done:  # its seeds named while some peer has fewer
                partial = any(sorted(res["budgets"][b]["methods"][o].get("finetuned", {})) != sorted(done)
                              for o in METHODS)
                vs = f" (the reference; {' and '.join(sorted(done))})" if partial else " (the reference)"
            else:
                vs = ""
            cells.append(f"{sum(tuned) / len(tuned):.2f}{vs}" if tuned else "not run yet")
        cells += [f"{times(by_name[name]['speedup_batch'])} / {times(by_name[name]['speedup_b1'])}"
                  for by_name in speed.values()]
        rows.append(f"| {bold(name)} | " + " | ".join(cells) + " |")
    seeds = ", ".join(sorted({k for b in res["budgets"].values() for m in b["methods"].values()
                              for k in m.get("finetuned", {})}))  # the seeds run so far
    return ("\n".join(rows) + f"\n\nOff the shelf: each method's free settings selected by top-1 on "
            f"{res['held_out']['images']} held-out training images at the budget, then val ({res['val_images']} images) "
            f"read once; 95% paired bootstrap intervals. Fine-tuned: that setting after the headline's one-epoch "
            f"fine-tune from the dense weights, every method alike{f' ({seeds})' if seeds else ''}. Speed: each "
            f"method at about 2.6 of DeiT-S's 4.6 GFLOPs on this CPU, in PyTorch eager and under torch.compile, each "
            f"runtime's ratios to its own dense model. Files: `{SELECTION}`, "
            f"`{PEERS_SPEED}`.")


BLOCKS = {"peers": peers_selected, "peers-candidates": peers_candidates, "peers-compute": peers_compute,
          "peers-finetuned": peers_finetuned, "peers-nearest": peers_nearest, "peers-speed": peers_speed,
          "peers-summary": peers_summary}
