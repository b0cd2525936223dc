"""
The final end-to-end fine-tune of a slimmed DeiT (patch slimming, arXiv 2106.02852; method.md C7: "following
DeiT's training strategy", epochs and learning rate not given by the paper), data parallel under torchrun and
resumable.

DeiT's recipe (facebookresearch/deit main.py), from torch and torchvision only: AdamW (weight decay 0.05), linear
warm-up then cosine decay, the learning rate scaled linearly with the global batch (lr x batch / lr_batch),
label smoothing, RandAugment, MixUp/CutMix and random erasing from transforms v2 (data.py). The loss (--distill):
- "soft": distillation from the dense model, the v1 objective: the relative squared error of the final class
  feature plus the KL divergence of the logits (no labels, so label smoothing plays no part);
- "hard": DeiT's hard distillation, 1/2 CE(labels) + 1/2 CE(the dense model's predicted class);
- "none": CE on the (mixed, smoothed) labels.
Two recipes: "deit" (ImageNet's default; epochs and lr are our choice, as the paper gives neither) and "light" (the
32-px proxy's: plain augmentation, soft distillation, off unless --final-epochs is given). Flags override each field.

Resumable: a checkpoint (OUT/finetune.pt) at the end of every epoch and when the run is interrupted (SIGINT,
SIGTERM: the step in flight finishes first). The same command continues from it. Each image's augmentation is
seeded by (seed, epoch, image) and each batch's MixUp/CutMix by (seed, step, rank), and a resumed epoch skips the
batches already seen, so on a deterministic device a resumed run ends with the weights of an uninterrupted one.
A loss that is not finite stops the run with a one-line error, before any step or checkpoint.
"""
import argparse
import itertools
import math
import signal
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

import data
from pipeline import distributed, flags
from pipeline.evaluate import autocast
from pipeline.resume import load_if_made_with, write_atomically
from vit import UserError


@dataclass
class FinetuneSettings:
    """The final fine-tune (method.md C7): saved in its checkpoint, and a resume with other values is refused."""
    epochs: float = 0.0           # passes over the training set (0: no final fine-tune); may be fractional
    lr: float = 3e-4              # AdamW peak learning rate at a global batch of lr_batch images ...
    lr_batch: int = 64            # ... scaled linearly to the actual batch: lr * batch_size / lr_batch (DeiT's rule)
    batch_size: int = 64          # global images per step, split evenly over the processes
    warmup_epochs: float = 0.0    # linear warm-up from 0, then cosine decay to 0
    weight_decay: float = 0.05
    label_smoothing: float = 0.0  # on the (mixed) labels of "hard" and "none"
    randaugment: bool = False     # DeiT's rand-m9: 2 ops at 9 of 10 magnitude steps (data.py)
    mixup: float = 0.0            # MixUp alpha (0: off); with cutmix, one of the two per batch
    cutmix: float = 0.0           # CutMix alpha (0: off)
    erase: float = 0.0            # random erasing probability (DeiT's reprob)
    distill: str = "soft"         # "soft" (dense features + logits), "hard" (DeiT's hard distillation) or "none"
    seed: int = 0                 # shuffling, augmentation and mixing


RECIPES = {
    # DeiT's recipe for a pretrained network (our choice of epochs, lr and warm-up: the paper gives none)
    "deit": FinetuneSettings(epochs=30, lr=5e-5, lr_batch=512, batch_size=512, warmup_epochs=1, label_smoothing=0.1,
                             randaugment=True, mixup=0.8, cutmix=1.0, erase=0.25, distill="soft"),
    # the 32-px proxy's: what its committed results used (--final-epochs 1 --final-lr 3e-4 at batch 64)
    "light": FinetuneSettings(),
}
DISTILL = ("soft", "hard", "none")


def distill_loss(f, logits, f_dense, logits_dense, per_image=False):
    """v1's objective: relative feature MSE (what the v1 error measures) + KL of the logits, both against the dense
    model; the batch mean, or per image (B,)."""
    rel = (f - f_dense).flatten(1).pow(2).sum(-1) / f_dense.flatten(1).pow(2).sum(-1)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(logits_dense, -1), reduction="none", log_target=True).sum(-1)
    return rel + kl if per_image else (rel + kl).mean()


class WithFeatures(nn.Module):
    """The slimmed student as DistributedDataParallel wraps it: forward returns (final prefix-token features, logits)."""

    def __init__(self, model, keep, tokens):
        super().__init__()
        self.model, self.keep, self.tokens = model, keep, tokens

    def forward(self, img):
        f = self.model.forward_features(img, self.keep, self.tokens)
        return f, self.model.classify(f)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, each rank a disjoint share) that starts an epoch at sample `start` of
    this rank's share, so that a resumed epoch skips the batches already seen without loading them."""
    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


Checkpoint = namedtuple("Checkpoint", "path made_with")  # where a fine-tune is saved after every epoch and resumed
#   from (path), and what besides its FinetuneSettings identifies it (made_with: masks, weights, data), compared on
#   resume: a saved fine-tune made otherwise is a one-line error (pipeline/resume.py), never mixed into this one


def learning_rate(s, step, total, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`, of the batch-scaled peak lr."""
    peak = s.lr * s.batch_size / s.lr_batch
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def loss_of(s, f, logits, target, teacher, img):
    """The fine-tuning loss of one batch (s.distill). target: class indices (B,) or mixed soft labels (B, C)."""
    if s.distill == "none":
        return F.cross_entropy(logits, target, label_smoothing=s.label_smoothing)
    with torch.no_grad(), autocast(img.device):
        f_dense = teacher.forward_features(img).float()
        logits_dense = teacher.classify(f_dense).float()
    if s.distill == "soft":
        return distill_loss(f, logits, f_dense, logits_dense)
    return 0.5 * F.cross_entropy(logits, target, label_smoothing=s.label_smoothing) + \
        0.5 * F.cross_entropy(logits, logits_dense.argmax(-1))


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves a checkpoint and stops."""

    def __init__(self):
        self.flag, self.old = False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.old[sig] = signal.signal(sig, self.set)
        return self

    def set(self, *_):
        self.flag = True

    def __exit__(self, *_):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def save_checkpoint(path, student, opt, step, settings):
    """Rank 0 writes the fine-tune's state after `step` whole steps (atomically: a kill never leaves half a file)."""
    if path and distributed.is_main():
        write_atomically(path, {"model": student.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "settings": settings})


def train_step(model, teacher, opt, plan, batch, step, stop_asked):
    """One optimiser step of the final fine-tune (plan: its Schedule) on batch (None: every file of this rank's batch
    was skipped, and a step with zero loss on a blank image keeps the ranks in step). One all-reduce tells every rank
    whether any saw a non-finite loss (a one-line error) or was asked to stop (stop_asked): then no step is taken and
    it returns None. Returns the loss."""
    device, rank, s = next(model.parameters()).device, distributed.rank(), plan.s
    img, y = plan.blank() if batch is None else batch
    img, y = img.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if plan.mix is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((s.seed * 1_000_003 + step) * 1_009 + rank) % 2**63)
            img, y = plan.mix(img, y)
    with autocast(device):
        f, logits = model(img)
    loss = loss_of(s, f.float(), logits.float(), y, teacher, img) * (batch is not None)
    flags = distributed.all_reduce_sum(torch.tensor([float(not torch.isfinite(loss)), float(stop_asked)]))
    if flags[0] > 0:
        raise UserError(f"the final fine-tune's loss is not finite at epoch {step // plan.steps_per_epoch + 1}, step "
                        f"{step}: nothing was saved for this step; lower --final-lr or check the data")
    if flags[1] > 0:
        return None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for group in opt.param_groups:
        group["lr"] = learning_rate(s, step, plan.total, plan.warmup)
    opt.step()
    return loss


class Schedule:
    """How a fine-tune of a model of config cfg runs on train_ds with recipe s (FinetuneSettings) over this launch's
    processes: the seeded view of the images, this rank's resumable sampler and its loader (workers: DataLoader
    processes; the dataset's unusable files go to its registry, data.bad_files), the recipe's batch mixing for cfg's
    classes, images per rank and step, steps per epoch, total and warm-up steps."""

    def __init__(self, train_ds, s, cfg, workers=2):
        world = distributed.world_size()
        if s.batch_size % world:
            raise UserError(f"--final-batch-size {s.batch_size} is not a multiple of the {world} processes: "
                            "pass a multiple")
        if len(train_ds) < s.batch_size:
            raise UserError(f"the training set has {len(train_ds)} images, fewer than --final-batch-size {s.batch_size}")
        self.s, self.img_size, self.per_rank = s, cfg.img_size, s.batch_size // world
        self.view = data.SeededView(train_ds, s.seed)
        self.sampler = ResumableSampler(self.view, num_replicas=world, rank=distributed.rank(), shuffle=True,
                                        seed=s.seed, drop_last=True)
        self.loader = data.loader(self.view, self.per_rank, workers=workers, sampler=self.sampler, drop_last=True,
                                  keep_empty=True)
        self.mix = data.mixup_cutmix(cfg.num_classes, s.mixup, s.cutmix)
        self.steps_per_epoch = self.sampler.num_samples // self.per_rank
        self.total = max(1, round(s.epochs * self.steps_per_epoch))
        self.warmup = round(s.warmup_epochs * self.steps_per_epoch)

    def blank(self):
        """The stand-in for a batch whose every file was skipped: one black image, label 0."""
        return torch.zeros(1, 3, self.img_size, self.img_size), torch.zeros(1, dtype=torch.long)

    def start_epoch(self, step):
        """Position the view and the sampler at `step` (mid-epoch after a resume); returns the epoch (0-based)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        self.view.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.sampler.start = in_epoch * self.per_rank
        return epoch


def optimiser(student, frozen, plan, ckpt_path, settings, log):
    """AdamW over student's parameters (those of `frozen` aside) and the step to start from: 0, or where the saved
    fine-tune at ckpt_path stopped (its weights and optimiser state loaded), provided it was made with the same
    settings (FinetuneSettings and identity)."""
    fixed = set() if frozen is None else set(frozen.parameters())
    trained = [p for p in student.parameters() if p not in fixed]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=plan.s.lr, weight_decay=plan.s.weight_decay)
    saved = load_if_made_with(ckpt_path, settings, "a final fine-tune")
    if not saved:
        return opt, 0
    student.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    step, per_epoch = saved["step"], plan.steps_per_epoch
    log(f"resuming the final fine-tune from {ckpt_path}: epoch {step // per_epoch + 1}, step {step % per_epoch} of "
        f"{per_epoch} ({step}/{plan.total} done)" if step < plan.total else
        f"the final fine-tune in {ckpt_path} is complete ({plan.total} steps)")
    return opt, step


def finetune(student, teacher, keep, tokens, plan, log, checkpoint=None, frozen=None):
    """Fine-tune `student` (with masks keep under `tokens`) end to end as plan says (a Schedule: the training images
    and the recipe). checkpoint: where it resumes from and saves to (a Checkpoint; None: nowhere). SIGINT/SIGTERM
    (StopRequest) end it after a whole step, saved. frozen: a submodule of student the fine-tune leaves as it is
    (DPS-ViT's predictors G, pipeline/dynamic.py). Returns the number of steps run in this call."""
    device, world = next(student.parameters()).device, distributed.world_size()
    ckpt_path, made_with = checkpoint or Checkpoint(None, {})
    settings = {**asdict(plan.s), **made_with}
    opt, step = optimiser(student, frozen, plan, ckpt_path, settings, log)
    model = WithFeatures(student, keep, tokens)
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    bar = distributed.progress(total=plan.total, initial=step, desc="final fine-tune")
    first, t0, every = step, time.time(), max(1, min(plan.steps_per_epoch // 10, 200))
    student.train()
    stopping = False  # decided only from the all-reduced flags, so that every rank stops at the same step
    with StopRequest() as stop:
        try:
            while step < plan.total and not stopping:
                plan.start_epoch(step)
                for batch in plan.loader:
                    loss = train_step(model, teacher, opt, plan, batch, step, stop.flag)
                    if loss is None:
                        stopping = True
                        break
                    step += 1
                    bar.update()
                    if step % every == 0 or step == plan.total:  # every rank gets here: the mean loss of all ranks
                        log_progress(log, loss, step, first, t0, plan)
                    if step % plan.steps_per_epoch == 0 or step == plan.total:  # the end of an epoch
                        save_checkpoint(ckpt_path, student, opt, step, settings)
                        break
        except (RuntimeError, OSError):
            if not stop.flag:  # a DataLoader worker killed by the same Ctrl-C ends here; the last step is whole
                raise
            stopping = True
    bar.close()
    if stopping:
        save_checkpoint(ckpt_path, student, opt, step, settings)
        log(f"final fine-tune interrupted after step {step}/{plan.total} (epoch {step // plan.steps_per_epoch + 1}): "
            f"saved {ckpt_path}; rerun the same command to continue")
        raise KeyboardInterrupt
    distributed.barrier()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return step - first


def log_progress(log, loss, step, first, t0, plan):
    """A line of the log: the epoch and step, the loss averaged over the processes, the rate and the time left."""
    s = plan.s
    mean_loss = distributed.all_reduce_sum(loss.detach().float().cpu()).item() / distributed.world_size()
    rate = (step - first) * s.batch_size / (time.time() - t0)
    log(f"final fine-tune: epoch {(step - 1) // plan.steps_per_epoch + 1}/{math.ceil(plan.total / plan.steps_per_epoch)}, "
        f"step {step}/{plan.total}, loss {mean_loss:.4f}, {rate:.0f} img/s, "
        f"ETA {(plan.total - step) * s.batch_size / rate / 60:.1f} min")


def add_arguments(parser):
    """slim.py's flags of the final fine-tune: each overrides a field of the recipe (None: the recipe's value)."""
    f = parser.add_argument_group("final fine-tune (method.md C7; pipeline/finetune.py): each flag overrides the recipe's value")
    f.add_argument("--recipe", default=None, choices=list(RECIPES), help="deit (the default with --data "
                   "imagenet: 30 epochs, lr 5e-5 per 512 images, batch 512, 1 warm-up epoch, smoothing 0.1, RandAugment, "
                   "MixUp 0.8, CutMix 1.0, erasing 0.25, soft distillation) or light (the default otherwise: off unless "
                   "--final-epochs; lr 3e-4 per 64 images, batch 64, plain augmentation, soft distillation)")
    f.add_argument("--final-epochs", type=flags.non_negative, default=None, help="epochs (0: no final fine-tune)")
    f.add_argument("--final-lr", type=flags.positive, default=None, help="peak AdamW lr, per the recipe's lr batch (scaled "
                   "linearly with --final-batch-size)")
    f.add_argument("--final-batch-size", type=flags.count, default=None, help="global images per step, split over processes")
    f.add_argument("--warmup-epochs", type=flags.non_negative, default=None)
    f.add_argument("--smoothing", type=flags.number(float, 0, 1, high_open=True), default=None, help="label smoothing (with --distill hard or none)")
    f.add_argument("--randaugment", action=argparse.BooleanOptionalAction, default=None)
    f.add_argument("--mixup", type=flags.non_negative, default=None, help="MixUp alpha (0: off)")
    f.add_argument("--cutmix", type=flags.non_negative, default=None, help="CutMix alpha (0: off)")
    f.add_argument("--reprob", type=flags.probability, default=None, help="random erasing probability")
    f.add_argument("--distill", default=None, choices=list(DISTILL), help="soft: the dense model's features "
                   "and logits; hard: DeiT's hard distillation; none: labels only")


def settings_from_args(args, base=None):
    """FinetuneSettings of the CLI: the recipe (--recipe, default "deit" on ImageNet, "light" elsewhere; or base, the
    settings a dynamic run takes from its static run), each field overridden by its flag when given."""
    if args.recipe or base is None:
        base = RECIPES[args.recipe or ("deit" if args.data == "imagenet" else "light")]
    flags = {"epochs": args.final_epochs, "lr": args.final_lr, "batch_size": args.final_batch_size,
             "warmup_epochs": args.warmup_epochs, "label_smoothing": args.smoothing, "randaugment": args.randaugment,
             "mixup": args.mixup, "cutmix": args.cutmix, "erase": args.reprob, "distill": args.distill,
             "seed": args.seed}
    return replace(base, **{k: v for k, v in flags.items() if v is not None})
