"""
The command line of patch slimming (Tang et al., CVPR 2022, arXiv 2106.02852): `python slim.py ...` lands here.
get_args_parser() lists the flags, complete_args() fills the defaults that depend on other flags or on the machine,
check_args() refuses bad combinations with one line each, and main() sends the run to its path: Algorithm 1 and the
final fine-tune (pipeline/run.py), --eval-only, DPS-ViT (pipeline/dynamic.py) or the ONNX export (pipeline/export.py).
cli() turns every user-facing failure (bad input, a file that cannot be written, out of memory, Ctrl-C) into one line.

    python slim.py --data cifar10 --out results/cifar10-proxy --final-epochs 1 --final-lr 3e-4   # the shipped proxy
    python slim.py --data imagenet --data-path /path/to/imagenet                                # the released DeiT-S
    torchrun --nproc_per_node 8 slim.py --data imagenet --data-path DIR                         # the same on 8 GPUs
"""
import os
import shlex
import sys

import torch

import data
import slim
import vit
from pipeline import distributed, dynamic, export, finetune, flags, run
from pipeline.resume import output_error
from vit import UserError

FINAL_EPS = 0.2  # --eps's default for --error final (v1's scale: the relative error of the final class feature)


def get_args_parser():
    d = slim.SearchSettings()
    parser = flags.Parser(description="Patch slimming (arXiv 2106.02852): top-down mask search for a DeiT")
    p = parser.add_argument_group("what to slim (a first run needs --data, --data-path and, with --data folder, "
                                  "--weights)")
    p.add_argument("--data", default="imagenet", choices=["imagenet", "folder", "cifar10"],
                   help="imagenet: DIR/{train,val}/<wnid>; folder: any ImageFolder tree DIR/{train,val}/<class>; "
                   "cifar10: the shipped proxy model on CIFAR-10, downloaded once into DIR as such a tree")
    p.add_argument("--data-path", default=None, help="dataset root holding train/ and val/ (--data cifar10: default "
                   "data/cifar10)")
    p.add_argument("--model", default=None, choices=list(vit.PRESETS),
                   help="architecture; default deit_small, or the --weights checkpoint's own")
    p.add_argument("--weights", default=None, help="checkpoint path or URL (default: the model's DeiT release)")
    p.add_argument("--mean", type=flags.number(float), nargs=3, default=None, help="input normalisation mean (default: the model's: "
                   "its checkpoint's config, its preset's, or ImageNet's, as the log says)")
    p.add_argument("--std", type=flags.positive, nargs=3, default=None, help="input normalisation std (likewise)")
    p.add_argument("--out", default="results/run", help="output folder; a rerun with the same folder resumes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p = parser.add_argument_group("the method (method.md labels)")
    p.add_argument("--tokens", default=None, choices=list(vit.TOKENS),
                   help="what a pruned patch becomes: frozen (the paper's, method.md P1; default for a search) or "
                   "removed (v1, C1); with --eval-only the masks' own, unless given")
    p.add_argument("--score", default=d.score, choices=list(slim.SCORES), help="patch score: significance (Eq. 6, the "
                   "paper's), head-mean (v1), attn (Fig. 7's baseline), class-attn (EViT-like) or random")
    p.add_argument("--error", default=d.error, choices=list(slim.ERRORS), help="the error Alg. 1 tests: next (E_{l+1}, the "
                   "paper's, method.md P4) or final (v1: cumulative error of the final class feature)")
    p.add_argument("--eps", type=flags.positive, default=None, help=f"tolerated error (default {d.eps} for --error next, {FINAL_EPS} "
                   "for --error final). next: E_{l+1} on C4's relative scale, ||diag(m)(Z^-Z)||^2 / ||diag(m)Z||^2 "
                   "(our normalisation: the paper's Eq. 3 is unnormalised, so its 0.01/0.02 do not transfer; "
                   "report.json gives the absolute error too)")
    p.add_argument("--search", default=d.search, choices=list(slim.SEARCH_LOOPS), help="the loop over r (C6): alg1, "
                   "Alg. 1 as written (a block fine-tune at every r); fast, E0-bisection with skips "
                   "(slim.search_layer_fast says how it differs)")
    p.add_argument("--r-step", type=flags.count, default=None, dest="r_step", help="r', tokens added per search "
                   "step (default: 10 of 196 patches, scaled by the patch count)")
    p = parser.add_argument_group("the search's samples and block fine-tunes (Alg. 1, C5, C6)")
    p.add_argument("--score-images", type=flags.count, default=d.score_images, help="training images the scores average over")
    p.add_argument("--fit-images", type=flags.count, default=d.fit_images, help="cached augmented training images for fine-tuning")
    p.add_argument("--held-images", type=flags.count, default=d.held_images, help="held training images E is measured on")
    p.add_argument("--ft-steps", type=flags.count, default=d.ft_steps, help="fine-tuning steps per candidate, block t only")
    p.add_argument("--ft-lr", type=flags.non_negative, default=d.ft_lr, help="AdamW learning rate of those steps")
    p.add_argument("--ft-weight-decay", type=flags.non_negative, default=d.ft_weight_decay, help="AdamW weight decay of those steps")
    p.add_argument("--ft-reach", type=flags.positive, default=d.ft_reach, help="--search fast only: fine-tune a candidate "
                   "only if E0 <= ft_reach*eps")
    p.add_argument("--ft-tries", type=flags.non_negative_int, default=d.ft_tries, help="--search fast only: at most this many "
                   "fine-tunes of candidates with E0 > eps per layer")
    p.add_argument("--batch-size", type=flags.count, default=d.batch_size, help="images per step of the search (global, "
                   "split over the processes) and of evaluation")
    p.add_argument("--seed", type=flags.non_negative_int, default=d.seed, help="chooses the fit/held images and seeds the fine-tunes")
    p.add_argument("--cache-device", default="auto", choices=["auto", "cpu", "cuda"], help="where the dense caches "
                   "go: auto follows the memory plan printed at start (GPU if they fit, else pinned CPU memory)")
    finetune.add_arguments(parser)
    dynamic.add_arguments(parser)
    p = parser.add_argument_group("running")
    p.add_argument("--workers", type=flags.non_negative_int, default=None, help="data loading processes per process (default: the CPUs "
                   "shared among this machine's processes, at most 8)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable image files, and at the "
                   "small-image recipe's sizes (<= 64 px) images of another size than the model's (counted in the log "
                   "and report.json), instead of stopping with an error naming the first")
    p.add_argument("--val-per-class", type=flags.count, default=None, help="evaluate on the first k val images per class (quick runs)")
    p.add_argument("--eval-only", action="store_true", help="only measure top-1 and FLOPs (dense, or with --masks)")
    p.add_argument("--masks", default=None, help="masks.json for --eval-only (a slimmed checkpoint carries its own)")
    p.add_argument("--export", default=None, choices=["onnx"], help="write --weights (with its masks) as an ONNX "
                   "file to --out (default: the checkpoint's folder) and stop (pipeline/export.py)")
    return parser


def complete_args(args):
    """The defaults that depend on other flags or on the machine: --data cifar10's tree (written once) and shipped
    proxy, --eps by --error, --workers by the CPUs this process may use."""
    if args.data == "cifar10":  # the shipped proxy (models/README.md) on CIFAR-10, written once as an ImageFolder tree
        args.data_path = data.cifar10_tree(args.data_path or data.CIFAR10_DIR)
        args.weights = args.weights or vit.PROXY_CHECKPOINT
    if args.eps is None:
        args.eps = slim.SearchSettings.eps if args.error == "next" else FINAL_EPS
    if args.workers is None:  # the CPUs this process may use, shared among the machine's processes
        args.workers = data.default_workers(distributed.local_world_size())
    return args


def check_args(args):
    """Flags that are each fine but do not go together (single values are checked where they are parsed,
    pipeline/flags.py): a one-line UserError naming the fix. Changes nothing."""
    if not args.data_path:
        raise UserError("--data-path is required: the folder holding train/ and val/ (e.g. /data/imagenet)")
    if args.data == "folder" and not args.weights:
        raise UserError("--data folder needs --weights: a DeiT checkpoint trained on that dataset")
    if args.masks and not args.eval_only:
        raise UserError(f"--masks {args.masks} is for --eval-only (a search makes its own masks): add --eval-only, "
                        "or drop --masks")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file: pass a folder (it is created if missing)")
    if args.batch_size % distributed.world_size():
        raise UserError(f"--batch-size {args.batch_size} is not a multiple of the {distributed.world_size()} "
                        "processes: pass a multiple")
    if args.cache_device == "cuda" and not args.device.startswith("cuda"):
        raise UserError("--cache-device cuda needs --device cuda")
    distributed.check_device(args.device)


def main(args):
    """--export writes an ONNX file; otherwise --eval-only measures a model, --dynamic makes DPS-ViT, and the default
    is Algorithm 1 then the final fine-tune. pipeline/run.py runs each path stage by stage."""
    if args.export:  # no data, no device: the checkpoint to an ONNX file (pipeline/export.py)
        return export.main(args, default_out=get_args_parser().get_default("out"))
    device = distributed.setup(args.device)  # joins the process group under torchrun (pipeline/distributed.py)
    if args.dynamic or args.dynamic_from:  # DPS-ViT from a finished static run: its data and weights the defaults
        dynamic.complete_args(args, get_args_parser())
    check_args(complete_args(args))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model, info = run.load_model(args)
    model.to(device)
    if args.dynamic or info.dynamic is not None:  # DPS-ViT (Sec. 4.4): its fit and fine-tune, or --eval-only of a dynamic.pth
        return dynamic.main(args, model, info)
    if args.eval_only:
        return run.evaluate_only(args, model, info)
    return run.search_and_finetune(args, model, info)


OUT_OF_MEMORY = "out of memory on {}: pass a smaller --batch-size (or --final-batch-size), or --cache-device cpu"


def cli(argv=None):
    """python slim.py [argv]: main(), with every failure a user can fix as one line (and a non-zero exit)."""
    args = get_args_parser().parse_args(argv)
    args.command = "python slim.py " + shlex.join(sys.argv[1:] if argv is None else argv)  # as the log records it
    try:
        return main(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a file of the run could not be written: permission, no space, a file in the way
        sys.exit(f"error: {output_error(e)}")
    except torch.OutOfMemoryError:
        sys.exit("error: " + OUT_OF_MEMORY.format(args.device))
    except RuntimeError as e:  # the CPU allocator's out-of-memory is a plain RuntimeError
        if "can't allocate memory" in str(e) or "out of memory" in str(e):
            sys.exit("error: " + OUT_OF_MEMORY.format(args.device))
        raise
    except KeyboardInterrupt:
        sys.exit(f"interrupted: rerun the same command to continue from what {args.out} holds")
    finally:
        distributed.cleanup()
