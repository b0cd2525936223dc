"""
One protocol for every token reducer beside patch slimming (arXiv 2106.02852; method.md §8) on the CIFAR-10 proxy,
off the shelf: each method's free settings are chosen by top-1 at the budget on a held-out slice of the TRAINING
images, among a comparable number of candidates per method, each within TOLERANCE of the budget's FLOPs under its
own exact count; val is read once, for the selected settings' final numbers, paired against patch slimming's.

Candidates at a budget (the budget-matched parameter, r / keep rate / ratio, is not free: it is set by the FLOPs):
- patch slimming: its ε sets the budget, so at a fixed budget it has no free setting; its candidates are the masks
  searches produced at that budget (the headline's two seeds at 0.138 G; Fig. 4's counts with Eq. 6's patches from
  two draws of score images at 0.195 G), evaluated on the dense weights like every other row;
- ToMe: its r schedule (r and inflect -1..1 in steps of 0.05) x proportional attention on or off;
- EViT: its pruning locations (EVIT_LAYERS: any 2, 3 or 4 of layers 2..11), keep rate at the budget;
- PPT (bench/ppt.py): its reducing locations (PPT_LAYERS) x its variance threshold (PPT_THRESHOLDS, in units of
  1 / (patches)^2: 0 = always prune, inf = always pool), r and its schedule at the budget;
- PiToMe (bench/pitome.py): its margin (PITOME_MARGINS) x proportional attention on or off, keep ratio at the budget.
Of each grid, the settings within TOLERANCE below the budget are the candidates (one per distinct forward, at most
MOST, evenly thinned in grid order); where fewer than LEAST are (ToMe's integer r schedules at 0.195 G; PiToMe's
constant keep ratio, 1.5% under at best), the LEAST closest below it, and the results file says how far. The
selection (select) takes the highest held-out top-1 of the candidates, ties to the first listed.

    python bench/peers_select.py                          # both budgets: 59 min on 2 busy cores (AMD EPYC)
    python bench/peers_select.py --held-out-images 500    # a quick check
    python bench/peers_select.py --finetune --seeds 0 1   # then: each selected setting fine-tuned (12-20 min a row
                                                          #   and seed on 2 cores); a rerun resumes
With --finetune every method's selected setting, patch slimming's masks included, gets the headline's final
fine-tune from the dense weights (equal training), per seed; the rows are paired against patch slimming's and, at
the headline budget, against patch slimming's own runs (its search's block fine-tunes, then the same fine-tune).
Writes results/peers_selection.json (every candidate: setting, GFLOPs, held-out top-1; the selected; their val
top-1 with paired intervals against patch slimming; each row's training compute) and
results/peers_selection_predictions.npz (val predictions of the selected settings); docs/peers.md is rendered from
them by bench/report.py.
"""
import argparse
import itertools
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import flops  # noqa: E402
from pipeline.distributed import machine  # noqa: E402
from pipeline.evaluate import accuracy, predict, save_predictions  # noqa: E402
import vit  # noqa: E402
from vit import UserError  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402
import pitome  # noqa: E402
import ppt  # noqa: E402
from common import light_finetune, read_json, write_json  # noqa: E402
from peers_compare import eq6_masks  # noqa: E402
from stats import compare, compare_seeds  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["patch slimming", "ToMe", "EViT", "PPT", "PiToMe"]
TOLERANCE = 0.01  # a candidate's FLOPs must lie in [budget (1 - TOLERANCE), budget]
MOST = 12         # candidates per method at most (evenly thinned from its grid)
LEAST = 6         # candidates per method at least: where fewer lie within TOLERANCE, the closest below the budget
TOME_INFLECTS = [round(i / 20, 2) for i in range(-20, 21)]
EVIT_LAYERS = [ls for k in (2, 3, 4) for ls in itertools.combinations(range(2, 12), k)]  # layers 2..11
PPT_LAYERS = [(2, 5, 8), (2, 4, 6, 8, 10), (3, 5, 7, 9, 11)]  # the released (4, 7, 10) cannot reach 0.138 G here
PPT_THRESHOLDS = [0.0, 2.7, 8.0, math.inf]  # x 1 / (patches)^2; released DeiT-S: 7e-5 = 2.7 / 196^2
PITOME_MARGINS = [0.0, 0.25, 0.5, 0.75, 0.9]
FT_EPOCHS, FT_LR, FT_BATCH = 1, 3e-4, 64  # the headline's final fine-tune (results/cifar10-proxy/report.json)


class Masks:
    """Patch slimming's candidate: kept-index masks (vit.py's keep) run on the dense weights, frozen patches (P1)."""

    def __init__(self, keep, name, tokens="frozen", compute=None):
        self.keep, self.name, self.tokens, self.compute = keep, name, tokens, compute or {}

    def describe(self):
        return self.name


def gflops_of(cfg, cand):
    if isinstance(cand, Masks):
        return flops.count_flops(cfg, cand.keep, tokens=cand.tokens) / 1e9
    return peers.peer_flops(cfg, cand) / 1e9


def thin(items, most):
    """At most `most` of items, evenly spaced, first and last kept."""
    if len(items) <= most:
        return list(items)
    return [items[round(i * (len(items) - 1) / (most - 1))] for i in range(most)]


def grid(cfg, method, gflops):
    """(settings, grid points) of a peer at a budget: each grid point's settings at or below the budget (ToMe: every
    r of each inflect; the others: the budget-matched r / keep rate / ratio of each point)."""
    m = cfg.num_tokens - cfg.prefix_tokens
    if method == "ToMe":
        return [peers.ToMe(r=r, inflect=i, prop_attn=pa) for pa in (True, False) for i in TOME_INFLECTS
                for r in range(cfg.num_tokens)], 2 * len(TOME_INFLECTS)
    if method == "EViT":
        points = [lambda g, ls=ls: peers.at_gflops(cfg, "evit", g, layers=ls) for ls in EVIT_LAYERS]
    elif method == "PPT":
        points = [lambda g, ls=ls, c=c: ppt.at_gflops(cfg, g, layers=ls, threshold=c / m ** 2, inflect=None)
                  for ls in PPT_LAYERS for c in PPT_THRESHOLDS]
    elif method == "PiToMe":
        points = [lambda g, mg=mg, pa=pa: pitome.at_gflops(cfg, g, margin=mg, prop_attn=pa) for mg in PITOME_MARGINS
                  for pa in (False, True)]
    else:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS[1:])}")
    found = []
    for at in points:
        try:
            found.append(at(gflops))
        except UserError:  # this grid point cannot reach the budget
            pass
    return found, len(points)


def budget_candidates(cfg, method, gflops, tolerance=TOLERANCE, most=MOST, least=LEAST):
    """(candidates, note) of a peer at a budget: of its grid's settings at or below the budget, one per distinct
    forward (the same tokens per layer and other fields: ToMe schedules that truncate alike are one), those within
    tolerance of it, evenly thinned to `most`; where fewer than `least` are, the `least` closest below it, and the
    note says how far the farthest lies."""
    settings, points = grid(cfg, method, gflops)
    cost = {c: gflops_of(cfg, c) for c in settings}
    distinct = {}
    for c in settings:
        if cost[c] <= gflops:
            free = {k: 0 for k in ("r", "inflect", "rate", "ratio") if k in vars(c)}  # the budget-matched fields
            distinct.setdefault((tuple(peers.tokens_per_layer(cfg, c)), type(c)(**{**vars(c), **free})), c)
    below = list(distinct.values())
    reached = len({type(c)(**{**vars(c), **{k: 0 for k in ("rate", "ratio", "r", "inflect") if k in vars(c)}})
                   for c in settings})
    notes = [f"{points - reached} of {points} grid points cannot reach the budget"] if method != "ToMe" and \
        reached < points else []
    within = [c for c in below if cost[c] >= gflops * (1 - tolerance)]
    if len(within) < least:
        bar = sorted((cost[c] for c in below), reverse=True)[:least][-1]
        within = [c for c in below if cost[c] >= bar]  # ties at the bar all in
        notes.append(f"{len([c for c in below if cost[c] >= gflops * (1 - tolerance)])} distinct settings within "
                     f"{100 * tolerance:g}% of the budget: the {len(within)} closest below it, down to "
                     f"{100 * (1 - min(cost[c] for c in within) / gflops):.2f}% under it")
    return thin(within, most), "; ".join(notes)


def held_out_slice(data_path, cfg, images, seed):
    """`images` training images (eval transform), a seeded draw, as a TensorDataset: never val."""
    train = data.build_dataset(data_path, "train", cfg.img_size, train_transform=False, mean=cfg.mean, std=cfg.std)
    sub = data.subset(train, total=images, seed=seed)
    x, y = zip(*(sub[i] for i in range(len(sub))))
    return torch.utils.data.TensorDataset(torch.stack(x), torch.as_tensor(y))


def run_candidate(model, cand, ds, workers=0, desc="eval"):
    """Predicted classes and labels of cand (a peer setting or Masks) on the weights of model over ds."""
    if isinstance(cand, Masks):
        return predict(model, ds, cand.keep, cand.tokens, workers=workers, desc=desc)
    return predict(peers.PeerModel(model, cand), ds, workers=workers, desc=desc)


def score_candidates(model, cands, held, gflops, tolerance=TOLERANCE, log=print):
    """Each candidate's row: setting, GFLOPs, within tolerance, held-out top-1. Reads only `held`."""
    rows = []
    for c in cands:
        t0 = time.time()
        preds, labels = run_candidate(model, c, held, desc=f"held-out {c.describe()}")
        g = gflops_of(model.cfg, c)
        rows.append({"setting": c.describe(), "gflops": g, "within_tolerance": bool(gflops * (1 - tolerance) -
                     1e-12 <= g <= gflops + 1e-12), "held_out_top1": accuracy(preds, labels),
                     "seconds": round(time.time() - t0, 1)})
        log(f"  {c.describe()}: {g:.4f} G, held-out top-1 {rows[-1]['held_out_top1']:.2f}")
    return rows


def select(rows):
    """The index of the selected candidate: the highest held-out top-1, ties to the first listed. Reads nothing
    but the candidates' rows (their held-out top-1)."""
    return max(range(len(rows)), key=lambda i: (rows[i]["held_out_top1"], -i))


def ps_candidates(cfg, dense, train_eval, budget_source, score_images):
    """Patch slimming's candidates at a budget (see the docstring), with the training compute of their search."""
    out = []
    for src in budget_source:
        if "masks" in src:
            keep, _ = vit.load_masks(src["masks"], cfg)
        else:
            keep = eq6_masks(dense, train_eval, src["counts"], "frozen", src["score_seed"], score_images)
        out.append(Masks(keep, src["name"], compute=src["compute"]))
    return out


def search_compute(report, ft_steps, batch, what="Alg. 1's block fine-tunes of the search that chose these masks "
                   "(one block at a time; off the shelf, the weights evaluated are the dense ones)"):
    """The block fine-tunes of an Alg. 1 search (each tried r fine-tunes block t for ft_steps steps): steps, images."""
    steps = sum(len(lay["trials"]) for lay in report["layers"]) * ft_steps
    return {"optimiser_steps": steps, "images_seen": steps * batch, "what": what}


def budgets(ref_dirs):
    """{name: (GFLOPs, [patch slimming's candidate sources])}: the headline's and Fig. 4's eps 0.001."""
    out = {}
    reports = [read_json(os.path.join(d, "report.json")) for d in ref_dirs]
    g = reports[0]["slimmed_gflops"]
    out[f"{g:.3f} G"] = (g, [{"name": f"{os.path.relpath(d, ROOT)}/masks.json (Alg. 1, seed {r['settings']['seed']})",
                              "masks": os.path.join(d, "masks.json"),
                              "compute": search_compute(r, r["settings"]["ft_steps"], r["settings"]["batch_size"])}
                             for d, r in zip(ref_dirs, reports)])
    pt = read_json(os.path.join(ROOT, "results", "fig4", "eps_0.001.json"))
    steps = sum(len(lay["trials"]) for lay in pt["layers"]) * reports[0]["settings"]["ft_steps"]
    compute = {"optimiser_steps": steps, "images_seen": steps * reports[0]["settings"]["batch_size"],
               "what": "Alg. 1's block fine-tunes of the Fig. 4 search that chose these counts (the patches are "
               "Eq. 6's on the dense weights)"}
    out[f"{pt['gflops']:.3f} G"] = (pt["gflops"], [
        {"name": f"results/fig4/eps_0.001.json counts, patches by Eq. 6 (score images seed {s})",
         "counts": pt["kept_per_layer"], "score_seed": s, "compute": compute} for s in (0, 1)])
    return out


def select_at_budget(model, gflops, held, masks, out, chosen, name, methods=METHODS, save=lambda: None):
    """The selection at one budget, reading only `held`: each method's candidates (patch slimming's: `masks`),
    scored and selected; fills out[method] = {candidates, selected, note} and chosen[(name, method)] = the setting."""
    for method in methods:
        cands, note = (masks, "") if method == "patch slimming" else budget_candidates(model.cfg, method, gflops)
        rows = score_candidates(model, cands, held, gflops)
        i = select(rows)
        out[method] = {"candidates": rows, "selected": i, "note": note}
        chosen[(name, method)] = cands[i]
        save()


def pairwise(res, preds_path):
    """Every pair of peers at each budget, paired on the same val images from the stored predictions: row − column."""
    with np.load(preds_path) as f:
        labels = f["labels"]
        for name, b in res["budgets"].items():
            correct = {m: f[f"{name}__{m}".replace(" ", "_")] == labels for m in METHODS[1:]}
            b["peer_pairs"] = {f"{a} − {c}": compare(correct[a], correct[c]) for i, a in enumerate(METHODS[1:])
                               for c in METHODS[1 + i + 1:]}


def rebuild(cfg, dense, train_eval, sources, gflops, method, setting, score_images):
    """The candidate the results file names `setting` (its describe()), rebuilt: the selection is deterministic given
    the grid, the budget and (patch slimming's) the sources."""
    cands = ps_candidates(cfg, dense, train_eval, sources, score_images) if method == "patch slimming" else \
        budget_candidates(cfg, method, gflops)[0]
    found = [c for c in cands if c.describe() == setting]
    if not found:
        raise UserError(f"{method}'s selected setting {setting!r} is not among its candidates at {gflops:.4f} G: "
                        "the grid changed since the selection; rerun python bench/peers_select.py")
    return found[0]


def finetune_selected(args, res, dense, train_eval, data_path, run_dirs):
    """The headline's final fine-tune (the light recipe, 1 epoch, lr 3e-4 at batch 64, soft distillation from the
    dense model) of every method's selected setting at each budget of --finetune-budgets, FROM THE DENSE WEIGHTS for
    every method, patch slimming's masks included, so that every row trains alike (equal compute); per seed, paired
    against patch slimming's row of the same seed and, at the headline budget, against patch slimming's own runs
    (run_dirs: its search's block fine-tunes, then the same fine-tune: more training, counted). Each entry is written
    as it finishes; a rerun skips the entries the results file holds."""
    cfg, preds_path = dense.cfg, args.out + "_predictions.npz"
    train_aug = data.build_dataset(data_path, "train", cfg.img_size, mean=cfg.mean, std=cfg.std)
    val = data.build_dataset(data_path, "val", cfg.img_size, mean=cfg.mean, std=cfg.std)
    steps = len(train_aug) // FT_BATCH * FT_EPOCHS
    res["finetune"] = {"recipe": "light", "epochs": FT_EPOCHS, "lr": FT_LR, "batch_size": FT_BATCH,
                       "distill": "soft (the dense model)", "start": "the dense weights, every method",
                       "optimiser_steps": steps, "images_seen": steps * FT_BATCH,
                       "seeds": sorted(set(res.get("finetune", {}).get("seeds", [])) | set(args.seeds))}
    all_budgets = budgets(run_dirs)
    for name in args.finetune_budgets:
        if name not in res["budgets"]:
            raise UserError(f"--finetune-budgets {name!r} is not a budget of {args.out}.json "
                            f"({', '.join(res['budgets'])})")
        g, sources = all_budgets[name]
        for seed in args.seeds:
            for method in METHODS:
                m = res["budgets"][name]["methods"][method]
                done = m.setdefault("finetuned", {})
                if f"seed {seed}" in done:
                    continue
                cand = rebuild(cfg, dense, train_eval, sources, g, method, m["val"]["setting"], args.score_images)
                t0, student = time.time(), vit.load_checkpoint(os.path.join(ROOT, res["weights"]))
                keep = cand.keep if isinstance(cand, Masks) else None
                if not isinstance(cand, Masks):
                    student = peers.PeerModel(student, cand)
                light_finetune(student, dense, keep, "frozen", train_aug, FT_EPOCHS, FT_LR, FT_BATCH, seed, print,
                               args.workers)
                preds, labels = predict(student, val, keep, "frozen", workers=args.workers,
                                        desc=f"val {name} {method} fine-tuned seed {seed}")
                save_predictions(preds_path, **{pred_key(name, method, seed): preds})
                done[f"seed {seed}"] = {"top1": accuracy(preds, labels), "seconds": round(time.time() - t0),
                                        "machine": machine()}
                write_json(args.out + ".json", res)
                print(f"{name} {method} fine-tuned, seed {seed}: val top-1 {done[f'seed {seed}']['top1']:.2f}%",
                      flush=True)
        finetuned_pairs(res, name, run_dirs if name == next(iter(res["budgets"])) else [], preds_path)
        write_json(args.out + ".json", res)


def pred_key(name, method, seed):
    return f"{name}__{method}__ft_seed{seed}".replace(" ", "_")


def finetuned_pairs(res, name, run_dirs, preds_path):
    """Patch slimming's fine-tuned row minus each peer's, per seed and both seeds together (paired on the same val
    images), from the stored predictions; with run_dirs (the headline budget), patch slimming's own runs too."""
    methods = res["budgets"][name]["methods"]
    with np.load(preds_path) as f:
        labels = f["labels"]
        correct = {(m, s): f[pred_key(name, m, s)] == labels for m in METHODS for s in res["finetune"]["seeds"]
                   if pred_key(name, m, s) in f}
    own = {}
    for d in run_dirs:  # patch slimming's own runs: block fine-tunes in the search, then the same final fine-tune
        rep = read_json(os.path.join(d, "report.json"))
        with np.load(os.path.join(d, "predictions.npz")) as f:
            own[rep["settings"]["seed"]] = (f["slimmed"] == f["labels"], os.path.relpath(d, ROOT), rep)
    if own:
        res["budgets"][name]["ps_own_runs"] = {f"seed {s}": {"source": src, "top1": 100 * float(c.mean()),
                                                             "training": search_compute(
                                                                 rep, rep["settings"]["ft_steps"], rep["settings"]["batch_size"],
                                                                 "Alg. 1's block fine-tunes of its search (one block at a time)")}
                                               for s, (c, src, rep) in own.items()}
    for method in METHODS:  # patch slimming's own runs minus its fine-tuned masks too: what the block fine-tunes add
        done = methods[method].get("finetuned", {})
        seeds = [s for s in res["finetune"]["seeds"] if ("patch slimming", s) in correct and (method, s) in correct]
        for s in seeds:
            if method != "patch slimming":
                done[f"seed {s}"]["ps_minus_this"] = compare(correct[("patch slimming", s)], correct[(method, s)])
            if s in own:
                done[f"seed {s}"]["ps_own_run_minus_this"] = compare(own[s][0], correct[(method, s)])
        if len(seeds) > 1 and method != "patch slimming":
            methods[method]["finetuned_seeds_together"] = compare_seeds(
                [correct[("patch slimming", s)] for s in seeds], [correct[(method, s)] for s in seeds])
        if len(seeds) > 1:
            if all(s in own for s in seeds):
                methods[method]["finetuned_seeds_together_own_runs"] = compare_seeds(
                    [own[s][0] for s in seeds], [correct[(method, s)] for s in seeds])


def main():
    p = argparse.ArgumentParser("Every method's free settings chosen on held-out training images, val read once")
    p.add_argument("--reference", nargs="+", default=[os.path.join(ROOT, "results", "cifar10-proxy"),
                                                      os.path.join(ROOT, "results", "cifar10-proxy-seed1")])
    p.add_argument("--held-out-images", type=int, default=3000, help="training images the selection reads")
    p.add_argument("--held-out-seed", type=int, default=2024, help="the draw of those images")
    p.add_argument("--score-images", type=int, default=512, help="Eq. 6 score images of the Fig. 4 masks")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "peers_selection"))
    p.add_argument("--pairs-only", action="store_true", help="only add the paired intervals (peers against each "
                   "other, and the fine-tuned rows') to OUT.json from its stored val predictions (no images read)")
    p.add_argument("--finetune", action="store_true", help="fine-tune the selected settings of OUT.json (every "
                   "method from the dense weights, the headline's recipe), per seed, and compare on val")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tune seeds (with --finetune)")
    p.add_argument("--finetune-budgets", nargs="+", default=None, metavar="BUDGET", help="with --finetune, the "
                   "budgets as OUT.json names them (\"0.138 G\"); default: all")
    args = p.parse_args()
    if args.finetune:
        res = read_json(args.out + ".json")
        args.finetune_budgets = args.finetune_budgets or list(res["budgets"])
        ref = read_json(os.path.join(args.reference[0], "report.json"))
        data_path = os.path.join(ROOT, ref["args"]["data_path"])
        dense = vit.load_checkpoint(os.path.join(ROOT, res["weights"]))
        train_eval = data.build_dataset(data_path, "train", dense.cfg.img_size, train_transform=False,
                                        mean=dense.cfg.mean, std=dense.cfg.std)
        finetune_selected(args, res, dense, train_eval, data_path, args.reference)
        print(f"wrote {args.out}.json and {args.out}_predictions.npz")
        return
    if args.pairs_only:
        res = read_json(args.out + ".json")
        pairwise(res, args.out + "_predictions.npz")
        for i, name in enumerate(res["budgets"] if "finetune" in res else []):
            finetuned_pairs(res, name, args.reference if i == 0 else [], args.out + "_predictions.npz")
        write_json(args.out + ".json", res)
        return
    torch.manual_seed(0)
    ref = read_json(os.path.join(args.reference[0], "report.json"))
    data_path = os.path.join(ROOT, ref["args"]["data_path"])
    dense = vit.load_checkpoint(os.path.join(ROOT, ref["weights"]))
    cfg = dense.cfg
    train_eval = data.build_dataset(data_path, "train", cfg.img_size, train_transform=False, mean=cfg.mean, std=cfg.std)
    held = held_out_slice(data_path, cfg, args.held_out_images, args.held_out_seed)
    command = " ".join(["python bench/peers_select.py"] + sys.argv[1:])
    res = {"command": command, "machine": machine(), "weights": ref["weights"], "tolerance": TOLERANCE,
           "held_out": {"split": "train", "images": len(held), "seed": args.held_out_seed,
                        "transform": "eval (no augmentation)"},
           "grids": {"ToMe inflect": TOME_INFLECTS, "EViT layers": EVIT_LAYERS, "PPT layers": PPT_LAYERS,
                     "PPT thresholds x 1/(patches)^2": [str(c) for c in PPT_THRESHOLDS],
                     "PiToMe margins (x proportional attention off, on)": PITOME_MARGINS},
           "dense_gflops": flops.count_flops(cfg) / 1e9, "flops_note": flops.NOT_COUNTED + "; each reducer's own "
           "matching, energy or fused token counted (matmuls); PPT counted as if every image pools (its upper bound)",
           "budgets": {}}
    preds_d, labels_d = run_candidate(dense, Masks(None, "dense"), held, desc="held-out dense")
    res["held_out"]["dense_top1"] = accuracy(preds_d, labels_d)
    chosen = {}  # (budget, method): the selected setting
    for name, (g, sources) in budgets(args.reference).items():
        print(f"budget {name}", flush=True)
        res["budgets"][name] = {"target_gflops": g, "methods": {}}
        masks = ps_candidates(cfg, dense, train_eval, sources, args.score_images)
        select_at_budget(dense, g, held, masks, res["budgets"][name]["methods"], chosen, name,
                         save=lambda: write_json(args.out + ".json", res))

    # val, read once: the selected settings' final numbers, paired against patch slimming's selected masks
    val = data.build_dataset(data_path, "val", cfg.img_size, mean=cfg.mean, std=cfg.std)
    preds, labels = predict(dense, val, workers=args.workers, desc="val dense")
    res["val_images"], res["dense"] = len(val), {"top1": accuracy(preds, labels), "gflops": res["dense_gflops"]}
    save_predictions(args.out + "_predictions.npz", labels=labels, dense=preds)
    n_train = len(train_eval)
    for name, b in res["budgets"].items():
        ps_correct = None
        for method in METHODS:
            cand = chosen[(name, method)]
            preds, labels = run_candidate(dense, cand, val, args.workers, desc=f"val {name} {method}")
            save_predictions(args.out + "_predictions.npz", **{f"{name}__{method}".replace(" ", "_"): preds})
            correct = preds.numpy() == labels.numpy()
            m = b["methods"][method]
            m["val"] = {"setting": cand.describe(), "gflops": gflops_of(cfg, cand), "top1": accuracy(preds, labels),
                        "tokens_per_layer": flops.kept_counts(cfg, cand.keep) if isinstance(cand, Masks) else
                        [n for n, _ in peers.tokens_per_layer(cfg, cand)]}
            if method == "patch slimming":
                ps_correct = correct
            else:
                m["val"]["ps_minus_this"] = compare(ps_correct, correct)
            m["training"] = {"off_the_shelf": {"optimiser_steps": 0, "images_seen": 0},
                             "selection_images": len(held),
                             "search": cand.compute if isinstance(cand, Masks) else None}
            print(f"{name} {method}: {cand.describe()}: val top-1 {m['val']['top1']:.2f}%", flush=True)
            write_json(args.out + ".json", res)
    res["train_images"] = n_train
    pairwise(res, args.out + "_predictions.npz")
    write_json(args.out + ".json", res)
    print(f"wrote {args.out}.json and {args.out}_predictions.npz")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
