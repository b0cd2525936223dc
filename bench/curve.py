"""
Accuracy against FLOPs on the CIFAR-10 proxy (arXiv 2106.02852 reproduction): patch slimming at several eps
against baselines that get the *same* kept-token counts per layer and the *same* fine-tuning budget.

For each eps, slim.search (Algorithm 1) gives masks and per-block fine-tuned weights. Then, on the counts
|S_1|..|S_L| it chose, every method starts from the pretrained weights:
  ps           patch slimming: the search's masks and its per-block fine-tuned weights
  ps-noft      the search's masks on the pretrained weights: no fine-tuning at all
  random       random patches (top-down, nested), then the search's fine-tuning budget: one per-block
               fine-tune per layer (t = L-1..1, --ft-steps each on the same cached images, kept only if it
               lowers E; the search too keeps exactly one fine-tune per layer)
  class-attn   patches by the class token's attention (EViT's criterion, averaged over the training sample
               into a static mask, slim.class_attention_score), then the same budget
  significance patches by the search's score (--score) computed on the pretrained weights (top-down, no error
               test): the search's score without the search, then the same budget. The key keeps its v1 name
               (results/curve/*.json) whichever score --score names
  random-noft, class-attn-noft, significance-noft   those masks on the pretrained weights
With --final-steps N every fine-tuned method also gets the same end-to-end distillation fine-tune afterwards.
The search takes slim.py's flags (slim.SearchSettings); the defaults here are cheaper than slim.py's (--ft-steps
50, --held-images 512), to shorten bench/run_all.sh's v1 tier.
--tokens (METHOD.md P1 / C1) is the token semantics of the search, the baselines' masks and fine-tunes, the
evaluation and the FLOP count. It defaults to "removed": the committed results were made with the v1 variant, and
--score then defaults to "head-mean" (the score v1 called "significance"); with --tokens frozen it defaults to
"significance", Eq. 6 exactly (P3).

    python bench/curve.py                                  # eps 0.1 0.2 0.3 0.4 (about 55 min on 2 cores)
    python bench/curve.py --eps 0.2 --ft-steps 100 --held-images 1024   # slim.py's own search settings
    python bench/curve.py --tokens frozen --out results/curve_frozen      # the paper's semantics and score
Writes results/curve/eps_<eps>.json as each method finishes (a rerun resumes, skipping finished ones; the
search resumes from results/curve/eps_<eps>/state.pt), then results/curve.json, curve.md and curve.png.
"""
import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import flops  # noqa: E402
import slim  # noqa: E402
from pipeline.caches import cache_search_sets  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.finetune import light_finetune  # noqa: E402
import vit  # noqa: E402
from common import add_semantics_args, folder_log, pyplot, read_json, score_of, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
BASELINES = ["random", "class-attn", "significance"]  # "significance": the search's score (--score), v1's key
V1 = {"tokens": "removed", "score": "head-mean"}  # what the committed results/curve/*.json were made with
METHODS = ["ps"] + BASELINES + ["ps-noft"] + [b + "-noft" for b in BASELINES]
LABELS = {"ps": "patch slimming (search, per-block FT)", "ps-noft": "patch slimming masks, no FT",
          "random": "random patches + same FT", "class-attn": "class-attention top-k + same FT",
          "significance": "significance top-k + same FT", "random-noft": "random patches, no FT",
          "class-attn-noft": "class-attention top-k, no FT", "significance-noft": "significance top-k, no FT"}


def refit_blocks(model, keep, fit, held, s, log):
    """The search's per-block fine-tuning budget, spent on fixed masks: for t = L-1..1 (top-down, layers below t
    dense as in the search), fine-tune block t once for s.ft_steps and keep the result only if E drops.
    fit, held: DenseCaches; s: the search's slim.SearchSettings (its tokens, steps, learning rate, batch size)."""
    L, N = model.cfg.depth, model.cfg.num_tokens
    for t in range(L - 1, 0, -1):
        trial = [torch.arange(N)] * (t - 1) + keep[t - 1:]
        held_t = slim.at_layer(held, t)
        e0 = slim.layer_error(model, held_t, trial, s.tokens, s.error, t, s.batch_size).relative
        block = model.blocks[t - 1]
        before = copy.deepcopy(block.state_dict())
        slim.finetune_block(model, t, slim.at_layer(fit, t), trial, s, s.seed + 1000 * t, f"layer {t} fine-tune")
        e = slim.layer_error(model, held_t, trial, s.tokens, s.error, t, s.batch_size).relative
        if e > e0:  # keep the fine-tuned weights only if E drops
            block.load_state_dict(before)
        log(f"  layer {t:2d}: E {e0:.4f} -> {min(e, e0):.4f}")


def table(points, dense_top1, dense_gflops, N):
    rows = ["| eps | kept tokens per layer | GFLOPs | fewer | " + " | ".join(METHODS) + " |",
            "|---|---|---|---|" + "---|" * len(METHODS),
            f"| dense | all {N} | {dense_gflops:.3f} | 0% | {dense_top1:.2f} (dense model) |" + " |" * (len(METHODS) - 1)]
    for p in points:
        rows.append(f"| {p['eps']} | {' '.join(map(str, p['kept_per_layer']))} | {p['gflops']:.3f} | "
                    f"{100 * (1 - p['gflops'] / dense_gflops):.1f}% | "
                    + " | ".join(f"{p['top1'][k]:.2f}" if k in p["top1"] else "–" for k in METHODS) + " |")
    return "\n".join(rows)


def plot(points, dense_top1, dense_gflops, path, headline=None):
    plt = pyplot()
    if plt is None:
        return
    style = {"ps": ("C0", "o", "-"), "ps-noft": ("C0", "o", "--"),
             "random": ("C3", "s", "-"), "random-noft": ("C3", "s", "--"),
             "class-attn": ("C2", "^", "-"), "class-attn-noft": ("C2", "^", "--"),
             "significance": ("C1", "D", "-"), "significance-noft": ("C1", "D", "--")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = sorted(points, key=lambda p: p["gflops"])
    for k in METHODS:
        xy = [(p["gflops"], p["top1"][k]) for p in pts if k in p["top1"]]
        if xy:
            c, mk, ls = style[k]
            ax.plot(*zip(*xy), color=c, marker=mk, ls=ls, label=LABELS[k], alpha=1 if ls == "-" else 0.6)
    ax.plot([dense_gflops], [dense_top1], "k*", ms=14, label="dense DeiT-Ti/4 (proxy)")
    if headline:  # the slim.py run of the README (its own settings, plus a 2-epoch final fine-tune)
        ax.plot([headline["slimmed_gflops"]], [headline["slimmed_top1"]], "P", color="C4", ms=10,
                label="slim.py v1 run + final FT (results/cifar10-proxy-v1)")
    for p in pts:
        ax.annotate(f"ε={p['eps']}", (p["gflops"], p["top1"]["ps"] if "ps" in p["top1"] else dense_top1),
                    textcoords="offset points", xytext=(4, 6), fontsize=8, color="C0")
    ax.set_xlabel("GFLOPs (multiply-accumulates)")
    ax.set_ylabel("CIFAR-10 val top-1 (%)")
    ax.set_title("Patch slimming vs baselines at the same kept-token counts (CIFAR-10 proxy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser("Accuracy vs FLOPs: patch slimming against baselines on the CIFAR-10 proxy")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.3, 0.4])
    p.add_argument("--final-steps", type=int, default=0, help="end-to-end fine-tune steps after, the same for every method")
    p.add_argument("--final-lr", type=float, default=3e-4)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "curve"))
    p.add_argument("--val-per-class", type=int, default=None, help="evaluate on k val images per class (quick runs)")
    p.add_argument("--headline", default=os.path.join(ROOT, "results", "cifar10-proxy-v1", "report.json"),
                   help="a slim.py report.json to mark on the plot (skipped when absent)")
    add_semantics_args(p, "the search's score and the 'significance' baseline's", slim.SCORES)
    args, rest = p.parse_known_args()
    score = score_of(args)
    sargs = slim.check_args(slim.get_args_parser().parse_args(
        ["--data", "folder", "--data-path", os.path.join(SHARED, "data", "cifar10"),
         "--weights", os.path.join(SHARED, "models", "deit_tiny_p4_cifar10.pth"), "--ft-steps", "50",
         "--held-images", "512", "--error", "final", "--out", args.out] + rest + ["--tokens", args.tokens, "--score", score]))
    torch.manual_seed(sargs.seed)
    device = torch.device(sargs.device)
    pretrained = slim.load_model(sargs).to(device)
    cfg = pretrained.cfg
    s = slim.settings_from_args(sargs, cfg)  # tokens: --tokens, passed on to slim's parser above
    run_id = slim.run_identity(sargs)
    log = folder_log(args.out)

    t_start = time.time()
    log(f"bench/curve.py {' '.join(sys.argv[1:])}\nsearch settings: {json.dumps(dataclasses.asdict(s))}")
    val = data.build_dataset(sargs.data_path, "val", cfg.img_size)
    if args.val_per_class:
        val = data.subset(val, per_class=args.val_per_class)
    train_aug = data.build_dataset(sargs.data_path, "train", cfg.img_size)
    final_epochs = args.final_steps / (len(train_aug) // sargs.batch_size)  # the fine-tune runs round(epochs * steps)
    dense_path = os.path.join(args.out, "dense.json")
    if not os.path.exists(dense_path):  # the dense model has no pruned patches: its top-1 is the same under both
        json.dump({"tokens": s.tokens, "top1": evaluate(pretrained, val, workers=sargs.workers, desc="eval dense")},
                  open(dense_path, "w"))
    dense_top1, dense_gflops = read_json(dense_path)["top1"], flops.count_flops(cfg) / 1e9
    log(f"dense: top-1 {dense_top1:.2f}%, {dense_gflops:.3f} GFLOPs")

    model = copy.deepcopy(pretrained)
    fit, held = cache_search_sets(model, train_aug, sargs.data_path, s, sargs.workers, log)
    score_xs = [z[:s.score_images] for z in fit.z]
    scores = {"random": "random", "class-attn": "class-attn", "significance": s.score}  # baseline -> slim.SCORES key
    points = []
    for eps in args.eps:
        path = os.path.join(args.out, f"eps_{eps}.json")
        made_with = {"tokens": s.tokens, "score": s.score}
        pt = read_json(path) if os.path.exists(path) else {**made_with, "eps": eps, "top1": {}, "seconds": {}}
        found = {k: pt.get(k, v) for k, v in V1.items()}  # a file without these entries is v1's
        if found != made_with:  # a resume must not mix methods run under other semantics or scores
            raise vit.UserError(f"{path} holds results made with {found}, not {made_with}: pass another --out")

        def done(name, top1, t0, pt=pt, path=path):
            pt["top1"][name], pt["seconds"][name] = top1, round(time.time() - t0, 1)
            write_json(path, pt)
            log(f"eps {eps}: {name:16s} top-1 {top1:.2f}%  ({pt['seconds'][name]:.0f}s)")

        t0 = time.time()
        model.load_state_dict(pretrained.state_dict())
        s_eps = dataclasses.replace(s, eps=eps)
        state = slim.search(model, fit, held, s_eps, log, os.path.join(args.out, f"eps_{eps}_state.pt"), run_id=run_id)
        keep, searched = state["keep"], copy.deepcopy(model.state_dict())
        counts = flops.kept_counts(cfg, keep)
        pt.update(tokens=s.tokens, score=s.score, kept_per_layer=counts,
                  gflops=flops.count_flops(cfg, keep, tokens=s.tokens) / 1e9, final_steps=args.final_steps,
                  final_lr=args.final_lr, search_layers=state["layers"])
        pt["seconds"].setdefault("search", round(time.time() - t0, 1))
        masks = {"ps": keep}
        for b in BASELINES:  # the baselines' masks: same counts, pretrained weights
            model.load_state_dict(pretrained.state_dict())
            masks[b] = slim.masks_for_counts(model, score_xs, counts, s.tokens, scores[b], s.seed, s.batch_size)
            assert flops.kept_counts(cfg, masks[b]) == counts
        pt["keep"] = {k: [v.tolist() for v in ks] for k, ks in masks.items()}
        write_json(path, pt)
        for name in METHODS:
            if name in pt["top1"]:
                continue
            t0 = time.time()
            base = name.removesuffix("-noft")
            model.load_state_dict(searched if name == "ps" else pretrained.state_dict())
            if name in BASELINES:
                log(f"eps {eps}: {name}: per-block fine-tune (the search's budget)")
                refit_blocks(model, masks[base], fit, held, s_eps, log)
            if name in ["ps"] + BASELINES and args.final_steps:
                light_finetune(model, pretrained, masks[base], s.tokens, train_aug, final_epochs, args.final_lr,
                               sargs.batch_size, sargs.seed, log, sargs.workers)
            done(name, evaluate(model, val, masks[base], s.tokens, workers=sargs.workers, desc=f"eval {name}"), t0)
        points.append(pt)

    summary = {"tokens": s.tokens, "command": " ".join(["python bench/curve.py"] + sys.argv[1:]),
               "dense_top1": dense_top1, "dense_gflops": dense_gflops, "val_images": len(val),
               "search_settings": {**dataclasses.asdict(s), "eps": args.eps},
               "machine": slim.machine(), "wall_seconds_this_run": round(time.time() - t_start, 1),
               "seconds_all_points": round(sum(sum(p["seconds"].values()) for p in points), 1),
               "points": [{k: v for k, v in p.items() if k not in ("keep", "search_layers")} for p in points]}
    base = os.path.join(os.path.dirname(args.out), os.path.basename(args.out))
    write_json(base + ".json", summary)
    md = table(points, dense_top1, dense_gflops, cfg.num_tokens)
    open(base + ".md", "w").write(f"`{summary['command']}`\n\n{md}\n")
    log(md)
    plot(points, dense_top1, dense_gflops, base + ".png",
         read_json(args.headline) if args.headline and os.path.exists(args.headline) else None)


if __name__ == "__main__":
    try:
        main()
    except vit.UserError as e:
        sys.exit(f"error: {e}")
