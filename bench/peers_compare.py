"""
ToMe and EViT beside patch slimming (arXiv 2106.02852; method.md §8) on the CIFAR-10 proxy, on the same pretrained
weights, at equal GFLOPs with each method under its own exact count (flops.py, bench/peers.py): at the headline's
FLOPs and at other budgets taken from Fig. 4's points (results/fig4/eps_<eps>.json). Per row: top-1 off the shelf
(no fine-tuning) with a paired interval against patch slimming on the same val images (bench/stats.py: paired
bootstrap, McNemar). The fine-tuned comparison is bench/peers_select.py --finetune's, at the selected settings.

Rows at each budget:
- patch slimming: at the headline budget, the masks Alg. 1 searched (REFERENCE/masks.json) on the dense weights (the
  slimmed weights are not committed); at a Fig. 4 budget, that point's kept counts with the patches chosen by Eq. 6
  top-down on the dense weights (common.masks_for_counts: Fig. 4 keeps counts, not masks). Its top-1 after the search
  (block fine-tuning included) is read from the run's files;
- ToMe with constant r (its default), ToMe with its r schedule searched too (an integer r lands far from some
  budgets), and EViT (keep rate at layers 4, 7, 10): the setting closest at or below the budget in FLOPs
  (peers.at_gflops), not chosen for accuracy; a budget a peer cannot reach is recorded as such. bench/peers_select.py
  is the protocol that chooses every method's settings (PPT's and PiToMe's too) by top-1 on held-out training
  images instead, off the shelf;
- the linear pyramid (flops.linear_pyramid) with patches chosen by Eq. 6, built as bench/table3.py builds it;
- patch slimming with its row's masks, but pruned patches removed (method.md C1, `--tokens removed`) instead of
  frozen (P1): the same masks cost fewer FLOPs, since removed patches stop being keys and values.

    python bench/peers_compare.py     # off the shelf, full val, headline + Fig. 4 eps 0.001, 0.005
Every row is written as it finishes and skipped when the results file already holds it (a rerun resumes). Writes
OUT.json (results/peers.json), OUT_predictions.npz (per-image predicted classes, "labels") and OUT.png (top-1
against GFLOPs; `--plot-only` redraws it); docs/peers.md is rendered from them by bench/report.py.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import flops  # noqa: E402
from pipeline.distributed import machine  # noqa: E402
from pipeline.caches import cache_dense  # noqa: E402
from pipeline.evaluate import accuracy, predict, save_predictions  # noqa: E402
import vit  # noqa: E402
from vit import UserError  # noqa: E402
import peers  # noqa: E402
from common import masks_for_counts, pyplot, read_json, write_json  # noqa: E402
from stats import compare, describe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PS, TOME, TOME_SCHEDULE, EVIT, LINEAR = "patch slimming", "ToMe", "ToMe, schedule searched", "EViT", "linear pyramid"
PS_REMOVED = "patch slimming, removed"  # patch slimming's masks with pruned patches removed (C1), not frozen (P1)


def key(*parts):
    """A predictions-file key: budget, row and suffix joined, spaces as underscores."""
    return "__".join(parts).replace(" ", "_")


def eq6_masks(model, train_eval, counts, tokens, seed, score_images):
    """Masks with the given kept counts, patches chosen by Eq. 6 top-down on score images drawn with seed: the
    baseline masks of bench/table3.py, built the same way (same images for the same seed)."""
    perm = torch.randperm(len(train_eval), generator=torch.Generator().manual_seed(seed)).tolist()
    cache = cache_dense(model, data.loader(torch.utils.data.Subset(train_eval, perm[:score_images]), 64),
                        "cache score images")
    return masks_for_counts(model, cache.z, counts, tokens, "significance", seed)


def ps_masks(ps, cfg, dense, train_eval, tokens, score_images):
    """Patch slimming's masks at a budget: the searched masks file, or Fig. 4's counts with Eq. 6's patches."""
    if "masks" in ps:
        keep, found = vit.load_masks(ps["masks"], cfg)
        assert found == tokens, (found, tokens)
        return keep
    return eq6_masks(dense, train_eval, ps["counts"], tokens, 0, score_images)


def peer_at(cfg, row, gflops, flags):
    """The peer setting of a row at a budget: ToMe (its --tome-inflect schedule, or its schedule searched too), or
    EViT. flags: peers.settings_from_args."""
    if row == EVIT:
        return peers.at_gflops(cfg, "evit", gflops, **flags["evit"])
    return peers.at_gflops(cfg, "tome", gflops, inflect=flags["tome"]["inflect"] if row == TOME else None)


def budgets_of(args, reference):
    """[(name, GFLOPs, patch slimming's row source)] for the headline and each --fig4-eps point."""
    out = [(f"{reference['slimmed_gflops']:.3f} G", reference["slimmed_gflops"],
            {"masks": os.path.join(args.reference[0], "masks.json"), "top1_after_search": reference["searched_top1"],
             "source": f"{os.path.relpath(args.reference[0], ROOT)}/ (the headline; masks as searched)"})]
    for eps in args.fig4_eps:
        path = os.path.join(ROOT, "results", "fig4", f"eps_{eps}.json")
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist: pass --fig4-eps values that bench/eps_sweep.py has run")
        pt = read_json(path)
        out.append((f"{pt['gflops']:.3f} G", pt["gflops"],
                    {"counts": pt["kept_per_layer"], "top1_after_search": pt["top1_searched"],
                     "source": f"results/fig4/eps_{eps}.json (Fig. 4, eps {eps}: its counts, patches by Eq. 6)"}))
    return out


def plot(res, path):
    """Top-1 against GFLOPs off the shelf, every row at each budget; dense as a line. Returns whether it wrote path."""
    plt = pyplot()
    if plt is None:
        return False
    marks = {PS: "o", PS_REMOVED: "s", TOME: "v", TOME_SCHEDULE: "^", EVIT: "D", LINEAR: "x"}
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(res["dense"]["top1"], color="grey", ls="--", lw=1, label=f"dense ({res['dense_gflops']:.3f} G)")
    ax.set(xlabel="GFLOPs (each method's exact count)", ylabel="top-1 (%)", title="off the shelf, settings nearest in FLOPs")
    for row, mark in marks.items():
        pts = [(r["gflops"], r["top1"]) for b in res["budgets"].values() for name, r in b["rows"].items()
               if name == row and "top1" in r]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker=mark, ls="-", lw=0.8, label=row)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Patch slimming, ToMe and EViT on the CIFAR-10 proxy at equal GFLOPs (results/peers.json)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    p = argparse.ArgumentParser("ToMe and EViT beside patch slimming at equal GFLOPs on the CIFAR-10 proxy")
    p.add_argument("--reference", nargs="+", default=[os.path.join(ROOT, "results", "cifar10-proxy"),
                                                      os.path.join(ROOT, "results", "cifar10-proxy-seed1")],
                   help="slim.py output folders, one per seed: the first sets the budget and the masks")
    p.add_argument("--fig4-eps", type=float, nargs="*", default=[0.001, 0.005], help="other budgets: Fig. 4's points")
    p.add_argument("--val-per-class", type=int, default=None, help="evaluate on the first N val images of each class "
                   "(a quick check; default: the whole val set)")
    p.add_argument("--score-images", type=int, default=512, help="images for the Eq. 6 scores of the baseline masks")
    peers.add_arguments(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "peers"))
    p.add_argument("--plot-only", action="store_true", help="redraw OUT.png from OUT.json, and run nothing")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.plot_only:
        if not os.path.exists(args.out + ".json"):
            raise UserError(f"{args.out}.json does not exist: run python bench/peers_compare.py first")
        with open(args.out + ".json") as f:
            plot(json.load(f), args.out + ".png")
        return

    missing = [r for r in args.reference if not os.path.exists(os.path.join(r, "report.json"))]
    if missing:
        raise UserError(f"{missing[0]}/report.json does not exist: pass --reference folders written by slim.py (the "
                        "README's first command writes results/cifar10-proxy)")
    references = [read_json(os.path.join(r, "report.json")) for r in args.reference]
    reference = references[0]
    weights, data_path, tokens = reference["weights"], reference["args"]["data_path"], reference["tokens"]
    dense = vit.load_checkpoint(os.path.join(ROOT, weights))  # the reference's path, relative to the repository
    cfg = dense.cfg
    val = data.build_dataset(os.path.join(ROOT, data_path), "val", cfg.img_size, mean=cfg.mean, std=cfg.std)
    positions = np.arange(len(val))
    if args.val_per_class:
        val = data.subset(val, per_class=args.val_per_class)
        positions = np.asarray(val.indices)
    train_eval = data.build_dataset(os.path.join(ROOT, data_path), "train", cfg.img_size, train_transform=False,
                                    mean=cfg.mean, std=cfg.std)
    res = read_json(args.out + ".json") if os.path.exists(args.out + ".json") else {"budgets": {}}
    if res.get("val_images", len(positions)) != len(positions):
        raise UserError(f"{args.out}.json holds rows on {res['val_images']} val images, not {len(positions)}: pass "
                        "the same --val-per-class, or another --out")
    flags = peers.settings_from_args(args)
    peers.check_peer(peers.ToMe(**flags["tome"]), cfg), peers.check_peer(peers.EViT(**flags["evit"]), cfg)
    stored_flags = json.loads(json.dumps(flags))  # as the results file holds them (tuples as lists)
    if res.get("peer_flags", stored_flags) != stored_flags:
        raise UserError(f"{args.out}.json holds rows made with {res['peer_flags']}, not {stored_flags}: pass the same "
                        "--tome-inflect, --evit-layers and --evit-fuse, or another --out")
    res["peer_flags"] = stored_flags
    command = " ".join(["python bench/peers_compare.py"] + sys.argv[1:])
    res.update(val_images=len(positions), num_tokens=cfg.num_tokens, tokens=tokens, weights=weights,
               reference=[os.path.relpath(r, ROOT) for r in args.reference], dense_gflops=flops.count_flops(cfg) / 1e9,
               machine=machine(),
               flops_note=flops.NOT_COUNTED + "; ToMe's matching and EViT's fused token counted (matmuls)")
    res["commands"] = sorted(set(res.get("commands", [])) | {command})
    preds_path = args.out + "_predictions.npz"
    os.makedirs(os.path.dirname(os.path.abspath(preds_path)), exist_ok=True)

    def stored(name):
        with np.load(preds_path) as f:
            return f[name], f["labels"]

    def save():
        write_json(args.out + ".json", res)

    if "dense" not in res:
        t0 = time.time()
        preds, labels = predict(dense, val, workers=args.workers, desc="eval dense")
        save_predictions(preds_path, labels=labels, dense=preds)
        res["dense"] = {"top1": accuracy(preds, labels), "gflops": res["dense_gflops"],
                        "seconds": round(time.time() - t0), "machine": machine()}
        save()
    print(f"dense: top-1 {res['dense']['top1']:.2f}%, {res['dense_gflops']:.3f} GFLOPs", flush=True)

    for budget, gflops, ps in budgets_of(args, reference):
        rows = res["budgets"].setdefault(budget, {"target_gflops": gflops, "rows": {}})["rows"]
        for row in (PS, TOME, TOME_SCHEDULE, EVIT, LINEAR, PS_REMOVED):
            if row in rows:
                continue
            t0, entry, keep, model, row_tokens = time.time(), {}, None, dense, tokens
            if row in (PS, PS_REMOVED):
                keep = ps_masks(ps, cfg, dense, train_eval, tokens, args.score_images)
                entry = {"source": ps["source"], "top1_after_search": ps["top1_after_search"]} if row == PS else \
                    {"setting": "patch slimming's masks above, pruned patches removed (C1), not frozen"}
                row_tokens = "removed" if row == PS_REMOVED else tokens
            elif row == LINEAR:
                keep = eq6_masks(dense, train_eval, flops.linear_pyramid(cfg, gflops * 1e9, tokens), tokens, 0,
                                 args.score_images)
            else:
                try:
                    peer = peer_at(cfg, row, gflops, flags)
                except UserError as e:  # the budget is out of this peer's reach: recorded, not an error
                    rows[row] = {"unreachable": str(e)}
                    save()
                    print(f"{budget} {row}: {e}", flush=True)
                    continue
                model = peers.PeerModel(dense, peer)
                entry = {"setting": peer.describe(), "gflops": peers.peer_flops(cfg, peer) / 1e9,
                         "tokens_per_layer": [n for n, _ in peers.tokens_per_layer(cfg, peer)]}
            if keep is not None:
                entry.update(tokens_per_layer=flops.kept_counts(cfg, keep),
                             gflops=flops.count_flops(cfg, keep, tokens=row_tokens) / 1e9)
            preds, labels = predict(model, val, keep, row_tokens, workers=args.workers, desc=f"eval {budget} {row}")
            save_predictions(preds_path, labels=labels, **{key(budget, row): preds})
            entry.update(top1=accuracy(preds, labels), seconds=round(time.time() - t0), command=command,
                         machine=machine())
            if row != PS:
                ps_preds, _ = stored(key(budget, PS))
                entry["ps_minus_this"] = compare(ps_preds == labels.numpy(), preds.numpy() == labels.numpy())
            rows[row] = entry
            save()
            versus = f"; patch slimming minus this {describe(entry['ps_minus_this'])}" if row != PS else ""
            print(f"{budget} {row}: top-1 {entry['top1']:.2f}%, {entry['gflops']:.4f} GFLOPs{versus}", flush=True)
        if PS in rows and "ps_minus_dense" not in rows[PS]:  # the dense model against patch slimming, paired
            ps_preds, labels = stored(key(budget, PS))
            dense_preds, _ = stored("dense")
            rows[PS]["ps_minus_dense"] = compare(ps_preds == labels, dense_preds == labels)
            save()

    save()
    drawn = plot(res, args.out + ".png")
    print(f"wrote {args.out}.json, {preds_path}" + (f" and {args.out}.png" if drawn else ""))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
