"""
What `python slim.py` runs (Tang et al., "Patch Slimming for Efficient Vision Transformers", CVPR 2022,
arXiv 2106.02852), in the order it runs it; the method itself is in slim.py.

- evaluate_only (--eval-only): top-1 and FLOPs of a dense model, a slimmed checkpoint or a masks file -> eval.json.
- search_and_finetune: the dense model's top-1, the dense caches, Algorithm 1 (slim.search), the searched model's
  top-1, the final fine-tune (C7, pipeline/finetune.py), the slimmed model's top-1 -> masks.json, slimmed.pth,
  report.json, predictions.npz. Every stage resumes from what --out holds.
Each path makes one Run, which its stages take: the flags, the files in --out, the log and the registry of the image
files skipped (--skip-bad-images). Only rank 0 writes files and logs; under torchrun every rank runs the same steps (pipeline/distributed.py).
"""
import json
import os
import time
from dataclasses import asdict, fields, replace

from tqdm import tqdm

import data
import flops
import slim
import vit
from pipeline import distributed, finetune
from pipeline.caches import cache_plan, cache_search_sets, search_set_sizes
from pipeline.evaluate import accuracy, predict, save_predictions
from pipeline.resume import load_if_made_with, write_atomically
from vit import UserError


class RunLog:
    """Rank 0's log: each message to the terminal and appended to a file. Other ranks write nothing. Use it in a
    `with` block, which closes the file."""

    def __init__(self, path):
        self.file = open(path, "a") if distributed.is_main() else None

    def __call__(self, msg):
        if self.file is not None:
            tqdm.write(msg)
            self.file.write(msg + "\n")
            self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


class Run:
    """What the stages of one run of slim.py share, made once: the flags (args), the files in --out (paths: name ->
    path), what identifies the run besides its settings (identity: compared on resume), rank 0's log once opened
    (open_log), and the registry of unusable image files (bad: data.BadFiles, skipping them under --skip-bad-images),
    which every dataset the run builds hands them to, so that the log and report count each file skipped."""

    def __init__(self, args, paths=None, identity=None):
        self.args, self.paths, self.identity = args, paths or {}, identity or {}
        self.bad, self.log = data.BadFiles(skip=args.skip_bad_images), None

    def open_log(self, name, model, info):
        """The run's log in --out (created only now that the inputs are known to be good), started with the command,
        the configuration, the model, the processes and the input normalisation (info: its vit.CheckpointInfo)."""
        args = self.args
        if distributed.is_main():
            os.makedirs(args.out, exist_ok=True)
        self.log = log = RunLog(os.path.join(args.out, name))
        world, device = distributed.world_size(), slim.device_of(model)
        group = f"torchrun, {'nccl' if device.type == 'cuda' else 'gloo'}" if world > 1 else "no process group"
        log(f"{getattr(args, 'command', 'python slim.py')}\nconfiguration: {json.dumps(vars(args))}\n"
            f"model: {model.cfg}\nprocesses: {world} (world size; {group}), device {device}, {args.workers} data "
            "workers each")
        log(info.normalisation)
        return log

    def dataset(self, split, cfg, **transform):
        """data.build_dataset of --data-path's split for a model of config cfg (its image size and normalisation;
        transform: build_dataset's train_transform, randaugment, erase), its unusable files going to the run's
        registry."""
        ds = data.build_dataset(self.args.data_path, split, cfg.img_size, mean=cfg.mean, std=cfg.std, **transform)
        ds.bad = self.bad
        return ds

    def val_dataset(self, cfg, model_classes=None):
        """The val split, checked against the model's classes and train/'s (--val-per-class: the first k images per
        class). model_classes: the class names a slimmed checkpoint carries."""
        val = self.dataset("val", cfg)
        data.check_classes(val, cfg.num_classes, model_classes)
        per_class = self.args.val_per_class
        return data.subset(val, per_class=per_class) if per_class else val

    def evaluate(self, model, val, keep, tokens, name):
        """Top-1 on val, and the per-image predictions and labels (in val order, gathered from every rank)."""
        preds, labels = predict(model, val, keep, tokens, self.args.batch_size, self.args.workers, desc=f"eval {name}")
        return accuracy(preds, labels), preds, labels

    def skipped(self):
        """The unusable files (unreadable, or of another size than a small model's) skipped by every rank
        (--skip-bad-images), logged and returned for the JSON files."""
        paths = sorted(set().union(*distributed.all_gather(set(self.bad.paths))))
        if paths:
            self.log(f"skipped {len(paths)} image files (--skip-bad-images), e.g. {paths[0]}: "
                     f"{self.bad.paths.get(paths[0], '')}")
        return {"skipped_images": len(paths), "skipped_files": paths[:20]}


def load_model(args):
    """(model, vit.CheckpointInfo) of --weights, or of --model's release (default DeiT-S), with --mean/--std (when
    given) as its input normalisation."""
    name = args.model or "deit_small"
    expect = vit.PRESETS[args.model] if args.model else None if args.weights else vit.PRESETS[name]
    model, info = vit.read_checkpoint(args.weights or vit.RELEASE_URLS[name], expect=expect)
    if args.mean or args.std:
        model.cfg = replace(model.cfg, mean=args.mean or model.cfg.mean, std=args.std or model.cfg.std)
        info.normalisation = f"input normalisation mean {model.cfg.mean}, std {model.cfg.std}: from --mean/--std"
    return model, info


def settings_from_args(args, cfg):
    """The SearchSettings of parsed CLI args, with the defaults that depend on the model filled in (tokens: the
    paper's "frozen"; r_step: default_r_step)."""
    settings = slim.SearchSettings(**{f.name: getattr(args, f.name) for f in fields(slim.SearchSettings)})
    patches = cfg.num_tokens - cfg.prefix_tokens
    if args.r_step is not None and args.r_step > patches:
        raise UserError(f"--r-step {args.r_step} is more than the model's {patches} patches: give r' in [1, {patches}]")
    settings.tokens, settings.r_step = args.tokens or "frozen", args.r_step or slim.default_r_step(cfg)
    return settings


def run_identity(args):
    """What besides the settings identifies a search (saved in its state, compared on resume): weights and data."""
    return {"weights": args.weights or f"release {args.model or 'deit_small'}", "data_path": os.path.abspath(args.data_path)}


def finetune_identity(keep, tokens, run_id):
    """What besides its settings identifies a final fine-tune (compared on resume): the masks, weights and data."""
    return {"keep": [k.tolist() for k in keep], "tokens": tokens, **run_id}


def masks_to_run(args, model):
    """(keep, tokens, note) a measured or exported model runs: a slimmed checkpoint's own masks, or --masks with a
    dense one (both at once is an error), under their semantics unless --tokens asks otherwise (note says so)."""
    keep, found, source = model.keep, model.tokens or "frozen", args.weights
    if args.masks and model.keep is not None:
        raise UserError(f"--weights {args.weights} is a slimmed checkpoint with its own masks, and --masks "
                        f"{args.masks} would replace them: drop --masks, or pass the dense checkpoint with --masks")
    if args.masks:
        (keep, found), source = vit.load_masks(args.masks, model.cfg), args.masks
    return (keep, *vit.resolve_tokens(found, args.tokens, source))


def evaluate_only(args, model, info):
    """--eval-only: top-1 on val and FLOPs of the model as loaded (dense, or a slimmed checkpoint's masks), or with
    --masks; written to OUT/eval.json."""
    cfg, run = model.cfg, Run(args)
    val = run.val_dataset(cfg, info.classes)
    keep, tokens, note = masks_to_run(args, model)
    with run.open_log("eval.log", model, info) as log:
        if note:
            log(note)
        top1, _, labels = run.evaluate(model, val, keep, tokens, "eval")
        gf, dense_gf = flops.count_flops(cfg, keep, tokens=tokens) / 1e9, flops.count_flops(cfg) / 1e9
        result = {"top1": top1, "gflops": gf, "dense_gflops": dense_gf, "tokens": tokens,
                  "kept_per_layer": flops.kept_counts(cfg, keep), "val_images": len(labels), "val_files": len(val),
                  "weights": args.weights, "masks": args.masks, **run.skipped(),
                  "processes": distributed.world_size(), "machine": distributed.machine()}
        if distributed.is_main():
            write_atomically(os.path.join(args.out, "eval.json"), result)
        log(f"top-1 {top1:.2f}% on {len(labels)} {args.data} val images, {gf:.3f} GFLOPs counted as {tokens} "
            f"(dense {dense_gf:.3f}), tokens kept per layer {result['kept_per_layer']}; wrote {args.out}/eval.json")
    return result


def dense_stage(run, model, val):
    """The dense model's top-1 on val, evaluated once and kept in report.json (its predictions in predictions.npz):
    the report to build on."""
    report, paths, weights = {}, run.paths, run.identity["weights"]
    if os.path.exists(paths["report"]):
        with open(paths["report"]) as f:
            report = json.load(f)
    report = distributed.all_gather(report)[0]  # rank 0's reading: every rank takes the same branches below
    if report.get("val_files") != len(val) or report.get("weights") != weights:
        dense_top1, preds, labels = run.evaluate(model, val, None, "frozen", "dense")
        report = {"dense_top1": dense_top1, "val_files": len(val), "val_images": len(labels), "weights": weights}
        if distributed.is_main():
            save_predictions(paths["predictions"], labels=labels, dense=preds)
            write_atomically(paths["report"], report)
    run.log(f"dense: top-1 {report['dense_top1']:.2f}%, {flops.count_flops(model.cfg) / 1e9:.3f} GFLOPs")
    return report


def search_stage(run, model, train_aug, settings, saved):
    """Algorithm 1 (slim.search) on the dense caches of the fit and held images, resumed from saved (the search
    state, or None). Returns the search state and the fit and held image counts used."""
    args, log = run.args, run.log
    n_fit, n_held = search_set_sizes(settings, len(train_aug))
    if (n_fit, n_held) != (settings.fit_images, settings.held_images):
        log(f"warning: {len(train_aug)} training images: the search uses {n_fit} fit + {n_held} held images, not "
            f"the {settings.fit_images} + {settings.held_images} asked (--fit-images, --held-images; at most half "
            "the images each)")
    fit = held = None
    if saved is None or saved["next"] > 0:  # a finished search needs no caches
        cache_device, plan = cache_plan(model.cfg, -(-(n_fit + n_held) // distributed.world_size()),
                                        slim.device_of(model), args.cache_device)
        log(plan)
        fit, held = cache_search_sets(model, train_aug, args.data_path, settings, args.workers, log, cache_device)
    state = slim.search(model, fit, held, settings, log, run.paths["state"], run_id=run.identity)
    return state, n_fit, n_held


def finetune_stage(run, model, keep, tokens, ft, val):
    """The searched model's top-1 (in predictions.npz), then the final fine-tune (C7) with the masks fixed,
    resumable. Returns the searched top-1, or None when --final-epochs is 0."""
    if ft.epochs <= 0:
        return None
    searched_top1, preds, labels = run.evaluate(model, val, keep, tokens, "searched")
    if distributed.is_main():
        save_predictions(run.paths["predictions"], labels=labels, searched=preds)
    run.log(f"after the search (per-layer fine-tuning only): top-1 {searched_top1:.2f}%")
    teacher = load_model(run.args)[0].to(slim.device_of(model)) if ft.distill != "none" else None
    train_ft = run.dataset("train", model.cfg, randaugment=ft.randaugment, erase=ft.erase)
    finetune.finetune(model, teacher, keep, tokens, finetune.Schedule(train_ft, ft, model.cfg, run.args.workers),
                      run.log, finetune.Checkpoint(run.paths["finetune"], finetune_identity(keep, tokens, run.identity)))
    return searched_top1


def save_outputs(run, model, keep, tokens, classes, report, preds, labels):
    """Rank 0 writes masks.json, slimmed.pth (weights, masks, semantics, class names), report.json and the slimmed
    model's predictions."""
    if not distributed.is_main():
        return
    cfg, out = model.cfg, run.args.out
    save_predictions(run.paths["predictions"], labels=labels, slimmed=preds)
    name = run.args.model or next((k for k, c in vit.PRESETS.items() if c == cfg), None)
    write_atomically(os.path.join(out, "masks.json"), vit.masks_record(keep, cfg, tokens, name=name))
    write_atomically(os.path.join(out, "slimmed.pth"), {
        "model": model.state_dict(), "config": vit.asdict(cfg), "keep": [k.tolist() for k in keep], "tokens": tokens,
        "classes": classes})
    write_atomically(run.paths["report"], report)


def search_and_finetune(args, model, info):
    """Algorithm 1 on the training split, then the final fine-tune; top-1 of the dense, searched and slimmed models
    on val (their per-image predictions in predictions.npz). Resumes from --out."""
    t_start, cfg = time.time(), model.cfg
    if model.keep is not None:
        raise UserError(f"--weights {args.weights} is a slimmed checkpoint (it carries masks): a search starts from "
                        "the dense model; pass the dense checkpoint, or evaluate this one with --eval-only")
    run = Run(args, {k: os.path.join(args.out, f) for k, f in (
        ("state", "state.pt"), ("finetune", "finetune.pt"), ("report", "report.json"),
        ("predictions", "predictions.npz"))}, run_identity(args))
    val = run.val_dataset(cfg, info.classes)
    train_aug = run.dataset("train", cfg)
    data.check_classes(train_aug, cfg.num_classes)
    settings, ft = settings_from_args(args, cfg), finetune.settings_from_args(args)
    # a resume with other settings is refused here, before any work
    saved = load_if_made_with(run.paths["state"], {**asdict(settings), **run.identity}, "a search")
    if saved is not None and ft.epochs > 0 and saved["next"] == 0:
        load_if_made_with(run.paths["finetune"],
                          {**asdict(ft), **finetune_identity(saved["keep"], settings.tokens, run.identity)},
                          "a final fine-tune")
    with run.open_log("log.txt", model, info) as log:
        log(f"search settings: {json.dumps(asdict(settings))}\nfinal fine-tune settings: {json.dumps(asdict(ft))}")
        report = dense_stage(run, model, val)
        state, n_fit, n_held = search_stage(run, model, train_aug, settings, saved)
        keep, tokens = state["keep"], settings.tokens
        report["searched_top1"] = finetune_stage(run, model, keep, tokens, ft, val)
        slimmed_top1, preds, labels = run.evaluate(model, val, keep, tokens, "slimmed")
        dense_flops, slim_flops = flops.count_flops(cfg), flops.count_flops(cfg, keep, tokens=tokens)
        report.update({
            "slimmed_top1": slimmed_top1, "val_images": len(labels), "tokens": tokens,
            "dense_gflops": dense_flops / 1e9, "slimmed_gflops": slim_flops / 1e9,
            "flops_reduction": 1 - slim_flops / dense_flops, "kept_per_layer": flops.kept_counts(cfg, keep),
            "settings": asdict(settings), "fit_images_used": n_fit, "held_images_used": n_held,
            "final_finetune": asdict(ft), "layers": state["layers"], "wall_seconds": round(time.time() - t_start, 1),
            "resumed": saved is not None, **run.skipped(), "processes": distributed.world_size(),
            "args": vars(args), "machine": distributed.machine(), "flops_note": flops.NOT_COUNTED})
        save_outputs(run, model, keep, tokens, train_aug.classes, report, preds, labels)
        log(f"slimmed: top-1 {slimmed_top1:.2f}% (dense {report['dense_top1']:.2f}%), {slim_flops / 1e9:.3f} GFLOPs "
            f"counted as {tokens} (dense {dense_flops / 1e9:.3f}, {100 * report['flops_reduction']:.1f}% fewer); "
            f"kept per layer {report['kept_per_layer']}; wrote {args.out}/masks.json, slimmed.pth, report.json, "
            "predictions.npz")
    return report
