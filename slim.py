"""
Patch slimming (Tang et al., "Patch Slimming for Efficient Vision Transformers", CVPR 2022, arXiv 2106.02852):
significance scores, the top-down mask search of the paper's Algorithm 1 with per-layer fine-tuning, and the CLI.

    python slim.py --data imagenet --data-path /path/to/imagenet               # slim the released DeiT-S
    python slim.py --data folder --data-path DIR --weights ckpt.pth --out OUT  # any ImageFolder + DeiT ckpt
    python slim.py --eval-only --data ... [--masks OUT/masks.json]             # top-1 and FLOPs

The method is fixed by ../shared/METHOD.md; its interpretation choices I1-I5 are cited beside the code.
Algorithm 1 as run here (METHOD.md §5), and what is cached so that it is affordable:
- The dense activations entering every block are computed once for a fixed sample of training images
  (one augmented view each, the "fit" set) and for a held sample (evaluation transform). Layers 1..t stay
  dense while layer t is searched, so these caches stay exact for the whole search; each step then runs
  only blocks t..L. The dense model's final features/logits are cached beside them as distillation targets.
- The paper fine-tunes block t for every candidate r = 0, r0, 2 r0, ... and stops at the first whose error
  E <= eps. We first measure E0(r) without fine-tuning (a forward on the held set; E0 falls as r grows, so the
  first r with E0 below a threshold is found by bisection): the first candidate with E0 <= eps is accepted;
  one with E0 > --ft-reach * eps is rejected without fine-tuning (a few fine-tuning steps never closed a gap
  that large in our runs: see report.json's per-layer trials); those in between are fine-tuned (at most
  --ft-tries per layer) and accepted if E <= eps, else the block is restored.
  An accepted candidate is always fine-tuned (as in the paper), keeping the new weights only if they lower E.
  Keeping every token at layer t is the state already accepted at layer t+1, so the loop always ends.
"""
import argparse
import copy
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import flops
import vit
from vit import UserError

progress = partial(tqdm, leave=False, disable=None)  # bars on a terminal; none in log files or CI

# ----------------------------------------------------------------------------- scores (Sec. 3.2, METHOD.md §4)


def significance_score(head_out, attn_maps):
    """The paper's significance score of each token output by layer t (METHOD.md I3).
    head_out: U_t, (B, H, n_t, d), head h's output for each token after the projection;
    attn_maps: [P_{t+1}, ..., P_L], P_l (B, H, n_l, n_{l-1}) over the kept rows/alive columns.
    A_t = diag(m_L) P̄_L ... diag(m_{t+1}) P̄_{t+1} with P̄ the head mean (the diag(m) are the row gathers);
    s_{t,i} = ||A_t[:, i]||^2 * sum_h ||U_{h,t}[i]||^2. Returns (B, n_t)."""
    return attention_flow_score(head_out, attn_maps) * head_out.pow(2).sum(-1).sum(1)


def attention_flow_score(head_out, attn_maps):
    """The significance score without its head-output factor: ||A_t[:, i]||^2 alone, the attention flow from
    the class token at the top down to token i (a diagnostic of which factor ranks patches). (B, n_t)."""
    a = attn_maps[-1].mean(1)                              # (B, n_L, n_{L-1})
    for p in reversed(attn_maps[:-1]):
        a = a @ p.mean(1)                                  # (B, n_L, n_{l-1})
    return a.pow(2).sum(1)


def class_attention_score(head_out, attn_maps):
    """Baseline: the class token's head-averaged attention at layer t+1 to each token of layer t (EViT's
    criterion, averaged into a static mask). Same signature as significance_score; (B, n_t)."""
    return attn_maps[0].mean(1)[:, 0]


SCORES = {"significance": significance_score, "class-attn": class_attention_score, "attn-flow": attention_flow_score}


def spearman(a, b):
    """Rank correlation of two 1-D tensors (no ties expected in real-valued scores)."""
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


# ----------------------------------------------------------------------------- running blocks from the cache


class Ctx:
    """What every step needs: the model, device, precision and batch size."""

    def __init__(self, model, device, batch_size):
        self.model, self.device, self.bs = model, device, batch_size
        self.amp = device.type == "cuda"  # mixed precision on CUDA, float32 on CPU

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()

    def tail(self, x, keep, start):
        """Final class feature (B, d) from tokens x entering block `start` (0-based), masks keep."""
        m = self.model
        alive = m.cfg.num_tokens if start == 0 else len(keep[start - 1])
        if x.shape[1] != alive:
            raise ValueError(f"tokens entering block {start + 1}: {x.shape[1]}, but keep leaves {alive} alive")
        with self.autocast():
            return m.norm(m.run_blocks(x.to(self.device), vit.keep_positions(keep, m.cfg), start)[:, 0]).float()


@torch.no_grad()
def cache_dense(ctx, loader, desc):
    """Inputs of blocks 1..L-1 and the final feature/logits of the dense model, for every image of loader.
    Returns (xs, f, z): xs[l] (M, N, d) enters block l (0-based)."""
    m, L = ctx.model, ctx.model.cfg.depth
    xs, fs = [[] for _ in range(L - 1)], []
    store = torch.bfloat16 if ctx.amp else torch.float32
    for img, _ in progress(loader, desc=desc):
        with ctx.autocast():
            x = m.embed(img.to(ctx.device))
            for l in range(L):
                if l < L - 1:
                    xs[l].append(x.to(store))
                x = m.blocks[l](x)
            fs.append(m.norm(x[:, 0]).float())
    f = torch.cat(fs)
    return [torch.cat(x) for x in xs], f, m.head(f)


@torch.no_grad()
def feature_error(ctx, x_in, f_dense, keep, start):
    """METHOD.md I4: mean over images of ||f - f_dense|| / ||f_dense|| for the final class feature."""
    errs = []
    for i in range(0, len(x_in), ctx.bs):
        f, fd = ctx.tail(x_in[i:i + ctx.bs], keep, start), f_dense[i:i + ctx.bs]
        errs.append((f - fd).norm(dim=-1) / fd.norm(dim=-1))
    return torch.cat(errs).mean().item()


@torch.no_grad()
def layer_scores(ctx, x_in, keep, t, score_fn):
    """Scores of every token output by layer t (1-based), averaged over the images x_in (entering block t).
    Layers 1..t are dense (keep[t-1] = all), t+1..L pruned by keep."""
    m, total = ctx.model, 0
    for i in range(0, len(x_in), ctx.bs):
        recs = []
        with ctx.autocast():
            m.run_blocks(x_in[i:i + ctx.bs].to(ctx.device), vit.keep_positions(keep, m.cfg), t - 1, records=recs)
        s = score_fn(recs[0]["head_out"].float(), [r["attn"].float() for r in recs[1:]])
        total = total + s.sum(0)
    return (total / len(x_in)).cpu()


@torch.no_grad()
def true_impact(ctx, x_in, keep, t, candidates):
    """The truth a score should rank (METHOD.md §4): for each candidate token i, drop i alone at layer t and
    measure ||f - f_full|| of the final class feature, averaged over x_in. Block t's kept rows do not change
    when a row is dropped (METHOD.md I2), so block t runs once and only blocks t+1..L run per candidate."""
    m, N = ctx.model, ctx.model.cfg.num_tokens
    impact = torch.zeros(len(candidates))
    for s in range(0, len(x_in), ctx.bs):
        with ctx.autocast():
            y = m.blocks[t - 1](x_in[s:s + ctx.bs].to(ctx.device))
            f = m.norm(m.run_blocks(y, vit.keep_positions(keep, m.cfg), t)[:, 0]).float()
            for j, i in enumerate(candidates.tolist()):
                rest = torch.cat([torch.arange(i), torch.arange(i + 1, N)])
                k = with_layer(keep, t, rest)
                fi = m.norm(m.run_blocks(y.index_select(1, rest.to(y.device)), vit.keep_positions(k, m.cfg), t)[:, 0])
                impact[j] += (fi.float() - f).norm(dim=-1).sum().cpu()
    return impact / len(x_in)


# ----------------------------------------------------------------------------- fine-tuning (METHOD.md I5)


def distill_loss(f, z, f_t, z_t):
    """Relative feature MSE (the quantity I4 measures) + KL of the logits, both against the dense model."""
    rel = ((f - f_t).pow(2).sum(-1) / f_t.pow(2).sum(-1)).mean()
    kl = F.kl_div(F.log_softmax(z, -1), F.log_softmax(z_t, -1), reduction="batchmean", log_target=True)
    return rel + kl


def finetune_block(ctx, t, fit, keep, steps, lr, seed, desc):
    """Train only block t (1-based) so that the pruned network reproduces the dense one on the cached fit set:
    AdamW, cosine learning rate, `steps` batches. fit = (x entering block t, dense features, dense logits)."""
    m = ctx.model
    x_fit, f_t, z_t = fit
    params = list(m.blocks[t - 1].parameters())
    for p in m.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in progress(range(steps), desc=desc):
        idx = torch.randint(0, len(x_fit), (min(ctx.bs, len(x_fit)),), generator=g)
        f = ctx.tail(x_fit[idx], keep, t - 1)
        loss = distill_loss(f, m.head(f), f_t[idx].to(ctx.device), z_t[idx].to(ctx.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    for p in params:
        p.requires_grad_(False)


# ----------------------------------------------------------------------------- the search (Alg. 1, METHOD.md §5)


def with_layer(keep, t, k):
    """keep with layer t's (1-based) kept indices replaced by k."""
    return keep[:t - 1] + [k] + keep[t:]


def ranked_candidates(scores, forced):
    """The tokens a layer may add (those not in m_{t+1}), best score first. scores: (N,); forced: indices."""
    free = torch.ones(len(scores), dtype=torch.bool)
    free[forced] = False
    cand = free.nonzero().flatten()
    return cand[scores[cand].argsort(descending=True, stable=True)]


def finetune_or_restore(ctx, t, fit, held, keep, args, seed, bound, desc):
    """Fine-tune block t (finetune_block, args.ft_steps at args.ft_lr) with masks keep, then measure E on the held
    set; if E > bound the block's weights are restored. Returns E after fine-tuning (kept or not)."""
    block = ctx.model.blocks[t - 1]
    backup = copy.deepcopy(block.state_dict())
    finetune_block(ctx, t, fit, keep, args.ft_steps, args.ft_lr, seed, desc)
    e = feature_error(ctx, held[0], held[1], keep, t - 1)
    if e > bound:
        block.load_state_dict(backup)
    return e


def default_r0(cfg):
    """The paper's r0 = 10 of 197 tokens, scaled by the token count (3 for the 65-token proxy)."""
    return max(1, round(10 * (cfg.num_tokens - 1) / 196))


def search_layer(ctx, t, keep, fit, held, args, log):
    """Choose m_t given m_{t+1..L} (Alg. 1, inner loop). Returns (kept indices S_t, trial log)."""
    N = ctx.model.cfg.num_tokens
    full = with_layer(keep, t, torch.arange(N))                # layers 1..t dense
    scores = layer_scores(ctx, fit[0][:args.score_images], full, t, SCORES[args.score])
    forced = keep[t]                                           # m_{t+1} ⊆ m_t: nested by construction
    cand = ranked_candidates(scores, forced)
    info = {"layer": t, "trials": []}
    if args.quality_images and len(cand) >= 3:  # how well each score ranks the true impact, in the state it is used
        truth = true_impact(ctx, held[0][:args.quality_images], full, t, cand)
        info["spearman"] = {}
        for name, fn in SCORES.items():
            s = scores if name == args.score else layer_scores(ctx, fit[0][:args.score_images], full, t, fn)
            info["spearman"][name] = round(spearman(s[cand], truth), 4)
    grid, e0s = list(range(0, len(cand), args.r0)) + [len(cand)], {}

    def trial(i):  # m_t = m_{t+1} ∪ the top grid[i] candidates, and its error E0 before fine-tuning (memoised)
        k_t = torch.cat([forced, cand[:grid[i]]]).sort().values
        if i not in e0s:
            e0s[i] = feature_error(ctx, held[0], held[1], with_layer(keep, t, k_t), t - 1)
            info["trials"].append({"r": grid[i], "kept": int(k_t.numel()), "E0": round(e0s[i], 5)})
        return k_t, e0s[i]

    def first(x):
        """The first grid index whose E0 <= x. Alg. 1 scans r = 0, r0, 2 r0, ... upward; E0 falls as r grows
        (more tokens kept; it did at every layer of the proxy run, results/cifar10-proxy/report.json), so
        bisection finds the same index in log2(len(grid)) forward passes instead of len(grid). The last index
        keeps every token: the state accepted at layer t+1, so E0 <= eps; it is the bisection's upper end."""
        lo, hi = 0, len(grid) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if trial(mid)[1] <= x else (mid + 1, hi)
        return lo

    i_ok = first(args.eps)                 # the first candidate accepted without fine-tuning
    i_ft = first(args.ft_reach * args.eps)  # candidates i_ft..i_ok-1 are near enough for fine-tuning to rescue
    for i in list(range(i_ft, i_ok))[:args.ft_tries] + [i_ok]:
        k_t, e0 = trial(i)
        rec = next(r for r in info["trials"] if r["r"] == grid[i])
        e = finetune_or_restore(ctx, t, fit, held, with_layer(keep, t, k_t), args, args.seed + 1000 * t + grid[i],
                                bound=min(e0, args.eps), desc=f"layer {t} r={grid[i]} fine-tune")
        rec["E"] = round(e, 5)
        if e > min(e0, args.eps):                              # Alg. 1: a rejected fine-tune restored the block
            e = e0
        if e <= args.eps or i == len(grid) - 1:  # keeping every token changes nothing (float noise aside)
            info["trials"].sort(key=lambda r: r["r"])
            info.update(kept=int(k_t.numel()), E=round(e, 5))
            log(f"layer {t:2d}: keep {k_t.numel():3d}/{N} tokens, E = {e:.4f} (E0 = {e0:.4f}, eps = {args.eps})")
            return k_t, info
    raise AssertionError("unreachable: keeping every token reproduces the previous layer's accepted state")


@torch.no_grad()
def masks_for_counts(ctx, xs, counts, score="significance", seed=0):
    """Baseline masks with given kept-token counts |S_1|..|S_L|: top-down like Alg. 1 (each layer scored with
    the layers above already pruned), but each layer simply keeps its count of best-scoring patches, with no
    error test and no fine-tuning. score: a key of SCORES, or "random". xs: cached inputs of the blocks."""
    N, L = ctx.model.cfg.num_tokens, ctx.model.cfg.depth
    keep, g = [torch.arange(N)] * (L - 1) + [torch.tensor([0])], torch.Generator().manual_seed(seed)
    for t in range(L - 1, 0, -1):
        forced = keep[t]
        if score == "random":
            s = torch.rand(N, generator=g)
        else:
            s = layer_scores(ctx, xs[t - 1], with_layer(keep, t, torch.arange(N)), t, SCORES[score])
        cand = ranked_candidates(s, forced)
        keep[t - 1] = torch.cat([forced, cand[:max(0, counts[t - 1] - len(forced))]]).sort().values
    return keep


def cache_search_sets(ctx, train_aug, args, log):
    """The fit set (one augmented view of each image) and the held set (evaluation transform): disjoint random
    training images, chosen by args.seed; returns their dense caches (cache_dense) as (fit_cache, held_cache)."""
    cfg, t0 = ctx.model.cfg, time.time()
    train_eval = data.build_dataset(args.data_path, "train", cfg.img_size, train_transform=False)
    perm = torch.randperm(len(train_aug), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_fit, n_held = min(args.fit_images, len(perm) // 2), min(args.held_images, len(perm) // 2)
    fit_ds = torch.utils.data.Subset(train_aug, perm[:n_fit])
    held_ds = torch.utils.data.Subset(train_eval, perm[n_fit:n_fit + n_held])
    fit_cache = cache_dense(ctx, data.loader(fit_ds, args.batch_size, workers=args.workers, seed=args.seed), "cache fit")
    held_cache = cache_dense(ctx, data.loader(held_ds, args.batch_size, workers=args.workers), "cache held")
    log(f"cached dense activations of {n_fit} fit + {n_held} held images in {time.time() - t0:.0f}s")
    return fit_cache, held_cache


def search(ctx, fit_cache, held_cache, args, log, state_path=None, stop_after=None):
    """Algorithm 1: m_L = e_0 (METHOD.md I1), then t = L-1 ... 1. Resumes from state_path when it exists;
    stop_after (tests) stops after that many layers, as an interruption would."""
    m, L, N = ctx.model, ctx.model.cfg.depth, ctx.model.cfg.num_tokens
    state = {"keep": [torch.arange(N)] * (L - 1) + [torch.tensor([0])], "layers": [], "next": L - 1}
    if state_path and os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        m.load_state_dict(state["model"])
        log(f"resuming the search at layer {state['next']} from {state_path}")
    done = 0
    for t in range(state["next"], 0, -1):
        if stop_after is not None and done == stop_after:
            return None
        t0 = time.time()
        fit = (fit_cache[0][t - 1], fit_cache[1], fit_cache[2])
        held = (held_cache[0][t - 1], held_cache[1])
        k_t, info = search_layer(ctx, t, state["keep"], fit, held, args, log)
        info["seconds"] = round(time.time() - t0, 1)
        state["keep"][t - 1] = k_t
        state["layers"].append(info)
        state["next"] = t - 1
        state["model"] = m.state_dict()
        if state_path:
            torch.save(state, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)       # atomic: an interruption never corrupts it
        done += 1
    return state


# ----------------------------------------------------------------------------- evaluation and final fine-tune


@torch.no_grad()
def evaluate(model, loader, device, keep=None, desc="eval"):
    """Top-1 (%) of model with masks keep on loader."""
    model.eval()
    ctx = Ctx(model, device, 0)
    correct = total = 0
    for img, y in progress(loader, desc=desc):
        with ctx.autocast():
            out = model(img.to(device), keep=keep)
        correct += (out.argmax(-1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def final_loader(train_aug, args):
    """The shuffled training loader of the end-to-end fine-tune (args: batch_size, workers, seed)."""
    return data.loader(train_aug, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed, drop_last=True)


def finetune_all(student, teacher, keep, loader, device, epochs, lr, log):
    """Optional end-to-end fine-tune of the slimmed network with distillation from the dense one (METHOD.md I5)."""
    ctx = Ctx(student, device, 0)
    steps = max(1, int(epochs * len(loader)))
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar, step = progress(total=steps, desc="final fine-tune"), 0
    while step < steps:
        for img, _ in loader:
            img = img.to(device)
            with torch.no_grad(), ctx.autocast():
                f_t = teacher.forward_features(img).float()
            with ctx.autocast():
                f = student.forward_features(img, keep).float()
            loss = distill_loss(f, student.head(f), f_t, teacher.head(f_t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update()
            if step % max(1, steps // 10) == 0:  # progress in the log too, where no bar is drawn
                log(f"final fine-tune: step {step}/{steps}, loss {loss.item():.4f}")
            if step == steps:
                break
    bar.close()
    for p in student.parameters():
        p.requires_grad_(False)


# ----------------------------------------------------------------------------- CLI

# Defaults. The paper gives r0 = 10 of 197 tokens for ImageNet and no fine-tuning hyper-parameters (METHOD.md I5);
# for other datasets r0 scales with the token count (3 of 65 for the 32-px CIFAR-10 proxy).
DEFAULTS = dict(eps=0.2, r0=None, score="significance", score_images=512, fit_images=4096, held_images=1024,
                ft_steps=100, ft_lr=1e-3, ft_reach=1.5, ft_tries=2, quality_images=0, final_epochs=0.0, final_lr=2e-5)


def get_args_parser():
    p = argparse.ArgumentParser("Patch slimming (arXiv 2106.02852): top-down mask search for a DeiT", add_help=True)
    p.add_argument("--data", default="imagenet", choices=["imagenet", "folder"],
                   help="imagenet: DIR/{train,val}/<wnid>; folder: any ImageFolder tree DIR/{train,val}/<class>")
    p.add_argument("--data-path", default=None, help="dataset root holding train/ and val/")
    p.add_argument("--model", default=None, choices=list(vit.PRESETS),
                   help="architecture; default deit_small, or the --weights checkpoint's own")
    p.add_argument("--weights", default=None, help="checkpoint path or URL (default: the model's DeiT release)")
    p.add_argument("--out", default="results/run", help="output folder; a rerun with the same folder resumes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eps", type=float, help=f"tolerance on the relative feature error E, METHOD.md I4 ({DEFAULTS['eps']})")
    p.add_argument("--r0", type=int, help="search granularity in tokens (10 at 197 tokens, scaled by token count)")
    p.add_argument("--score", choices=list(SCORES), help="patch score: significance (the paper's, METHOD.md I3), "
                   "class-attn (EViT-like) or attn-flow (significance without its head-output factor)")
    p.add_argument("--score-images", type=int, help=f"training images the scores average over ({DEFAULTS['score_images']})")
    p.add_argument("--fit-images", type=int, help=f"cached augmented training images for fine-tuning ({DEFAULTS['fit_images']})")
    p.add_argument("--held-images", type=int, help=f"held training images E is measured on ({DEFAULTS['held_images']})")
    p.add_argument("--ft-steps", type=int, help=f"fine-tuning steps per candidate, block t only ({DEFAULTS['ft_steps']})")
    p.add_argument("--ft-lr", type=float, help=f"AdamW learning rate of those steps ({DEFAULTS['ft_lr']})")
    p.add_argument("--ft-reach", type=float, help=f"fine-tune a candidate only if E0 <= ft_reach*eps ({DEFAULTS['ft_reach']})")
    p.add_argument("--ft-tries", type=int, help=f"at most this many fine-tunes of rejected candidates per layer ({DEFAULTS['ft_tries']})")
    p.add_argument("--quality-images", type=int, help="held images for the score-quality measure per layer (0: off)")
    p.add_argument("--final-epochs", type=float, help="optional end-to-end distillation fine-tune after the search (0: off)")
    p.add_argument("--final-lr", type=float, help=f"its AdamW learning rate ({DEFAULTS['final_lr']})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="data loading processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-per-class", type=int, default=None, help="evaluate on the first k val images per class (quick runs)")
    p.add_argument("--eval-only", action="store_true", help="only measure top-1 and FLOPs (dense, or with --masks)")
    p.add_argument("--masks", default=None, help="masks.json for --eval-only (a slimmed checkpoint carries its own)")
    return p


def resolve(args):
    """Fill defaults and check the arguments: every bad input is a one-line UserError naming the fix."""
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.data_path:
        raise UserError("--data-path is required: the folder holding train/ and val/ (e.g. /data/imagenet)")
    if args.data == "folder" and not args.weights:
        raise UserError("--data folder needs --weights: a DeiT checkpoint trained on that dataset")
    if args.eps <= 0:
        raise UserError(f"--eps must be > 0 (got {args.eps}): it is the tolerated relative error of the final feature")
    if args.r0 is not None and args.r0 < 1:
        raise UserError(f"--r0 must be >= 1 (got {args.r0}): the number of tokens added per search step")
    for k in ("score_images", "fit_images", "held_images", "ft_steps", "batch_size"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1 (got {getattr(args, k)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but CUDA is not available here: use --device cpu")
    return args


def load_model(args):
    if args.weights:
        return vit.load_checkpoint(args.weights, expect=vit.PRESETS[args.model] if args.model else None)
    return vit.deit(args.model or "deit_small", pretrained=True)


def machine():
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(args):
    args = resolve(args)
    t_start = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = load_model(args).to(device)
    cfg = model.cfg
    if args.r0 is None:
        args.r0 = default_r0(cfg)
    val = data.build_dataset(args.data_path, "val", cfg.img_size)
    data.check_classes(val, cfg.num_classes)
    if args.val_per_class:
        val = data.subset(val, per_class=args.val_per_class)
    val_loader = data.loader(val, args.batch_size, workers=args.workers)
    keep = vit.load_masks(args.masks, cfg) if args.masks else model.keep
    if not args.eval_only:  # the training split feeds scores, fine-tuning and the error E
        train_aug = data.build_dataset(args.data_path, "train", cfg.img_size)
        data.check_classes(train_aug, cfg.num_classes)
    os.makedirs(args.out, exist_ok=True)  # only once the inputs are known to be good
    logf = open(os.path.join(args.out, "eval.log" if args.eval_only else "log.txt"), "a")

    def log(msg):
        tqdm.write(msg)
        logf.write(msg + "\n")
        logf.flush()

    log(f"slim.py {' '.join(sys.argv[1:])}\nconfiguration: {json.dumps(vars(args))}\nmodel: {cfg}")
    dense_flops = flops.count_flops(cfg)

    if args.eval_only:
        top1, gf = evaluate(model, val_loader, device, keep), flops.count_flops(cfg, keep) / 1e9
        log(f"top-1 {top1:.2f}% on {len(val)} {args.data} val images, {gf:.2f} GFLOPs "
            f"(dense {dense_flops / 1e9:.2f}), tokens kept per layer {flops.kept_counts(cfg, keep)}")
        return {"top1": top1, "gflops": gf}

    state_path = os.path.join(args.out, "state.pt")
    report_path = os.path.join(args.out, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else {}
    if "dense_top1" not in report:
        report["dense_top1"] = evaluate(model, val_loader, device, desc="eval dense")
        json.dump(report, open(report_path, "w"), indent=1)
    log(f"dense: top-1 {report['dense_top1']:.2f}%, {dense_flops / 1e9:.3f} GFLOPs")

    ctx = Ctx(model, device, args.batch_size)
    fit_cache, held_cache = cache_search_sets(ctx, train_aug, args, log)
    resumed = os.path.exists(state_path)
    state = search(ctx, fit_cache, held_cache, args, log, state_path)
    keep = state["keep"]
    del fit_cache, held_cache

    report.update(searched_top1=None)
    if args.final_epochs > 0:
        report["searched_top1"] = evaluate(model, val_loader, device, keep, desc="eval searched")
        log(f"after the search (per-layer fine-tuning only): top-1 {report['searched_top1']:.2f}%")
        teacher = load_model(args).to(device)
        finetune_all(model, teacher, keep, final_loader(train_aug, args), device, args.final_epochs, args.final_lr, log)
    top1 = evaluate(model, val_loader, device, keep, desc="eval slimmed")
    slim_flops = flops.count_flops(cfg, keep)
    name = args.model or next((k for k, c in vit.PRESETS.items() if c == cfg), None)
    vit.save_masks(os.path.join(args.out, "masks.json"), keep, cfg, name=name)
    torch.save({"model": model.state_dict(), "config": vit.asdict(cfg), "keep": [k.tolist() for k in keep]},
               os.path.join(args.out, "slimmed.pth"))
    report.update({
        "slimmed_top1": top1, "dense_gflops": dense_flops / 1e9, "slimmed_gflops": slim_flops / 1e9,
        "flops_reduction": 1 - slim_flops / dense_flops, "kept_per_layer": flops.kept_counts(cfg, keep),
        "layers": state["layers"], "wall_seconds": round(time.time() - t_start, 1), "resumed": resumed,
        "val_images": len(val), "args": vars(args), "machine": machine(), "flops_note": flops.NOT_COUNTED})
    json.dump(report, open(report_path, "w"), indent=1)
    log(f"slimmed: top-1 {top1:.2f}% (dense {report['dense_top1']:.2f}%), {slim_flops / 1e9:.3f} GFLOPs "
        f"(dense {dense_flops / 1e9:.3f}, {100 * report['flops_reduction']:.1f}% fewer); "
        f"kept per layer {report['kept_per_layer']}; wrote {args.out}/masks.json, slimmed.pth, report.json")
    return report


def cli(argv=None):
    try:
        return main(get_args_parser().parse_args(argv))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
