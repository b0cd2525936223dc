"""
DPS-ViT, the paper's dynamic variant (Tang et al., "Patch Slimming for Efficient Vision Transformers", CVPR 2022,
arXiv 2106.02852, Sec. 4.4; method.md P6, C8), made from a finished static run (PS-ViT) of slim.py:

    python slim.py --dynamic --from OUT [--final-epochs E ...]   # -> OUT/dynamic.pth, dynamic.json (docs/dynamic.md)
    python slim.py --eval-only --weights OUT/dynamic.pth --data folder --data-path DIR   # top-1, FLOPs with G

Each image chooses its own patches: layer t keeps the prefix tokens and the n_t - P patches that a small predictor
G_t (slim.Predictor) ranks highest among those layer t-1 updated (slim.dynamic_choice), the counts n_t fixed per
layer (C8: the static masks' by default, or scaled to a FLOPs ratio). The stages, each resumable from what --out
holds, each under torchrun as the static run's (pipeline/distributed.py):
1. the dense caches of the static model's weights on the fit and held training images (pipeline/caches.py);
2. for t = L-1 .. 1, the layers with a G (top-down, as Alg. 1): the per-image Eq. 6 targets (dynamic_targets: layer
   t updating every row, layers t+1..L pruned per image by their G, already fitted), G_t fitted to them
   (slim.top_k_listmle), and its ranking on the held images -> dynamic_state.pt after each layer;
3. the final fine-tune of the network with G in place and frozen, on a fixed top-k ([C]: no straight-through, so G
   stays the Eq. 6 predictor P6 describes), with the static run's recipe (pipeline/finetune.py, C7) unless flags
   override it -> dynamic_finetune.pt;
4. top-1 of the static model, of G in place before and after the fine-tune on the same val images, FLOPs with G
   -> dynamic.pth, dynamic.json, dynamic_predictions.npz, dynamic_log.txt.
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import data
import flops
import slim
import vit
from pipeline import distributed, finetune, flags
from pipeline.caches import cache_plan, cache_search_sets, search_set_sizes
from pipeline.evaluate import autocast, save_predictions
from pipeline.resume import load_if_made_with, write_atomically
from pipeline.run import Run
from vit import UserError


@dataclass
class DynamicSettings:
    """What decides the predictors: saved in dynamic_state.pt, and a resume with other values is refused."""
    counts: list              # kept tokens n_1..n_L of every image (C8: the static masks', scaled by flops_ratio)
    tokens: str = "frozen"    # token semantics, the static run's: "frozen" (P1) or "removed" (C1)
    flops_ratio: float = 1.0  # counts scaled so that the FLOPs, G included, are this fraction of the static model's
    width: int = 0            # G's hidden width (0: d/8)
    steps: int = 300          # AdamW steps fitting each G_t (cosine schedule), on batches of batch_size fit images
    #                           (at most the fit images there are)
    lr: float = 1e-3          # their learning rate (weight decay 0.05)
    fit_images: int = 4096    # cached augmented training images the targets and the fit draw from
    held_images: int = 1024   # held training images (eval transform) the ranking quality is measured on
    batch_size: int = 64      # images per step of caching, targets and fitting
    seed: int = 0             # chooses the fit/held images and seeds the fit


class DynamicSlimmed(nn.Module):
    """DPS-ViT (P6, C8): the ViT `model` in which each image chooses its own patches, by slim.dynamic_choice with the
    slim.Predictor G_t of each layer that holds one (slim.predicted_layers). counts: n_1..n_L, fixed per layer, so
    batches stay rectangular and the FLOPs are known (flops.count_flops with predictor_width). tokens: "frozen" (P1)
    or "removed" (C1), as vit.py's."""

    def __init__(self, model, counts, tokens="frozen", width=0):
        super().__init__()
        cfg, counts = model.cfg, [int(n) for n in counts]
        bounds = zip(counts, [cfg.num_tokens] + counts)  # each count between P and the layer before's (n_0 = N)
        if len(counts) != cfg.depth or any(not cfg.prefix_tokens <= n <= m for n, m in bounds):
            raise UserError(f"DPS-ViT counts {counts} do not fit the model: give {cfg.depth} non-increasing counts "
                            f"between the {cfg.prefix_tokens} prefix tokens and the {cfg.num_tokens} tokens")
        self.vit, self.cfg, self.counts, self.tokens = model, cfg, counts, vit.check_tokens(tokens)
        self.width = width or max(1, cfg.embed_dim // 8)
        self.predictors = nn.ModuleDict({str(t): slim.Predictor(cfg.embed_dim, self.width)
                                         for t in slim.predicted_layers(cfg, counts)})

    def run_blocks(self, x, start=1, maps=None):
        """Blocks start..L on x (B, N, d), the input of block `start`, every row a candidate. With maps (a list, filled
        with each block's vit.AttentionMap), layer `start` updates every row, as Alg. 1 scores a layer
        (dynamic_targets). Returns (x, keep), keep[t - start] the (B, n_t) indices of each image's m_t (vit.py's
        per-image masks)."""
        n_prefix, N, frozen = self.cfg.prefix_tokens, self.cfg.num_tokens, self.tokens == "frozen"
        prev, keep = torch.arange(N, device=x.device).expand(x.shape[0], -1), []  # m_{t-1}: every row at first
        for t in range(start, self.cfg.depth + 1):
            n = prev.shape[1] if maps is not None and t == start else self.counts[t - 1]
            if n_prefix < n < prev.shape[1]:  # G_t chooses among m_{t-1}'s patches
                pos = slim.dynamic_choice(self.predictors[str(t)], x, prev, n, n_prefix, self.tokens)
            else:                      # every row of m_{t-1}, or the prefix tokens alone: nothing to choose
                pos = torch.arange(n, device=x.device).expand(x.shape[0], -1)
            k = prev.gather(1, pos)    # m_t, sorted global indices per image
            idx = (None if n == N else k) if frozen else (None if n == prev.shape[1] else pos)
            if maps is None:
                x = self.vit.blocks[t - 1](x, idx, self.tokens)
            else:
                x, attn = self.vit.blocks[t - 1].forward_with_map(x, idx, self.tokens)
                maps.append(vit.AttentionMap(attn, k, torch.arange(N) if frozen else prev))
            keep.append(k)
            prev = k
        return x, keep

    def forward_features(self, img, keep=None, tokens=None):
        """(B, prefix tokens, d), as the ViT's. The images choose their masks: keep must be None and tokens None or
        the model's (pipeline/finetune.py and evaluate.py call this model as they call a slimmed ViT)."""
        if keep is not None or tokens not in (None, self.tokens):
            raise UserError(f"a DPS-ViT chooses its own masks under tokens={self.tokens!r}: pass no masks, and no "
                            "other --tokens")
        return self.vit.features(self.run_blocks(self.vit.embed(img))[0])

    def classify(self, f):
        return self.vit.classify(f)

    def forward(self, img, keep=None, tokens=None):
        return self.classify(self.forward_features(img, keep, tokens))

    def checkpoint(self, **extra):
        """What dynamic.pth holds: the ViT as vit.read_checkpoint reads it, and "dynamic": counts, tokens and G."""
        return {"model": self.vit.state_dict(), "config": asdict(self.cfg), **extra, "dynamic": {
            "counts": self.counts, "tokens": self.tokens, "width": self.width,
            "predictors": self.predictors.state_dict()}}

    @classmethod
    def from_checkpoint(cls, model, info):
        """The DPS-ViT of what vit.read_checkpoint read from a checkpoint() file: the ViT and its info.dynamic."""
        d = info.dynamic
        dyn = cls(model, d["counts"], d["tokens"], d["width"])
        try:
            dyn.predictors.load_state_dict(d["predictors"])
        except RuntimeError as e:
            raise UserError(f"the checkpoint's predictors do not fit its counts ({str(e).splitlines()[0][:120]}): "
                            "pass a dynamic.pth written by slim.py --dynamic")
        return dyn.to(slim.device_of(model)).eval()


@torch.no_grad()
def dynamic_targets(dyn, z_in, t):
    """The per-image Eq. 6 scores G_t is fitted to (P3 with C3a; P6: "s_l calculated for each input instance", not
    averaged over images): z_in (B, N, d) is Z_{t-1}, layer t updates every row (as Alg. 1 scores a layer: layers
    1..t dense), and layers t+1..L are pruned per image by their own G, as they will be at inference. (B, N)."""
    maps, z = [], z_in.to(slim.device_of(dyn))
    with autocast(slim.device_of(dyn)):
        dyn.run_blocks(z, t, maps)
        return slim.significance_score(maps, z)


def top_k_recall(s_hat, s, k):
    """The share of the k best patches by s (exact) that the k best by s_hat (predicted) find, per row: (B,)."""
    hit = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(k, dim=1).indices, True)
    return hit.gather(1, s_hat.topk(k, dim=1).indices).double().mean(1)


@torch.no_grad()
def ranking_quality(dyn, t, z_in, batch_size):
    """How well G_t ranks the patches of images z_in (their Z_{t-1}, every patch a candidate): mean Spearman of ŝ
    against the exact per-image s (dynamic_targets), and mean top-k recall (k = n_t - n_prefix), over every rank's images."""
    n_prefix, k, device = dyn.cfg.prefix_tokens, dyn.counts[t - 1] - dyn.cfg.prefix_tokens, slim.device_of(dyn)
    total = torch.zeros(3, dtype=torch.float64)  # rho sum, recall sum, images
    for i in range(0, len(z_in), batch_size):
        z = z_in[i:i + batch_size].to(device)
        s = dynamic_targets(dyn, z, t)[:, n_prefix:]
        with autocast(device):
            s_hat = dyn.predictors[str(t)](z[:, n_prefix:]).float()
        total += torch.tensor([slim.spearman(s_hat, s).sum().item(), top_k_recall(s_hat, s, k).sum().item(), len(z)],
                              dtype=torch.float64)
    total = distributed.all_reduce_sum(total)
    return {"spearman": round((total[0] / total[2]).item(), 4), "top_k_recall": round((total[1] / total[2]).item(), 4)}


def fit_predictor(dyn, t, fit, held, settings, log):
    """Fit G_t to the per-image Eq. 6 targets of the fit images (fit, held: DenseCaches; settings: DynamicSettings)
    with slim.top_k_listmle, k = n_t - n_prefix: settings.steps AdamW steps with a cosine schedule, taken under
    torchrun as the search's block fine-tunes (slim.finetune_block) take theirs, by pipeline/distributed.py's
    data_parallel_steps. Returns the layer's record."""
    t0, device, n_prefix = time.time(), slim.device_of(dyn), dyn.cfg.prefix_tokens
    k, z_fit, G = dyn.counts[t - 1] - n_prefix, fit.z[t - 1], dyn.predictors[str(t)]
    targets = torch.cat([dynamic_targets(dyn, z_fit[i:i + settings.batch_size], t).cpu()
                         for i in range(0, len(z_fit), settings.batch_size)] or [torch.zeros(0, dyn.cfg.num_tokens)])
    G.requires_grad_(True)
    opt = torch.optim.AdamW(G.parameters(), lr=settings.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)

    def loss_of(mine):  # the top-k ListMLE of the drawn images mine, summed over them
        with autocast(device):
            s_hat = G(z_fit[mine].to(device)[:, n_prefix:]).float()
        return slim.top_k_listmle(s_hat, targets[mine][:, n_prefix:].to(device), k) * len(mine)
    try:
        losses = distributed.data_parallel_steps(loss_of, opt, sched, settings.steps, fit.positions,
                                                 settings.batch_size, settings.seed + 1000 * t, f"fit G_{t}")
    except FloatingPointError:
        raise UserError(f"the fit of G_{t} produced a non-finite loss: lower --predictor-lr") from None
    G.requires_grad_(False)
    info = {"layer": t, "kept": dyn.counts[t - 1], "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            **ranking_quality(dyn, t, held.z[t - 1], settings.batch_size), "seconds": round(time.time() - t0, 1)}
    log(f"G_{t}: keep {info['kept']} tokens; top-k ListMLE {info['loss_first']:.3f} -> {info['loss_last']:.3f}; on the "
        f"held images Spearman {info['spearman']:.3f} against the exact per-image Eq. 6, top-{k} recall "
        f"{info['top_k_recall']:.3f}")
    return info


def fit_predictors(dyn, fit_cache, held_cache, settings, state_path, made_with, log):
    """Stage 2: the predictors top-down (t = L-1 .. 1, as Alg. 1, so that layers t+1..L are pruned by their fitted G
    when layer t's targets are computed), resuming from state_path. Returns the per-layer records."""
    layers = sorted(slim.predicted_layers(dyn.cfg, dyn.counts), reverse=True)
    state = {"settings": made_with, "next": layers[0] if layers else 0, "layers": []}
    saved = load_if_made_with(state_path, made_with, "a predictor fit")
    if saved:
        state = saved
        dyn.predictors.load_state_dict(state["predictors"])
        log(f"resuming the predictor fit at layer {state['next']} from {state_path}" if state["next"] else
            f"the predictor fit in {state_path} is complete")
    for t in [t for t in layers if t <= state["next"]]:
        state["layers"].append(fit_predictor(dyn, t, fit_cache, held_cache, settings, log))
        state["next"] = max([u for u in layers if u < t], default=0)
        state["predictors"] = dyn.predictors.state_dict()
        if distributed.is_main():
            write_atomically(state_path, state)
    dyn.predictors.requires_grad_(False)
    return state["layers"]


# ----------------------------------------------------------------------------- the CLI's --dynamic (slim.py)

def add_arguments(parser):
    """slim.py's flags of DPS-ViT; --fit-images, --held-images, --batch-size, --seed and the --final-* flags serve it
    too."""
    d = DynamicSettings(counts=[])
    p = parser.add_argument_group("DPS-ViT, the dynamic variant (Sec. 4.4, method.md P6/C8; pipeline/dynamic.py)")
    p.add_argument("--dynamic", action="store_true", help="make the dynamic variant of the static run --from OUT: "
                   "fit the predictors G, then the final fine-tune (the static run's recipe unless flags override it)")
    p.add_argument("--from", dest="dynamic_from", default=None, metavar="OUT", help="a finished static run's folder "
                   "(report.json, masks.json, slimmed.pth); its data, weights and --out are the defaults")
    p.add_argument("--flops-ratio", type=flags.number(float, 0, 1, low_open=True), default=d.flops_ratio, help="scale the static counts so that the "
                   "FLOPs, G included, are this fraction of the static model's (the paper's DeiT-S: 2.4/2.6)")
    p.add_argument("--predictor-width", type=flags.non_negative_int, default=d.width, help="G's hidden width (0: embed_dim / 8)")
    p.add_argument("--predictor-steps", type=flags.count, default=d.steps, help="AdamW steps fitting each G_t")
    p.add_argument("--predictor-lr", type=flags.positive, default=d.lr, help="their learning rate")


def complete_args(args, parser):
    """--dynamic --from OUT: check OUT holds a finished static run; its data, weights and normalisation become the
    defaults of the flags not given, and OUT the default --out."""
    if not (args.dynamic and args.dynamic_from):
        raise UserError("--dynamic needs --from OUT, and --from needs --dynamic: OUT is the folder of a finished "
                        "static run (python slim.py ... --out OUT)")
    if args.eval_only:
        raise UserError("--eval-only takes the dynamic model itself: --eval-only --weights OUT/dynamic.pth")
    for name in ("report.json", "masks.json", "slimmed.pth"):
        if not os.path.isfile(os.path.join(args.dynamic_from, name)):
            raise UserError(f"--from {args.dynamic_from} has no {name}: pass the folder of a finished static run "
                            "(python slim.py ... --out OUT writes report.json, masks.json and slimmed.pth)")
    static = read_report(args.dynamic_from).get("args", {})
    if args.data_path is None:
        args.data, args.data_path = static.get("data", args.data), static.get("data_path")
    for name in ("weights", "model", "mean", "std"):
        if getattr(args, name) is None:
            setattr(args, name, static.get(name))
    if args.out == parser.get_default("out"):
        args.out = args.dynamic_from


def read_report(folder):
    with open(os.path.join(folder, "report.json")) as f:
        return json.load(f)


def main(args, model, info):
    """slim.py's entry for DPS-ViT: --eval-only of a dynamic.pth, or the dynamic run (--dynamic --from OUT; model is
    then the dense network of the static run, the fine-tune's teacher)."""
    if info.dynamic is not None and not args.eval_only:
        raise UserError(f"--weights {args.weights} is a DPS-ViT checkpoint: evaluate it with --eval-only; a search or "
                        "a dynamic run starts from a static model")
    return evaluate_only(args, model, info) if args.eval_only else make_dynamic(args, model, info)


def evaluate_only(args, model, info):
    """--eval-only --weights OUT/dynamic.pth: top-1 on val and FLOPs with G, to OUT/eval.json."""
    if args.masks:
        raise UserError(f"--weights {args.weights} is a DPS-ViT checkpoint, whose images choose their own masks: "
                        "drop --masks")
    dyn = DynamicSlimmed.from_checkpoint(model, info)
    if args.tokens not in (None, dyn.tokens):
        raise UserError(f"--weights {args.weights} is a DPS-ViT fitted and fine-tuned under tokens={dyn.tokens!r}: "
                        "drop --tokens (its predictors were fitted to that semantics)")
    run = Run(args)
    val = run.val_dataset(dyn.cfg, info.classes)
    with run.open_log("eval.log", model, info) as log:
        top1, _, labels = run.evaluate(dyn, val, None, dyn.tokens, "eval DPS-ViT")
        result = {"top1": top1, **flops_of(dyn), "val_images": len(labels), "val_files": len(val),
                  "weights": args.weights, **run.skipped(), "processes": distributed.world_size(),
                  "machine": distributed.machine()}
        if distributed.is_main():
            write_atomically(os.path.join(args.out, "eval.json"), result)
        log(f"DPS-ViT: top-1 {top1:.2f}% on {len(labels)} {args.data} val images, {result['gflops']:.4f} GFLOPs with "
            f"its predictors ({result['predictor_gflops']:.4f}) counted as {dyn.tokens} (dense "
            f"{result['dense_gflops']:.3f}), tokens kept per layer {dyn.counts}; wrote {args.out}/eval.json")
    return result


def flops_of(dyn):
    """GFLOPs of a DPS-ViT, predictors included (flops.py), and of its parts."""
    cfg = dyn.cfg
    return {"gflops": flops.count_flops(cfg, counts=dyn.counts, tokens=dyn.tokens, predictor_width=dyn.width) / 1e9,
            "predictor_gflops": sum(flops.predictor_flops(cfg, dyn.counts, dyn.width)) / 1e9,
            "dense_gflops": flops.count_flops(cfg) / 1e9, "tokens": dyn.tokens, "kept_per_layer": dyn.counts,
            "predictor_width": dyn.width}


def settings_from_args(args, static, static_report):
    """The DynamicSettings and the final fine-tune's settings of a dynamic run from the static model and its report:
    the static counts, or, with --flops-ratio, counts scaled so that the FLOPs with G are that fraction of the
    static model's; the static run's recipe unless flags override it. Also returns the note on --tokens, if any."""
    cfg = static.cfg
    tokens, note = vit.resolve_tokens(static.tokens, args.tokens, f"{args.dynamic_from}/slimmed.pth")
    static_counts = flops.kept_counts(cfg, static.keep)
    width = args.predictor_width or max(1, cfg.embed_dim // 8)
    counts = static_counts if args.flops_ratio == 1 else flops.scaled_counts(
        cfg, static_counts, args.flops_ratio * flops.count_flops(cfg, static.keep, tokens=tokens), tokens, width)
    settings = DynamicSettings(counts=counts, tokens=tokens, flops_ratio=args.flops_ratio, width=width,
                        steps=args.predictor_steps, lr=args.predictor_lr, fit_images=args.fit_images,
                        held_images=args.held_images, batch_size=args.batch_size, seed=args.seed)
    ft = finetune.settings_from_args(args, base=finetune.FinetuneSettings(**static_report["final_finetune"]))
    return settings, ft, note


def fit_stage(run, dyn, settings, classes):
    """Stage 2: the dense caches of the fit and held images (skipped when the saved fit is complete), then every
    G_t fitted top-down, resumable. classes: the static checkpoint's class names. Returns the per-layer records."""
    args, cfg, state_path = run.args, dyn.cfg, run.paths["state"]
    saved = load_if_made_with(state_path, run.identity, "a predictor fit")
    fit_cache = held_cache = None
    if not saved or saved["next"] > 0:
        train = run.dataset("train", cfg)
        data.check_classes(train, cfg.num_classes, classes)
        n_fit, n_held = search_set_sizes(settings, len(train))
        cache_device, plan = cache_plan(cfg, -(-(n_fit + n_held) // distributed.world_size()),
                                        slim.device_of(dyn), args.cache_device)
        run.log(plan)
        fit_cache, held_cache = cache_search_sets(dyn.vit.eval(), train, args.data_path, settings, args.workers,
                                                  run.log, cache_device)
    return fit_predictors(dyn, fit_cache, held_cache, settings, state_path, run.identity, run.log)


def make_dynamic(args, teacher, teacher_info):
    """Stages 1-4 of the module docstring. teacher: the static run's dense network (teacher_info: its checkpoint's)."""
    t_start, device, is_main = time.time(), slim.device_of(teacher), distributed.is_main()
    static, static_info = vit.read_checkpoint(os.path.join(args.dynamic_from, "slimmed.pth"))
    static.to(device)
    if static.keep is None:
        raise UserError(f"{args.dynamic_from}/slimmed.pth carries no masks: pass a static run's folder")
    cfg, static_report = static.cfg, read_report(args.dynamic_from)
    settings, ft, note = settings_from_args(args, static, static_report)
    counts, tokens, width = settings.counts, settings.tokens, settings.width
    static_counts = flops.kept_counts(cfg, static.keep)
    static_flops = flops.count_flops(cfg, static.keep, tokens=tokens)
    made_with = {**asdict(settings), "from": os.path.abspath(args.dynamic_from), "data_path": os.path.abspath(args.data_path)}
    run = Run(args, {k: os.path.join(args.out, f) for k, f in (
        ("state", "dynamic_state.pt"), ("finetune", "dynamic_finetune.pt"), ("report", "dynamic.json"),
        ("predictions", "dynamic_predictions.npz"))}, made_with)
    paths = run.paths
    # a resume with other settings is refused here, before any work
    load_if_made_with(paths["state"], made_with, "a predictor fit")
    if ft.epochs > 0:
        load_if_made_with(paths["finetune"], {**asdict(ft), "dynamic": made_with}, "a final fine-tune")
    dyn = DynamicSlimmed(copy.deepcopy(static), counts, tokens, width).to(device)  # static: evaluated as it is
    val = run.val_dataset(cfg, static_info.classes)
    with run.open_log("dynamic_log.txt", teacher, teacher_info) as log:
        if note:
            log(note)
        log(f"DPS-ViT from {args.dynamic_from}: counts {counts} (static {static_counts}), tokens {tokens}, G width "
            f"{width} at layers {slim.predicted_layers(cfg, counts)}\nfit settings: {json.dumps(asdict(settings))}\n"
            f"final fine-tune settings: {json.dumps(asdict(ft))}")
        layers = fit_stage(run, dyn, settings, static_info.classes)
        report = {"static_top1": None, "fitted_top1": None}
        report["static_top1"], static_preds, labels = run.evaluate(static, val, static.keep, tokens, "static")
        report["fitted_top1"], fitted_preds, _ = run.evaluate(dyn, val, None, tokens, "G in place")
        log(f"static (PS-ViT): top-1 {report['static_top1']:.2f}%; G in place before the fine-tune: "
            f"{report['fitted_top1']:.2f}%")
        if ft.epochs > 0:
            train_ft = run.dataset("train", cfg, randaugment=ft.randaugment, erase=ft.erase)
            finetune.finetune(dyn, teacher if ft.distill != "none" else None, None, tokens,
                              finetune.Schedule(train_ft, ft, cfg, args.workers), log,
                              finetune.Checkpoint(paths["finetune"], {"dynamic": made_with}), frozen=dyn.predictors)
        top1, preds, labels = run.evaluate(dyn, val, None, tokens, "DPS-ViT")
        report.update({"dynamic_top1": top1, **flops_of(dyn), "static_gflops": static_flops / 1e9,
                       "static_kept_per_layer": static_counts, "layers": layers, "val_images": len(labels),
                       "settings": asdict(settings), "final_finetune": asdict(ft), "from": args.dynamic_from,
                       "static_report_top1": static_report.get("slimmed_top1"), **run.skipped(),
                       "wall_seconds": round(time.time() - t_start, 1), "processes": distributed.world_size(),
                       "args": vars(args), "machine": distributed.machine(), "flops_note": flops.NOT_COUNTED})
        if is_main:
            save_predictions(paths["predictions"], labels=labels, static=static_preds, fitted=fitted_preds,
                             dynamic=preds)
            write_atomically(os.path.join(args.out, "dynamic.pth"), dyn.checkpoint(classes=static_info.classes))
            write_atomically(paths["report"], report)
        log(f"DPS-ViT: top-1 {top1:.2f}% (static {report['static_top1']:.2f}%), {report['gflops']:.4f} GFLOPs with "
            f"its predictors ({report['predictor_gflops']:.4f}) counted as {tokens} (static {static_flops / 1e9:.4f}, "
            f"dense {report['dense_gflops']:.3f}); kept per layer {counts}; wrote {args.out}/dynamic.pth, "
            "dynamic.json, dynamic_predictions.npz")
    return report
