"""
A slimmed DeiT out of PyTorch: one ONNX file per checkpoint (patch slimming, Tang et al., CVPR 2022, arXiv
2106.02852). Static masks make a fixed graph: per block a gather of the kept rows, smaller matmuls for their
queries, attention rows, W_o and MLP, and (under "frozen", method.md P1) a write-back of those rows into the full
sequence; keys and values from every row (P1) or from the rows alive (the v1 variant, C1).

    python slim.py --export onnx --weights OUT/slimmed.pth [--out DIR]     # -> DIR/slimmed.onnx (DIR: OUT)
    python slim.py --export onnx --weights dense.pth [--masks masks.json]  # a dense checkpoint, or it with masks

The graph: input "img" (batch, 3, H, W), float32, normalised as the metadata says; output "logits" (batch,
classes). The batch dimension is dynamic; the kept indices of every layer are constants of the graph (StaticSlimmed
bakes them in); the model's metadata_props state the input normalisation (mean, std, image size, the eval
transform), the token semantics, the kept tokens per layer and the GFLOPs (flops.py). After writing, the file is
run in onnxruntime (when installed) on two random images and its logits compared with PyTorch's.

Exporter: torch.onnx.export(..., dynamo=True), the torch.export-based path. Both paths were tried on torch 2.14.1
(a 4-block model, both semantics): both export and both match PyTorch to 1e-6 in onnxruntime. The dynamo path is
taken because it is torch's default since 2.9 and the TorchScript path is deprecated (on 2.14 it warns that it
"will be removed", and that iterating over a tensor may make the trace wrong); its graph is also the plainer one
(a ScatterND for the write-back, no Constant nodes: a third of the TorchScript graph's nodes). It needs onnxscript beside
onnx. onnx, onnxscript and onnxruntime are optional (requirements-export.txt): imported only here, in the
functions that use them, never by slim.py's other paths.
"""
import copy
import json
import os

import torch
import torch.nn as nn

import data
import flops
import vit
from pipeline import run
from pipeline.resume import write_atomically
from vit import UserError

OPSET = 18  # LayerNormalization (17) and the dynamo exporter's minimum; onnxruntime >= 1.14 runs it
EXTRA = "pip install -r requirements-export.txt"


class StaticSlimmed(nn.Module):
    """model's forward with its masks fixed (vit.VisionTransformer.forward with keep, tokens), for exporters and
    compilers: the masks are checked once here, and the per-block gather indices (vit.masks_plan) are constants of
    the graph. forward(img: (B, 3, H, W)) -> logits (B, classes). keep=None: the dense model."""

    def __init__(self, model, keep=None, tokens="frozen"):
        super().__init__()
        self.model, self.tokens = model, vit.check_tokens(tokens)
        device = next(model.parameters()).device  # the indices live where the rows they gather do
        plan = [None] * model.cfg.depth if keep is None else vit.masks_plan(keep, model.cfg, tokens)[1]
        self.gather = [None if idx is None else idx.to(device) for idx in plan]

    def forward(self, img):
        m = self.model
        x = m.embed(img)
        for blk, idx in zip(m.blocks, self.gather):  # block t = 1..L updates the rows idx (None: all); Eq. 2
            x = blk(x, idx, self.tokens)
        return m.classify(m.features(x))


def require(*names):
    """The optional modules `names`, imported; a missing one is a one-line UserError naming the install command."""
    import importlib
    try:
        return [importlib.import_module(n) for n in names]
    except ImportError as e:
        raise UserError(f"ONNX export needs the optional packages {', '.join(names)} ({e.name} is missing): {EXTRA}")


def metadata(model, keep, tokens, source, info=None):
    """The ONNX model's metadata_props (strings): what a user of the file must know to feed it and read it. info:
    the checkpoint's vit.CheckpointInfo (where the normalisation came from, the class names), when known."""
    cfg = model.cfg
    counts = flops.kept_counts(cfg, keep)
    return {
        "paper": "Patch Slimming for Efficient Vision Transformers (Tang et al., CVPR 2022, arXiv 2106.02852)",
        "source": str(source),
        "input": f"img: float32 (batch, 3, {cfg.img_size}, {cfg.img_size}), RGB scaled to [0, 1] then (x - mean) / std",
        "img_size": str(cfg.img_size),
        "mean": json.dumps(list(cfg.mean)),
        "std": json.dumps(list(cfg.std)),
        "eval_transform": " ".join(str(data.build_transform(cfg.img_size, False, mean=cfg.mean, std=cfg.std)).split()),
        "normalisation_source": info.normalisation if info else "",
        "output": f"logits: float32 (batch, {cfg.num_classes})" + (
            ", the mean of the class and distillation heads" if cfg.prefix_tokens == 2 else ""),
        "classes": json.dumps(info.classes) if info and info.classes else "",
        "config": json.dumps(vit.asdict(cfg)),
        "tokens": "dense" if keep is None else tokens,
        "kept_per_layer": json.dumps(counts),
        "keep": "" if keep is None else json.dumps([k.tolist() for k in vit.check_keep(keep, cfg)]),
        "gflops": f"{flops.count_flops(cfg, keep, tokens=tokens) / 1e9:.6g}",
        "dense_gflops": f"{flops.count_flops(cfg) / 1e9:.6g}",
        "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=True), opset {OPSET}",
    }


def export_onnx(model, path, keep=None, tokens="frozen", source="", info=None):
    """Write model (with masks keep under `tokens`, or dense) to the ONNX file `path`: dynamic batch, the kept indices
    as constants, metadata as metadata(). Returns path."""
    onnx, _ = require("onnx", "onnxscript")
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float().cpu()  # exported in float32 from the CPU; the caller's model stays as it is
    static = StaticSlimmed(model, keep, tokens).eval()
    img = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size)
    try:
        program = torch.onnx.export(static, (img,), dynamo=True, opset_version=OPSET, input_names=["img"],
                                    output_names=["logits"], dynamic_shapes={"img": {0: torch.export.Dim("batch")}},
                                    verbose=False, report=False)
    except Exception as e:  # the exporter's errors are long; the first line says what failed
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"torch.onnx.export failed on this model ({type(e).__name__}: {first}): it exports vit.py's "
                        "DeiT family; check the checkpoint, or report it with the torch version") from None
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(model, keep, tokens, source, info))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, proto.SerializeToString())  # a failed write leaves no truncated .onnx
    return path


def ort_session(path, threads=None, spinning=True):
    """An onnxruntime CPU session of the ONNX file `path`, intra-op threads = threads (default: torch's). spinning=False
    stops its idle threads spin-waiting for work: for a process that also runs PyTorch, whose own thread pool would
    otherwise compete with them for the cores (bench/speed.py times both in one process)."""
    (ort,) = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def max_logit_difference(path, model, keep, tokens, batch=2, seed=0):
    """Largest |logit difference| between onnxruntime running `path` and PyTorch's model(keep, tokens), on `batch`
    random images."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, model.cfg.img_size, model.cfg.img_size, generator=g)
    with torch.no_grad():
        ref = model(img, keep=keep, tokens=tokens)
    out = ort_session(path).run(["logits"], {"img": img.numpy()})[0]
    return float((torch.from_numpy(out) - ref).abs().max())


def load_for_export(args):
    """(model, info, keep, tokens, source) from --weights (a slimmed checkpoint carries its masks) and --masks / --tokens."""
    if not args.weights:
        raise UserError("--export needs --weights: the slimmed.pth written by slim.py (or a dense checkpoint)")
    if str(args.weights).endswith(".json"):
        raise UserError(f"--weights {args.weights} is a masks file, not a model: pass the slimmed.pth beside it, or "
                        f"the dense checkpoint with --masks {args.weights}")
    if os.path.isfile(args.weights):
        with open(args.weights, "rb") as f:
            head = f.read(64).lstrip()
        if head.startswith(b"{"):
            raise UserError(f"--weights {args.weights} holds JSON (a masks file?), not a model: pass the slimmed.pth "
                            f"written beside it, or the dense checkpoint with --masks {args.weights}")
    model, info = run.load_model(args)  # --model / --weights / --mean / --std, as every slim.py path reads them
    if info.dynamic is not None:
        raise UserError(f"--weights {args.weights} is a DPS-ViT checkpoint (each image chooses its patches, Sec. 4.4): "
                        "the export writes static masks only; pass the static run's slimmed.pth")
    keep, tokens, note = run.masks_to_run(args, model)
    source = args.masks or args.weights
    if note:
        print(note)
    return model, info, keep, tokens, source


def main(args, default_out):
    """slim.py --export onnx: write <out>/<checkpoint name>.onnx, check it in onnxruntime, print one line. out: --out
    when given (default_out is slim.py's default), else the checkpoint's folder. Returns the file's path."""
    if args.export != "onnx":
        raise UserError(f"--export {args.export} is not a format this exports: use --export onnx")
    require("onnx", "onnxscript")  # before loading anything
    model, info, keep, tokens, source = load_for_export(args)
    local = os.path.isfile(args.weights)
    out = os.path.dirname(os.path.abspath(args.weights)) if args.out == default_out and local else args.out
    name = os.path.splitext(os.path.basename(str(args.weights)))[0] if local else "model"
    path = export_onnx(model, os.path.join(out, name + ".onnx"), keep, tokens, source, info)
    try:
        diff = max_logit_difference(path, model, keep, tokens)
        check = f"max |logit difference| to PyTorch in onnxruntime {diff:.1e}"
    except UserError:
        check = f"not run in onnxruntime (not installed: {EXTRA})"
    what = "dense" if keep is None else f"tokens {tokens}, kept per layer {flops.kept_counts(model.cfg, keep)}"
    gflops = flops.count_flops(model.cfg, keep, tokens=tokens) / 1e9
    print(f"wrote {path}: {what}, {gflops:.3f} GFLOPs, dynamic batch, input {model.cfg.img_size} px normalised by mean "
          f"{model.cfg.mean} std {model.cfg.std} (in its metadata); {check}")
    return path
