"""
Correctness checks for the patch-slimming reference implementation (arXiv 2106.02852). Run:
python -m pytest -q -n 2 --dist loadgroup (two workers, a thread each; plain `python -m pytest -q` runs in one process)

The file reads by kind (STYLE.md), a section each, each opening with what it establishes:
1. parity with independent references: timm's DeiT, the Eq. 2 forward written from its definition, Eq. 6 by
   brute-force path enumeration, FlopCounterMode, Algorithm 1 written out independently, the paper's numbers;
2. invariants of the method: keeping every token changes nothing, masks stay nested, a block fine-tune touches
   only its block, resumed runs reach the uninterrupted result;
3. bad input: one line naming the problem and the fix;
4. end-to-end runs of the CLI on the shipped CIFAR-10 proxy and the committed images (data/cifar10-mini), under
   torchrun, and at DeiT-S shapes.
The references and set-ups shared by several tests come first.
"""
import copy
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import data
import flops
import slim
import vit
from pipeline import caches, evaluate
from pipeline import cli as pipeline_cli
from pipeline.cli import cli
from pipeline import run as pipeline_run
from pipeline import finetune as pipeline_finetune
from vit import UserError

REPO = os.path.dirname(os.path.abspath(__file__))
PROXY_CKPT = vit.PROXY_CHECKPOINT  # the shipped proxy (models/README.md)
CIFAR = os.path.join(REPO, "data", "cifar10-mini")  # committed: 30 train and 20 val images per class of CIFAR-10
# The whole CIFAR-10 tree (5,000 val images) is not in a clone: data/cifar10 once `--data cifar10` has written it,
# or the developers' fixtures beside the repository.
CIFAR_FULL = next((p for p in (data.CIFAR10_DIR, os.path.join(REPO, "..", "shared", "data", "cifar10"))
                   if os.path.isdir(os.path.join(p, "val"))), None)
needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                                reason="the export extra is not installed: pip install -r requirements-export.txt")
needs_full_val = pytest.mark.skipif(CIFAR_FULL is None, reason="needs the whole CIFAR-10 val set (5,000 images): "
                                    "run `python slim.py --data cifar10 --eval-only` once to write data/cifar10")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)  # -n 2: a core for each of the two workers
SMALL_CFG = vit.ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=4, num_heads=2)


FAMILY = {  # the DeiT family at test size: plain, distilled (2 prefix tokens), DeiT-III (LayerScale, patch-only pos)
    "deit": SMALL_CFG,
    "distilled": replace(SMALL_CFG, prefix_tokens=2),
    "deit3": replace(SMALL_CFG, layer_scale=True, pos_embed_prefix=False),
}


def family_model(family, seed=0):
    """A random model of FAMILY[family]; LayerScale gains drawn around 1 (their init, 1e-5, would hide the branches)."""
    torch.manual_seed(seed)
    model = vit.VisionTransformer(FAMILY[family]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


def random_nested_keep(cfg, seed, last_cls_only=True):
    """Random nested masks: each layer keeps the prefix tokens and a random subset of the previous layer's patches;
    with last_cls_only the last layer keeps the prefix tokens alone (m_L)."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.prefix_tokens
    prev, keep = torch.arange(cfg.num_tokens), []
    for l in range(cfg.depth):
        if last_cls_only and l == cfg.depth - 1:
            k = vit.prefix_mask(cfg)
        else:
            n = int(torch.randint(0, prev.numel() - P + 1, (1,), generator=g))
            k = torch.cat([prev[:P], prev[P:][torch.randperm(prev.numel() - P, generator=g)[:n]]]).sort().values
        keep.append(k)
        prev = k
    return keep


def eq2_reference(model, img, keep, tokens, maps=None):
    """The two token semantics written straight from their definitions, independently of vit.py's gathered forward:
    every one of the N rows is computed densely, and block t multiplies its MSA and MLP outputs by diag(m_t) (Eq. 2).
    "frozen" (method.md P1): keys from every row. "removed" (C1): keys only from the rows alive after layer t-1.
    keep: m_t per layer, (n_t,) for every image, or (B, n_t) per image (DPS-ViT, P6: a batch of per-sample masks,
    image b's diag(m_t) and rows alive its own). maps: a list that receives, per block, (P, Z) with P (B, H, N, N)
    every row's attention and Z the block input."""
    x = model.embed(img)
    alive = torch.ones(x.shape[1], dtype=torch.bool)
    for blk, k in zip(model.blocks, keep):
        x, alive = eq2_block(blk, x, k, alive, tokens, maps)
    return model.classify(model.norm(x[:, :model.cfg.prefix_tokens]))


def eq2_block(blk, x, k, alive, tokens, maps=None):
    """One block of the reference: all N rows of every image computed, the MSA and MLP outputs multiplied by diag(m)
    (m: the rows k, (n,) for every image or (B, n) per image); keys from every row ("frozen") or from the rows alive
    (a boolean mask, (N,) or (B, N), "removed"). Returns (x, m as alive, (B, N))."""
    B, N, d = x.shape
    a = blk.attn
    m = torch.zeros(B, N).scatter_(1, torch.as_tensor(k).expand(B, -1), 1.0).unsqueeze(-1)  # diag(m) of each image
    q, kk, v = a.qkv(blk.norm1(x)).view(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    s = (q @ kk.transpose(-2, -1)) * a.scale
    p = (s if tokens == "frozen" else s.masked_fill(~alive.expand(B, N)[:, None, None, :], float("-inf"))).softmax(-1)
    if maps is not None:
        maps.append((p, x))
    x = x + m * blk.ls1(a.proj((p @ v).transpose(1, 2).reshape(B, N, d)))
    x = x + m * blk.ls2(blk.mlp(blk.norm2(x)))
    return x, m.squeeze(-1).bool()


# ----------------------------------------------------------------------------- the other references and shared set-ups the tests use

def counted_macs(model, keep, tokens):
    """torch's own FLOP counter on the real (gathered) forward; it counts 2 FLOPs per MAC."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        model(torch.randn(1, 3, model.cfg.img_size, model.cfg.img_size), keep=keep, tokens=tokens)
    return fc.get_total_flops() / 2


CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}


def alg1_as_written(model, fit, held, s):
    """Algorithm 1 from the paper's listing (method.md §4), written here independently of slim's two loops: for
    t = L-1..1, m_t = m_{t+1} ∪ the r best patches for r = 0, r', 2r', ... (at last every patch), fine-tune block t
    at every r without ever resetting it, stop at the first E_{t+1} <= eps after the fine-tune."""
    N, L = model.cfg.num_tokens, model.cfg.depth
    keep = [torch.arange(N)] * (L - 1) + [torch.tensor([0])]                 # m_L = e_0
    for t in range(L - 1, 0, -1):
        dense_t = keep[:t - 1] + [torch.arange(N)] + keep[t:]
        scores = slim.layer_scores(model, fit.z[t - 1][:s.score_images], dense_t, s.tokens, t, s.score,
                                   s.batch_size, s.seed)
        above = set(keep[t].tolist())
        order = [i for i in scores.argsort(descending=True, stable=True).tolist() if i not in above]
        r = 0
        while True:
            trial = keep[:t - 1] + [torch.tensor(sorted(above | set(order[:r])))] + keep[t:]
            slim.finetune_block(model, t, slim.at_layer(fit, t), trial, s, seed=s.seed + 1000 * t + r, desc="")
            e = slim.layer_error(model, slim.at_layer(held, t), trial, s.tokens, s.error, t, s.batch_size).relative
            if e <= s.eps or r == len(order):
                break
            r = min(r + s.r_step, len(order))
        keep = trial
    return keep


FIG5_PYRAMID = [197, 197, 160, 153, 121, 101, 83, 63, 50, 25, 20, 1]  # DeiT-S kept patches, paper's Fig. 5 (approx.)


TINY_CFG = vit.ViTConfig(img_size=8, patch_size=4, num_classes=3, embed_dim=8, depth=4, num_heads=2)  # 5 tokens


def search_setup(eps, seed=0, tokens="frozen", error="next", **settings):
    torch.manual_seed(seed)
    model = vit.VisionTransformer(SMALL_CFG).eval()
    imgs = torch.utils.data.TensorDataset(torch.randn(96, 3, 32, 32), torch.zeros(96, dtype=torch.long))
    fit = caches.cache_dense(model, data.loader(torch.utils.data.Subset(imgs, range(64)), 32, workers=0), "fit")
    held = caches.cache_dense(model, data.loader(torch.utils.data.Subset(imgs, range(64, 96)), 32, workers=0), "held")
    s = slim.SearchSettings(**{**dict(tokens=tokens, error=error, eps=eps, r_step=2, ft_steps=3, score_images=16,
                                      batch_size=32), **settings})
    return model, fit, held, s


# eps where the random tiny model keeps some patches and drops others (frozen rows barely move a random model)
MID_EPS = {("frozen", "next"): 3e-5, ("removed", "next"): 0.005, ("frozen", "final"): 0.01, ("removed", "final"): 0.3}


def class_folders(root, train, val, per_class=1):
    """An ImageFolder tree root/{train,val}/<class>/ with per_class tiny images each (None: no such split)."""
    for split, classes in (("train", train), ("val", val)):
        for c in classes or []:
            os.makedirs(root / split / c)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (25 * i, 0, 0)).save(root / split / c / f"{i}.png")
    return str(root)


def image_folder(root, classes, train_per_class, val_per_class, size=(40, 48), seed=0, grow=4):
    """A tiny ImageNet-layout folder (root/{train,val}/<wnid>/*.JPEG) of random images, image i of a class `grow`*i
    pixels taller than `size` (0: all of that size, as the small-image recipe requires)."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (size[0] + grow * i, size[1], 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(d / f"img_{i}.JPEG")
    return root


def schedule(ds, s, workers=0):
    """The final fine-tune's Schedule of the small test model on ds with recipe s."""
    return pipeline_finetune.Schedule(ds, s, SMALL_CFG, workers)


def small_finetune_setup(seed=0, **settings):
    torch.manual_seed(seed)
    student = vit.VisionTransformer(SMALL_CFG).eval()
    teacher = vit.VisionTransformer(SMALL_CFG).eval()
    ds = torch.utils.data.TensorDataset(torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,)))
    keep = random_nested_keep(SMALL_CFG, seed=1)
    s = pipeline_finetune.FinetuneSettings(**{**dict(epochs=2, lr=1e-3, lr_batch=8, batch_size=8, warmup_epochs=0.5,
                                                     mixup=0.8, cutmix=1.0, distill="hard", label_smoothing=0.1),
                                              **settings})
    return student, teacher, keep, ds, s


def release_checkpoint(path, preset, num_classes, **config):
    """A release-format checkpoint ({"model": state_dict}, timm names) of a random model of a preset; with config
    entries, a "config" dict as well."""
    cfg = vit.ViTConfig(**{**vit.asdict(vit.PRESETS[preset]), "num_classes": num_classes})
    torch.manual_seed(0)
    ck = {"model": vit.VisionTransformer(cfg).state_dict()}
    if config:
        ck["config"] = {**vit.asdict(cfg), **config}
    torch.save(ck, path)
    return path


# ----------------------------------------------------------------------------- parity with independent references
# Each test compares the code with a reference written here or in another library (timm, FlopCounterMode, a
# brute-force enumeration, Alg. 1 written out, the paper's own numbers): they establish that the code computes what the paper says.


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit3_small_patch16_224",
                                  "deit3_base_patch16_224", "deit_small_distilled_patch16_224"])
def test_parity_with_timm(tmp_path, name):
    """Release-format checkpoints made from timm's models (random weights, perturbed so that LayerScale's 1e-6 init
    does not hide the blocks) load strictly, are recognised from their keys, and give timm's eval logits."""
    timm = pytest.importorskip("timm", reason="timm is a test dependency: pip install -r requirements-dev.txt")
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save({"model": ref.state_dict()}, tmp_path / "release.pth")  # the release format, no config entry
    preset = vit.PRESETS[name.split("_patch")[0]]
    ours = vit.load_checkpoint(tmp_path / "release.pth", expect=preset)
    assert vit.infer_config(ref.state_dict()) == preset
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-4)
    if preset.layer_scale:  # the official DeiT-III files name the gains blocks.i.gamma_1 / gamma_2
        official = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in ref.state_dict().items()}
        assert "blocks.0.gamma_1" in official
        torch.save({"model": official}, tmp_path / "official.pth")
        with torch.no_grad():
            assert torch.equal(vit.load_checkpoint(tmp_path / "official.pth")(x), ours(x))


@pytest.mark.parametrize("family", list(FAMILY))
@pytest.mark.parametrize("tokens", vit.TOKENS)
@pytest.mark.parametrize("seed", range(4))
def test_gathered_forward_equals_the_eq2_reference(seed, tokens, family):
    """Must-hold 1: the gathered forward (rows selected, computed, written back or dropped) equals the dense
    masked reference for random nested masks, under both token semantics, for every family."""
    model = family_model(family, seed)
    x = torch.randn(3, 3, 32, 32)
    keep = random_nested_keep(model.cfg, seed, last_cls_only=seed % 2 == 0)
    with torch.no_grad():
        out, ref = model(x, keep=keep, tokens=tokens), eq2_reference(model, x, keep, tokens)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        y, maps = model.attention_maps(model.embed(x), keep, tokens)  # the explicit softmax computes the same thing
        assert torch.allclose(model.classify(model.features(y)), ref, atol=1e-5)
    n_keys = model.cfg.num_tokens if tokens == "frozen" else keep[-2].numel()
    assert maps[-1].P.shape[2:] == (keep[-1].numel(), n_keys)  # kept queries x (all | alive) keys
    assert torch.equal(maps[-1].query_rows, keep[-1])


@pytest.mark.parametrize("name,seed", [("deit_tiny", s) for s in (None, 0, 1, 2)] +
                         [(n, s) for n in ("deit_tiny_distilled", "deit3_small") for s in (None, 0)])
@pytest.mark.parametrize("tokens", vit.TOKENS)
def test_flops_match_torch_counter(seed, tokens, name):
    """Must-hold 4: the closed form equals what the real forward executes, under both semantics, every family."""
    model = vit.deit(name).eval()
    keep = None if seed is None else random_nested_keep(model.cfg, seed)
    ours, theirs = flops.count_flops(model.cfg, keep, tokens=tokens), counted_macs(model, keep, tokens)
    assert ours == theirs, (ours, theirs)  # to the multiply-add: both count matmuls and convs only (NOT_COUNTED)


@pytest.mark.parametrize("tokens,gflops", [("frozen", "2.66"), ("removed", "2.33")])
def test_fig5_pyramid_costs_what_the_paper_counts(tmp_path, capsys, tokens, gflops):
    """python flops.py --model deit_small --masks F (first-k tokens): 2.66 G frozen (paper: 2.6 G), 2.33 G removed;
    the file's own semantics by default, the other with an explicit --tokens."""
    cfg = vit.PRESETS["deit_small"]
    vit.save_masks(tmp_path / "fig5.json", [torch.arange(n) for n in FIG5_PYRAMID], cfg, tokens)
    total = flops.main(flops.get_args_parser().parse_args(["--model", "deit_small", "--masks", str(tmp_path / "fig5.json")]))
    assert f"total {gflops} GFLOPs" in capsys.readouterr().out and f"{total / 1e9:.2f}" == gflops
    other = "removed" if tokens == "frozen" else "frozen"
    flops.main(flops.get_args_parser().parse_args(["--masks", str(tmp_path / "fig5.json"), "--tokens", other]))
    out = capsys.readouterr().out
    assert f"searched with tokens='{tokens}'" in out and ("2.33" if other == "removed" else "2.66") in out


def test_dense_flops_match_paper():
    assert [round(flops.count_flops(vit.PRESETS[m]) / 1e9, 1) for m in ("deit_tiny", "deit_small", "deit_base")] \
        == [1.3, 4.6, 17.6]


def test_eval_transform_is_deit_recipe_at_224():
    t = data.build_transform(224, train=False).transforms
    assert list(t[0].size) == [256] and t[0].interpolation.value == "bicubic" and list(t[1].size) == [224, 224]


@needs_full_val
def test_proxy_checkpoint_reproduces_its_val_predictions():
    """The shipped proxy predicts, on every 5th CIFAR-10 val image, what the headline run's predictions.npz holds for
    it as dense; that file's dense top-1 over the whole val set is the checkpoint's own val_top1."""
    ck = torch.load(PROXY_CKPT, map_location="cpu", weights_only=False)
    with np.load(os.path.join(REPO, "results", "cifar10-proxy", "predictions.npz")) as f:
        committed = {k: f[k] for k in ("labels", "dense")}
    model = vit.load_checkpoint(PROXY_CKPT)
    ds = data.build_dataset(CIFAR_FULL, "val", model.cfg.img_size)
    every_5th = range(0, len(ds), 5)
    preds, labels = evaluate.predict(model, torch.utils.data.Subset(ds, every_5th), workers=2)
    assert np.array_equal(labels.numpy(), committed["labels"][every_5th])
    assert (preds.numpy() != committed["dense"][every_5th]).sum() <= 1  # float summation order may flip a near-tie
    assert abs(100 * (committed["dense"] == committed["labels"]).mean() - 100 * ck["val_top1"]) <= 0.02


@pytest.mark.parametrize("tokens", vit.TOKENS)
@pytest.mark.parametrize("t", [1, 2])
def test_eq6_exact_recursion_equals_brute_force_paths(t, tokens):
    """Must-hold 3: on a tiny model (2 heads, 4 layers, 5 tokens), slim.significance_score (the C3a recursion over the
    recorded maps) equals Eq. 6 enumerated path by path, Σ_{h_t..h_L} ||A[:, i] U^{h_t}[i, :]||², with
    A = Π_{l=t+1..L} diag(m_l) P^{h_l}_l and U = P^{h_t}_t |Z_{t-1}|, everything taken from the independent
    reference forward (N x N maps of every row)."""
    import itertools
    torch.manual_seed(t)
    model = vit.VisionTransformer(TINY_CFG).eval()
    N, L, H = TINY_CFG.num_tokens, TINY_CFG.depth, TINY_CFG.num_heads
    keep = [torch.arange(N)] * t + [torch.tensor([0, 1, 3]), torch.tensor([0, 3]), torch.tensor([0])][-(L - t):]
    img = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        maps = []
        eq2_reference(model, img, keep, tokens, maps)
        x_t = maps[t - 1][1]  # Z_{t-1}, the input of block t
        _, attention = model.attention_maps(x_t, keep, tokens, start=t)
        got = slim.significance_score(attention, x_t)
    D = [torch.diag(torch.zeros(N).index_fill(0, k, 1.0)) for k in keep]
    for b in range(img.shape[0]):
        want = torch.zeros(N)
        for path in itertools.product(range(H), repeat=L - t + 1):  # one head per layer t..L
            U = maps[t - 1][0][b, path[0]] @ x_t[b].abs()
            A = torch.eye(N)
            for l, h in zip(range(t + 1, L + 1), path[1:]):
                A = D[l - 1] @ maps[l - 1][0][b, h] @ A
            want += torch.stack([torch.outer(A[:, i], U[i]).pow(2).sum() for i in range(N)])
        assert torch.allclose(got[b], want, rtol=1e-4, atol=1e-7), (got[b], want)
    assert len(attention) == L - t + 1


def test_head_mean_score_matches_its_definition():
    """The v1 score: ||Ā[:, i]||² Σ_h ||head_out_h[i]||², Ā the chain of head-averaged diag(m_l) P_l, computed the long
    way from the reference forward (removed semantics, as v1 ran it)."""
    torch.manual_seed(0)
    model = vit.VisionTransformer(TINY_CFG).eval()
    N, L = TINY_CFG.num_tokens, TINY_CFG.depth
    keep = [torch.arange(N), torch.tensor([0, 2, 4]), torch.tensor([0, 4]), torch.tensor([0])]
    img = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        maps = []
        eq2_reference(model, img, keep, "removed", maps)
        _, attention = model.attention_maps(maps[0][1], keep, "removed", start=1)
        got = slim.head_mean_score(attention, maps[0][1], model.blocks[0])
        a = model.blocks[0].attn
        v = a.qkv(model.blocks[0].norm1(maps[0][1]))[..., 2 * a.head_dim * a.num_heads:]
        v = v.view(2, N, a.num_heads, a.head_dim).transpose(1, 2)
        w = a.proj.weight.view(-1, a.num_heads, a.head_dim)
        head_out = torch.stack([(maps[0][0][:, h] @ v[:, h]) @ w[:, h].T for h in range(a.num_heads)], 1)
    for b in range(2):
        A = torch.eye(N)
        for l in range(2, L + 1):
            A = torch.diag(torch.zeros(N).index_fill(0, keep[l - 1], 1.0)) @ maps[l - 1][0][b].mean(0) @ A
        want = A.pow(2).sum(0) * head_out[b].pow(2).sum(-1).sum(0)
        assert torch.allclose(got[b], want, rtol=1e-4, atol=1e-8)


def test_comparison_scores():
    """attn: the norm of each column of layer t's attention over queries and heads; class-attn: row 0 of layer t+1's
    head-averaged attention. Both against the attention maps of the Eq. 2 reference forward (all N rows computed
    densely), not the records the scores read. random: another seed, another score. All (B, N)."""
    torch.manual_seed(0)
    model = vit.VisionTransformer(TINY_CFG).eval()
    N = TINY_CFG.num_tokens
    keep = [torch.arange(N), torch.tensor([0, 2, 4]), torch.tensor([0, 4]), torch.tensor([0])]
    img = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        maps = []
        _, attention = model.attention_maps(model.embed(img), keep, "frozen")
        eq2_reference(model, img, keep, "frozen", maps)
    P1, P2 = maps[0][0], maps[1][0]                       # layers t = 1 (dense) and t+1 = 2: (B, H, N, N)
    want_attn = torch.stack([torch.tensor([sum(P1[b, h, q, i].item() ** 2 for h in range(P1.shape[1])
                                               for q in range(N)) ** 0.5 for i in range(N)]) for b in range(2)])
    assert torch.allclose(slim.attn_score(attention), want_attn, rtol=1e-4, atol=1e-6)
    assert torch.allclose(slim.class_attention_score(attention), P2[:, :, 0].mean(1), rtol=1e-4, atol=1e-6)
    x = model.embed(img)
    a = slim.layer_scores(model, x, keep, "frozen", 1, "random", 8, seed=3)  # --seed decides the random baseline
    assert a.shape == (N,) and not torch.equal(a, slim.layer_scores(model, x, keep, "frozen", 1, "random", 8, seed=4))


def test_layer_scores_average_over_images_whatever_the_batch():
    """Alg. 1, line 3: s_t is the mean over the scoring images of each image's Eq. 6 score; the batching must not
    weight images unequally (5 images in batches of 2: 2 + 2 + 1)."""
    torch.manual_seed(0)
    model = vit.VisionTransformer(TINY_CFG).eval()
    N = TINY_CFG.num_tokens
    keep = [torch.arange(N), torch.arange(N), torch.tensor([0, 4]), torch.tensor([0])]
    with torch.no_grad():
        z1 = model.blocks[0](model.embed(torch.randn(5, 3, 8, 8)))           # Z_1, the input of block 2
        per_image = []
        for b in range(5):
            _, attention = model.attention_maps(z1[b:b + 1], keep, "frozen", start=2)
            per_image.append(slim.significance_score(attention, z1[b:b + 1])[0])
    want = torch.stack(per_image).mean(0)
    got = slim.layer_scores(model, z1, keep, "frozen", 2, "significance", batch_size=2)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-9)


def test_spearman_against_a_reference_written_here():
    """Spearman's rho is Pearson's correlation of the ranks: a monotone non-linear map gives exactly 1 (Pearson's
    would not), a known permutation 0.8, and random rows the reference's value, row by row."""
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert float(slim.spearman(a, a ** 5)) == pytest.approx(1.0) and float(np.corrcoef(a, a ** 5)[0, 1]) < 0.99
    assert float(slim.spearman(a, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0]))) == pytest.approx(0.8)  # 1 - 6*4/120
    x, y = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), torch.randn(3, 50)

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0] * len(v)
        for place, i in enumerate(order):
            r[i] = place
        return r
    want = [np.corrcoef(ranks(x[b].tolist()), ranks(y[b].tolist()))[0, 1] for b in range(3)]
    assert slim.spearman(x, y).tolist() == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("tokens", vit.TOKENS)
def test_next_layer_error_equals_a_direct_computation(tokens):
    """P4/C4: E_{t+1} is the relative squared error of layer t+1's kept rows when blocks t and t+1, pruned, run on the
    dense Z_{t-1}; written here by hand from the Eq. 2 reference (both blocks on all N rows, diag(m) outputs)."""
    torch.manual_seed(0)
    model = vit.VisionTransformer(SMALL_CFG).eval()
    N, L, t = SMALL_CFG.num_tokens, SMALL_CFG.depth, 2
    img = torch.randn(4, 3, 32, 32)
    cache = caches.cache_dense(model, data.loader(torch.utils.data.TensorDataset(img, torch.zeros(4)), 4, workers=0), "c")
    keep = [torch.arange(N), torch.tensor([0, 2, 3, 5, 7, 11]), torch.tensor([0, 3, 7]), torch.tensor([0])]
    got = slim.layer_error(model, slim.at_layer(cache, t), keep, tokens, "next", t, 3)
    with torch.no_grad():
        z_prev = model.blocks[0](model.embed(img))                        # Z_{t-1}, dense
        z_next = model.blocks[2](model.blocks[1](z_prev))                 # Z_{t+1}, dense
        x, alive = z_prev, torch.ones(N, dtype=torch.bool)                # blocks t, t+1 of the Eq. 2 reference
        for blk, k in ((model.blocks[1], keep[1]), (model.blocks[2], keep[2])):
            x, alive = eq2_block(blk, x, k, alive, tokens)
        rows = keep[t]
        squared = (x[:, rows] - z_next[:, rows]).pow(2).sum((1, 2))          # Eq. 3's unnormalised norm, per image
        want = (squared / z_next[:, rows].pow(2).sum((1, 2))).mean()        # C4: relative, then averaged
    assert got.relative == pytest.approx(want.item(), rel=1e-4) and got.relative > 0
    assert got.absolute == pytest.approx(squared.mean().item(), rel=1e-4)
    full = [torch.arange(N)] * (L - 1) + [torch.tensor([0])]  # blocks t, t+1 unpruned on the kept rows: no error
    assert slim.layer_error(model, slim.at_layer(cache, t), full, tokens, "next", t, 3).relative < 1e-10


@pytest.mark.parametrize("tokens", vit.TOKENS)
def test_default_search_is_alg1_as_written(tokens):
    """Must-hold 1: slim.search's default equals Alg. 1 written independently above, masks and every weight, with
    real fine-tuning (lr > 0) at several eps. The fast path, run on the same cases, chooses other masks at one of
    them at least, so this test tells the two loops apart."""
    differ = 0
    for eps in (1e-5, 3e-5, 1e-4) if tokens == "frozen" else (0.002, 0.005, 0.02):
        model, fit, held, s = search_setup(eps, tokens=tokens, ft_lr=1e-2)
        assert s.search == "alg1"
        state = slim.search(model, fit, held, s, log=lambda m: None)
        ref_model, fit, held, _ = search_setup(eps, tokens=tokens, ft_lr=1e-2)
        ref_keep = alg1_as_written(ref_model, fit, held, s)
        assert [k.tolist() for k in state["keep"]] == [k.tolist() for k in ref_keep], eps
        for (name, p), q in zip(model.state_dict().items(), ref_model.state_dict().values()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (eps, name)
        fast_model, fit, held, fast = search_setup(eps, tokens=tokens, ft_lr=1e-2, search="fast")
        fast_keep = slim.search(fast_model, fit, held, fast, log=lambda m: None)["keep"]
        differ += [k.tolist() for k in fast_keep] != [k.tolist() for k in ref_keep]
    assert differ, "the fast path chose Alg. 1's masks at every eps: the test cannot tell the loops apart"


@pytest.mark.parametrize("tokens,eps", [("removed", 0.03), ("frozen", MID_EPS["frozen", "next"])])
def test_fast_path_takes_the_candidate_its_rule_names(tokens, eps):
    """Must-hold 2: --search fast against an exhaustive scan of every r, with the rescue branch on. Its rule
    (slim.search_layer_fast): i_ok = the first r with E0 <= eps, i_ft = the first with E0 <= ft_reach * eps; of
    i_ft .. i_ok-1 the first ft_tries are fine-tuned from the layer's starting weights, and the first whose E is
    then <= eps is taken; else i_ok. The reference measures E0 at every r (no bisection). The recorded E must be the
    error of the weights the layer leaves."""
    model, fit, held, s = search_setup(eps, tokens=tokens, ft_lr=1e-4, ft_steps=10, search="fast", ft_reach=4.0,
                                       ft_tries=2)
    N, L = SMALL_CFG.num_tokens, SMALL_CFG.depth
    keep, rescued = [torch.arange(N)] * (L - 1) + [torch.tensor([0])], 0
    for t in range(L - 1, 0, -1):
        fit_t, held_t = slim.at_layer(fit, t), slim.at_layer(held, t)
        start = copy.deepcopy(model.state_dict())
        scores = slim.layer_scores(model, fit.z[t - 1][:s.score_images], keep[:t - 1] + [torch.arange(N)] + keep[t:],
                                   tokens, t, s.score, s.batch_size, s.seed)
        above = set(keep[t].tolist())
        order = [i for i in scores.argsort(descending=True, stable=True).tolist() if i not in above]
        rs = list(range(0, len(order), s.r_step)) + [len(order)]
        masks = [keep[:t - 1] + [torch.tensor(sorted(above | set(order[:r])))] + keep[t:] for r in rs]
        e0 = [slim.layer_error(model, held_t, m, tokens, "next", t, s.batch_size).relative for m in masks]
        i_ok = next((i for i, e in enumerate(e0) if e <= eps), len(rs) - 1)
        i_ft = next((i for i, e in enumerate(e0) if e <= s.ft_reach * eps), len(rs) - 1)
        want = i_ok
        for i in list(range(i_ft, i_ok))[:s.ft_tries]:
            model.load_state_dict(start)
            slim.finetune_block(model, t, fit_t, masks[i], s, seed=s.seed + 1000 * t + rs[i], desc="")
            if slim.layer_error(model, held_t, masks[i], tokens, "next", t, s.batch_size).relative <= eps:
                want, rescued = i, rescued + 1
                break
        model.load_state_dict(start)
        k_t, info = slim.search_layer(model, t, keep, fit_t, held_t, s, log=lambda m: None)
        assert k_t.tolist() == masks[want][t - 1].tolist(), (t, rs[want], e0)
        keep = keep[:t - 1] + [k_t] + keep[t:]
        assert info["E"] == pytest.approx(slim.layer_error(model, held_t, keep, tokens, "next", t, s.batch_size).relative,
                                          rel=1e-3)
    if tokens == "removed":  # where this random model's fine-tunes lower E enough (frozen rows barely move it)
        assert rescued, "no layer took a candidate rescued by its fine-tune: the rescue branch went untested"


@pytest.mark.parametrize("family", list(FAMILY))
def test_single_layer_bench_predicts_what_the_model_predicts(family):
    """bench/single_layer.py's predictions from a cached Z_{t-1}: one class per image, the model's own (a change of
    the features' shape once made every Fig. 6 point read 10%)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
    from single_layer import predictions
    torch.manual_seed(0)
    cfg = FAMILY[family]
    model, x, keep = vit.VisionTransformer(cfg).eval(), torch.randn(6, 3, 32, 32), random_nested_keep(cfg, 1)
    with torch.no_grad():
        z_in = model.run_blocks(model.embed(x), keep, "frozen", 1, 2)  # Z_2 under keep: the input of block 3
        expected = model(x, keep, "frozen").argmax(-1).numpy()
    got = predictions(model, z_in, keep, "frozen", 3, batch_size=4)
    assert got.shape == (6,) and (got == expected).all()


# ----------------------------------------------------------------------------- invariants of the method
# Properties the method must keep whatever the weights: keeping every token changes nothing, frozen rows pass
# through, masks nest and hold the prefix tokens, a block fine-tune touches only its block, runs resume to the same result.


@pytest.mark.parametrize("family", list(FAMILY))
@pytest.mark.parametrize("tokens", vit.TOKENS)
def test_keeping_every_token_gives_the_dense_logits_through_the_gather(tokens, family):
    """Must-hold 2, through the gathered code path, not the dense one: (a) a block called with every index equals
    the block called with none; (b) masks that keep every token but one patch at the last layer give the dense
    logits (the heads read only the prefix tokens), through the gather and in the Eq. 2 reference, and the last
    block returns the rows its semantics says: all N frozen, N - 1 removed."""
    model = family_model(family)
    x, N, L = torch.randn(3, 3, 32, 32), model.cfg.num_tokens, model.cfg.depth
    z = model.embed(x)
    with torch.no_grad():
        for blk in model.blocks:
            assert torch.allclose(blk(z, torch.arange(N), tokens), blk(z), atol=1e-6)
        all_but_one = [torch.arange(N)] * (L - 1) + [torch.arange(N - 1)]  # the last block skips patch N-1
        dense, ref = model(x), eq2_reference(model, x, all_but_one, tokens)
        assert torch.allclose(model(x, all_but_one, tokens), dense, atol=1e-5)  # class token: same as dense
        assert torch.allclose(ref, dense, atol=1e-5)
        feats = model.run_blocks(z, all_but_one, tokens)
        rows = feats.shape[1]
        assert rows == (N if tokens == "frozen" else N - 1)


def test_frozen_rows_pass_through_unchanged():
    """P1: a patch pruned at layer t keeps its feature from then on, and every row stays in the sequence."""
    torch.manual_seed(0)
    model = vit.VisionTransformer(SMALL_CFG).eval()
    N, L = SMALL_CFG.num_tokens, SMALL_CFG.depth
    keep = [torch.arange(N), torch.tensor([0, 1, 2, 3])] + [torch.tensor([0, 1])] * (L - 2)
    z = model.embed(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        after_1 = model.run_blocks(z, keep, "frozen", end=1)
        out = model.run_blocks(z, keep, "frozen")
    assert out.shape[1] == N
    assert torch.equal(out[:, 4:], after_1[:, 4:])            # pruned at layer 2: frozen since layer 1's output
    assert not torch.allclose(out[:, :2], after_1[:, :2])     # kept rows were updated


@pytest.mark.parametrize("tokens,error", list(MID_EPS))
@pytest.mark.parametrize("eps", [1e9, "mid", 1e-6])
@pytest.mark.parametrize("search", list(slim.SEARCH_LOOPS))
def test_search_reports_the_error_of_what_it_returns(search, eps, tokens, error):
    eps = MID_EPS[tokens, error] if eps == "mid" else eps
    model, fit, held, s = search_setup(eps, tokens=tokens, error=error, search=search)
    state = slim.search(model, fit, held, s, log=lambda m: None)
    keep = vit.check_keep(state["keep"], SMALL_CFG)
    counts = [k.numel() for k in keep]
    N = SMALL_CFG.num_tokens
    if eps == 1e9:   # anything goes: only what m_L = e_0 and nesting force is kept
        assert counts == [1] * SMALL_CFG.depth
    if eps == 1e-6:  # nothing may change: every patch is kept below the last layer
        assert counts[:-1] == [N] * (SMALL_CFG.depth - 1)
    for lay in state["layers"]:  # the reported E is the error of the model the search returns, measured again
        t = lay["layer"]
        searched = [torch.arange(N)] * (t - 1) + keep[t - 1:]    # as layer t was searched: layers below dense
        e = slim.layer_error(model, slim.at_layer(held, t), searched, tokens, error, t, 32)
        assert (lay["E"], lay["E_abs"]) == (pytest.approx(e.relative, rel=1e-3), pytest.approx(e.absolute, rel=1e-3))


@pytest.mark.parametrize("error", list(slim.ERRORS))
def test_block_finetune_changes_only_block_t(error):
    model, fit, held, s = search_setup(0.01, error=error)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    N, t = SMALL_CFG.num_tokens, 2
    keep = [torch.arange(N), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1]), torch.tensor([0])]
    slim.finetune_block(model, t, slim.at_layer(fit, t), keep, s, seed=0, desc="ft")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(f"blocks.{t - 1}.") for k in changed), changed
    assert all(not p.requires_grad for p in model.parameters())


def test_alg1_finetunes_only_block_t_and_carries_its_weights_over(monkeypatch):
    """Must-hold 3: in the default loop every r fine-tunes block t only, starting from the weights the previous r's
    fine-tune left (never reset), and each trial records E before and after its fine-tune."""
    model, fit, held, s = search_setup(1e-9, ft_lr=1e-2)  # eps unreachable: every r is tried
    N, L, t = SMALL_CFG.num_tokens, SMALL_CFG.depth, 2
    keep = [torch.arange(N)] * (L - 1) + [torch.tensor([0])]
    keep[t] = torch.tensor([0, 3, 5])                                        # m_{t+1}
    seen, real = [], slim.finetune_block

    def spy(model, t_, *args, **kwargs):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        real(model, t_, *args, **kwargs)
        seen.append((t_, before, {k: v.clone() for k, v in model.state_dict().items()}))
    monkeypatch.setattr(slim, "finetune_block", spy)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    k_t, info = slim.search_layer(model, t, keep, slim.at_layer(fit, t), slim.at_layer(held, t), s, lambda m: None)
    assert len(seen) == len(info["trials"]) == len(range(0, N - 3, s.r_step)) + 1 and k_t.numel() == N
    assert [tr["r"] for tr in info["trials"]] == list(range(0, N - 3, s.r_step)) + [N - 3]
    for i, (t_, before, after) in enumerate(seen):
        assert t_ == t
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(k.startswith(f"blocks.{t - 1}.") for k in changed), changed
        if i:  # this r starts where the previous r's fine-tune ended
            assert all(torch.equal(before[k], seen[i - 1][2][k]) for k in before)
    assert all(torch.equal(model.state_dict()[k], seen[-1][2][k]) for k in original)   # the last weights stay
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items() if not k.startswith(f"blocks.{t - 1}."))
    assert all({"E0", "E0_abs", "E", "E_abs"} <= set(tr) for tr in info["trials"])
    assert any(tr["E"] != tr["E0"] for tr in info["trials"])


@pytest.mark.parametrize("tokens", vit.TOKENS)
def test_masks_file_roundtrip_and_validation(tmp_path, tokens):
    keep = random_nested_keep(SMALL_CFG, 1)
    vit.save_masks(tmp_path / "m.json", keep, SMALL_CFG, tokens, name="small")
    back, back_tokens = vit.load_masks(tmp_path / "m.json", SMALL_CFG)
    assert all(torch.equal(a, b) for a, b in zip(keep, back)) and back_tokens == tokens
    other = vit.ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=4, num_heads=2)
    with pytest.raises(UserError, match="is for 17 tokens but the model has 65"):
        vit.load_masks(tmp_path / "m.json", other)
    obj = json.loads((tmp_path / "m.json").read_text())
    del obj["tokens"]  # a file from before the entry existed means the paper's semantics (issue: "frozen")
    (tmp_path / "old.json").write_text(json.dumps(obj))
    assert vit.load_masks(tmp_path / "old.json", SMALL_CFG)[1] == "frozen"
    obj["tokens"] = "squashed"
    (tmp_path / "odd.json").write_text(json.dumps(obj))
    with pytest.raises(UserError, match="unknown token semantics 'squashed'"):
        vit.load_masks(tmp_path / "odd.json", SMALL_CFG)
    obj["tokens"], obj["keep"][2], obj["keep"][1] = tokens, [0, 16], [0, 15]
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(UserError, match="not nested"):
        vit.load_masks(tmp_path / "bad.json", SMALL_CFG)
    with pytest.raises(UserError, match="not found"):
        vit.load_masks(tmp_path / "none.json", SMALL_CFG)


def test_slimmed_checkpoint_carries_its_token_semantics(tmp_path):
    model, keep = vit.VisionTransformer(SMALL_CFG), random_nested_keep(SMALL_CFG, 3)
    sd = {"model": model.state_dict(), "config": vit.asdict(SMALL_CFG), "keep": [k.tolist() for k in keep]}
    torch.save({**sd, "tokens": "removed"}, tmp_path / "removed.pth")
    torch.save(sd, tmp_path / "v1.pth")  # no "tokens" entry
    assert vit.load_checkpoint(tmp_path / "removed.pth").tokens == "removed"
    assert vit.load_checkpoint(tmp_path / "v1.pth").tokens == "frozen"
    assert vit.resolve_tokens("removed", None, "f") == ("removed", None)
    tokens, note = vit.resolve_tokens("removed", "frozen", "f.json")  # an explicit --tokens: allowed, and said
    assert tokens == "frozen" and "searched with tokens='removed'" in note


def test_normalisation_comes_from_the_model(tmp_path):
    """The checkpoint's config sets the input statistics data.py uses; a bare state dict logs ImageNet's as assumed;
    --mean/--std override, and the log says so."""
    root = image_folder(tmp_path / "data", classes=10, train_per_class=1, val_per_class=1, size=(32, 32))
    cfg = replace(SMALL_CFG, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.save({"model": vit.VisionTransformer(cfg).state_dict(), "config": vit.asdict(cfg)}, tmp_path / "c.pth")
    model, info = vit.read_checkpoint(tmp_path / "c.pth")
    assert model.cfg.mean == (0.5, 0.5, 0.5) and "from the checkpoint's config" in info.normalisation
    ds = data.build_dataset(str(root), "val", 32, mean=model.cfg.mean, std=model.cfg.std)
    raw = torch.as_tensor(np.array(Image.open(ds.samples[0][0]).convert("RGB")), dtype=torch.float32).permute(2, 0, 1)
    assert torch.allclose(ds[0][0], (raw / 255 - 0.5) / 0.25, atol=1e-6)
    argv = ["--eval-only", "--data", "folder", "--data-path", str(root), "--workers", "0"]
    cli(argv + ["--weights", str(tmp_path / "c.pth"), "--out", str(tmp_path / "a")])
    assert "mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25): from the checkpoint's config" in (tmp_path / "a" / "eval.log").read_text()
    torch.save({"model": vit.VisionTransformer(SMALL_CFG).state_dict()}, tmp_path / "bare.pth")
    cli(argv + ["--weights", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "b")])
    assert "std (0.229, 0.224, 0.225): assumed ImageNet's" in (tmp_path / "b" / "eval.log").read_text()
    cli(argv + ["--weights", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "c"), "--mean", "0.4", "0.4",
                     "0.4", "--std", "0.2", "0.2", "0.2"])
    assert "mean (0.4, 0.4, 0.4), std (0.2, 0.2, 0.2): from --mean/--std" in (tmp_path / "c" / "eval.log").read_text()


def test_subsets_are_deterministic():
    class DS:
        targets = [i % 5 for i in range(100)]
    first = data.subset(DS, per_class=3).indices
    assert first == sorted(range(15))
    a, b = data.subset(DS, per_class=4, seed=1).indices, data.subset(DS, per_class=4, seed=1).indices
    assert a == b and sorted(DS.targets[i] for i in a) == sorted(list(range(5)) * 4)
    assert data.subset(DS, per_class=4, seed=2).indices != a


def test_seeded_view_draws_per_image_and_epoch():
    ds = data.SeededView(torch.utils.data.TensorDataset(torch.arange(4)), seed=3)

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)
    view = data.SeededView(Noisy(), seed=3)
    a = [view[i] for i in range(4)]
    torch.manual_seed(123)
    assert all(torch.equal(x, view[i]) for i, x in enumerate(reversed(a[::-1])))  # independent of order and state
    view.epoch = 1
    assert not torch.equal(a[0], view[0]) and len(ds) == 4


def test_memory_plan():
    cfg = vit.PRESETS["deit_small"]
    place, line = caches.cache_plan(cfg, 512, torch.device("cpu"))
    assert place.type == "cpu" and "512 images x 13 layers x 197 tokens x 384 in float32 = 1.88 GiB" in line
    with pytest.raises(UserError, match="do not fit.*--fit-images"):
        caches.cache_plan(cfg, 10**7, torch.device("cpu"))


def test_search_resumes_to_the_same_masks_and_refuses_other_settings(tmp_path):
    model, fit, held, s = search_setup(3e-5)
    whole = slim.search(model, fit, held, s, log=lambda m: None)
    model, fit, held, s = search_setup(3e-5)
    path = str(tmp_path / "state.pt")
    real, calls = slim.search_layer, []

    def killed_at_the_second_layer(*args):  # as a kill would: after the first layer's state was written
        if calls:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real(*args)
    slim.search_layer = killed_at_the_second_layer
    try:
        with pytest.raises(KeyboardInterrupt):
            slim.search(model, fit, held, s, log=lambda m: None, state_path=path)
    finally:
        slim.search_layer = real
    assert torch.load(path, weights_only=False)["next"] == calls[0] - 1
    model, fit, held, s = search_setup(3e-5)  # a fresh process: the model reloaded from its weights
    resumed = slim.search(model, fit, held, s, log=lambda m: None, state_path=path)
    assert [k.tolist() for k in resumed["keep"]] == [k.tolist() for k in whole["keep"]]
    assert all(torch.equal(a, b) for a, b in zip(resumed["model"].values(), whole["model"].values()))
    model, fit, held, s = search_setup(5e-5)  # a rerun with another eps must not return the eps=3e-5 masks
    with pytest.raises(UserError, match=r"other settings \(eps 3e-05 -> 5e-05\)"):
        slim.search(model, fit, held, s, log=lambda m: None, state_path=path)
    model, fit, held, s = search_setup(3e-5, tokens="removed")
    with pytest.raises(UserError, match="tokens 'frozen' -> 'removed'"):
        slim.search(model, fit, held, s, log=lambda m: None, state_path=path)


def test_final_finetune_resumes_mid_epoch_to_the_uninterrupted_weights(tmp_path):
    student, teacher, keep, ds, s = small_finetune_setup()
    whole = pipeline_finetune.finetune(student, teacher, keep, "frozen", schedule(ds, s), print)
    assert whole == 10  # 5 steps per epoch (40 images, batch 8, drop last), 2 epochs
    lines, ckpt = [], str(tmp_path / "finetune.pt")
    resumed, _, _, _, _ = small_finetune_setup()
    steps, real_step = [], pipeline_finetune.train_step

    def counted(*args):
        steps.append(1)
        return real_step(*args)

    class StopAfterSeven(pipeline_finetune.StopRequest):  # SIGTERM's flag, raised once 7 steps are whole
        flag = property(lambda self: len(steps) >= 7, lambda self, value: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_finetune, "train_step", counted)
        mp.setattr(pipeline_finetune, "StopRequest", StopAfterSeven)
        with pytest.raises(KeyboardInterrupt):
            pipeline_finetune.finetune(resumed, teacher, keep, "frozen", schedule(ds, s), lines.append,
                                       pipeline_finetune.Checkpoint(ckpt, {"masks": "m"}))
    assert torch.load(ckpt, weights_only=False)["step"] == 7 and "interrupted after step 7/10" in lines[-1]
    again, _, _, _, _ = small_finetune_setup()  # a new process: fresh weights, then the checkpoint
    assert pipeline_finetune.finetune(again, teacher, keep, "frozen", schedule(ds, s), lines.append,
                                      pipeline_finetune.Checkpoint(ckpt, {"masks": "m"})) == 3
    assert any("resuming the final fine-tune from" in m and "epoch 2, step 2 of 5 (7/10 done)" in m for m in lines)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), student.state_dict().values()))
    with pytest.raises(UserError, match=r"other settings \(lr 0.001 -> 0.002"):
        pipeline_finetune.finetune(again, teacher, keep, "frozen", schedule(ds, replace(s, lr=2e-3)), print,
                                   pipeline_finetune.Checkpoint(ckpt, {"masks": "m"}))


# ----------------------------------------------------------------------------- bad input
# What a user can get wrong gets one line naming the problem and the fix (or is handled as documented), never a
# traceback from deep inside torch and never a silently wrong result.


def test_bad_keep_is_a_clear_error():
    cfg, N = SMALL_CFG, SMALL_CFG.num_tokens
    good = random_nested_keep(cfg, 0)
    cases = {
        "layers but the model has depth": good[:-1],
        "does not keep the prefix tokens \\[0\\]": [torch.arange(1, N)] + good[1:],
        "not sorted and unique": [torch.tensor([0, 3, 2])] + good[1:],
        "but the model has 17 tokens": [torch.arange(N + 1)] + good[1:],
        "masks are not nested": [torch.tensor([0, 1])] + [torch.tensor([0, 2])] + good[2:],
    }
    model = vit.VisionTransformer(cfg)
    for msg, keep in cases.items():
        with pytest.raises(UserError, match=msg):
            model(torch.randn(1, 3, 32, 32), keep=keep)
    distilled = FAMILY["distilled"]  # P1 generalised: the distillation token 1 is kept at every layer too
    good = random_nested_keep(distilled, 0)
    assert good[-1].tolist() == [0, 1] and all(k[:2].tolist() == [0, 1] for k in good)
    no_dist = [good[0][good[0] != 1]] + [k[k != 1] for k in good[1:]]
    with pytest.raises(UserError, match=r"does not keep the prefix tokens \[0, 1\].*class and distillation"):
        vit.check_keep(no_dist, distilled)


def test_checkpoint_errors(tmp_path):
    model = vit.VisionTransformer(SMALL_CFG)
    torch.save({"model": model.state_dict()}, tmp_path / "small.pth")
    loaded = vit.load_checkpoint(tmp_path / "small.pth")  # architecture inferred from shapes
    assert loaded.cfg.embed_dim == 64 and loaded.cfg.depth == 4 and loaded.cfg.patch_size == 8
    with pytest.raises(UserError, match=r"does not match the model: .*embed_dim=64 \(expected 384\)"):
        vit.load_checkpoint(tmp_path / "small.pth", expect=vit.PRESETS["deit_small"])
    with pytest.raises(UserError, match="not found"):
        vit.load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        vit.load_checkpoint(tmp_path / "junk.pth")
    sd = model.state_dict()
    sd["blocks.0.mlp.fc1.weight"] = sd["blocks.0.mlp.fc1.weight"][:100]
    torch.save({"model": sd, "config": vit.asdict(SMALL_CFG)}, tmp_path / "bad_shape.pth")
    with pytest.raises(UserError, match="blocks.0.mlp.fc1.weight has shape"):
        vit.load_checkpoint(tmp_path / "bad_shape.pth")
    with pytest.raises(UserError, match="could not download"):  # nothing listens there: offline-like
        vit.load_checkpoint("http://127.0.0.1:9/deit.pth")
    with pytest.raises(UserError, match="unknown model"):
        vit.deit("deit_huge")


def test_data_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.build_dataset(str(tmp_path / "nope"), "train", 32)
    with pytest.raises(UserError, match="has no train/ subfolder"):
        data.build_dataset(str(tmp_path), "train", 32)
    (tmp_path / "train" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        data.build_dataset(str(tmp_path), "train", 32)


def test_odd_image_modes_become_rgb(tmp_path):
    d = tmp_path / "val" / "a"
    d.mkdir(parents=True)
    Image.new("L", (32, 32), 128).save(d / "gray.png")
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(d / "cmyk.jpg")
    Image.new("P", (32, 32), 3).save(d / "palette.png")
    Image.new("RGBA", (32, 32)).save(d / "rgba.png")
    for size in (32, 224):
        ds = data.build_dataset(str(tmp_path), "val", size)
        assert all(ds[i][0].shape == (3, size, size) for i in range(len(ds)))


def test_cli_bad_input(tmp_path, capsys):
    def run(*argv):
        with pytest.raises(SystemExit) as e:
            cli(list(argv))
        return str(e.value.code)
    run("--data-path", "x", "--search", "exact")
    assert "invalid choice: 'exact'" in capsys.readouterr().err
    assert "--data folder needs --weights" in run("--data", "folder", "--data-path", "x")
    (tmp_path / "afile").write_text("")
    assert "is a file: pass a folder" in run("--data-path", "x", "--out", str(tmp_path / "afile"))
    ckpt = tmp_path / "small.pth"
    torch.save({"model": vit.VisionTransformer(SMALL_CFG).state_dict()}, ckpt)
    assert "does not exist" in run("--data", "folder", "--data-path", str(tmp_path / "none"), "--weights", str(ckpt))
    assert "has no val/ subfolder" in run("--data", "folder", "--data-path", str(tmp_path), "--weights", str(ckpt))
    assert "does not match the model" in run("--data-path", "x", "--model", "deit_small", "--weights", str(ckpt))
    assert "could not download" in run("--data-path", "x", "--weights", "http://127.0.0.1:9/w.pth")
    sd = vit.VisionTransformer(SMALL_CFG).state_dict()
    sd["blocks.1.mlp.fc1.weight"][3, 5] = float("nan")
    torch.save({"model": sd}, tmp_path / "nan.pth")
    assert "has NaN or inf values in 1 tensors (first: blocks.1.mlp.fc1.weight)" in run(
        "--data-path", "x", "--weights", str(tmp_path / "nan.pth"))
    assert "--device mps is not a device slim.py runs on" in run("--data-path", "x", "--device", "mps")
    if not torch.cuda.is_available():  # refused before torchrun's set-up touches CUDA
        assert "--device cuda but CUDA is not available here" in run("--data-path", "x", "--device", "cuda")


NUMERIC_BAD = [("--eps", "nan"), ("--eps", "inf"), ("--eps", "0"), ("--val-per-class", "-3"), ("--val-per-class", "0"),
               ("--workers", "-1"), ("--std", "0", "0", "0"), ("--mean", "nan", "0", "0"), ("--r-step", "0"),
               ("--ft-lr", "-1"), ("--ft-lr", "nan"), ("--ft-weight-decay", "-1"), ("--batch-size", "0"),
               ("--fit-images", "0"), ("--seed", "-1"), ("--ft-reach", "0"), ("--final-epochs", "nan"),
               ("--final-lr", "0"), ("--smoothing", "1"), ("--reprob", "1.5"), ("--mixup", "-1"),
               ("--flops-ratio", "0"), ("--flops-ratio", "1.5"), ("--predictor-steps", "0"), ("--predictor-lr", "inf"),
               ("--final-batch-size", "2.5")]


@pytest.mark.parametrize("bad", NUMERIC_BAD, ids=[" ".join(b) for b in NUMERIC_BAD])
def test_numeric_flags_refuse_nan_infinity_and_values_out_of_range(bad, capsys):
    """Must-hold 3 of the bad-input issue: each is one line on stderr naming the flag and its range, exit status 2,
    before anything runs."""
    with pytest.raises(SystemExit) as e:
        cli(["--data", "cifar10", "--data-path", CIFAR, "--eval-only", *bad])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and err.startswith(f"error: argument {bad[0]}: "), err
    assert re.search(r"[\[(][-\d.inf]+, [-\d.inf]+[\])]", err), err  # the range


def test_every_numeric_flag_is_range_checked():
    """No flag of slim.py is a bare int or float: each numeric type rejects NaN and infinity where it parses."""
    import argparse
    actions = [a for a in pipeline_cli.get_args_parser()._actions if a.type not in (None, str) and a.option_strings]
    assert len(actions) >= 25
    for a in actions:
        assert a.type not in (int, float), a.option_strings
        for text in ("nan", "inf", "-inf"):
            with pytest.raises(argparse.ArgumentTypeError):
                a.type(text)


def test_search_settings_beyond_the_model_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--r-step 1000 is more than the model's 64 patches: give r' in \[1, 64\]"):
        cli(["--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--r-step", "1000", "--out",
                  str(tmp_path / "o"), "--workers", "0"])


def test_outputs_that_cannot_be_written_are_one_line(tmp_path):
    """--out under a file (the same errno family as a read-only folder: this suite may run as root, whom permissions
    do not stop), for the search, the evaluation and the export alike."""
    (tmp_path / "afile").write_text("")
    base = ["--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--workers", "0", "--val-per-class", "1"]
    for argv in (base + ["--eval-only"], base + ["--fit-images", "16"]):
        with pytest.raises(SystemExit) as e:
            cli(argv + ["--out", str(tmp_path / "afile" / "sub")])
        assert str(e.value.code) == (f"error: cannot write {tmp_path / 'afile' / 'sub'}: a file is in the way where a "
                                     "folder should be: pass --out a folder path")
    with pytest.raises(SystemExit, match=r"^error: cannot write .*afile: a file is in the way: pass --out a folder"):
        cli(["--export", "onnx", "--weights", PROXY_CKPT, "--out", str(tmp_path / "afile")])


def enospc_on(monkeypatch, suffix, after=0):
    """Make pipeline.resume's writes of files ending in suffix fail with ENOSPC halfway through, after `after` such
    writes succeeded: the full disk of a real run, which leaves a truncated file where nobody renames."""
    import builtins
    import errno
    from pipeline import resume
    calls = {"n": 0}

    class HalfFull:
        def __init__(self, f):
            self.f = f

        def write(self, payload):
            self.f.write(payload[:len(payload) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        if str(path).endswith(suffix) and "w" in mode:
            calls["n"] += 1
            if calls["n"] > after:
                return HalfFull(f)
        return f
    monkeypatch.setattr(resume, "open", fake_open, raising=False)
    return calls


def test_a_full_disk_leaves_no_partial_file_and_the_same_command_resumes(tmp_path, monkeypatch):
    """Must-hold 2 of the bad-input issue: the search state fails to be written after the first layer (ENOSPC); the
    run stops with one line, no half file is left, the earlier state.pt is intact, and the same command, once the
    disk has room, resumes from it and finishes with the masks an uninterrupted run finds."""
    out = tmp_path / "run"
    argv = ["--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--out", str(out), "--fit-images", "64",
            "--held-images", "32", "--score-images", "16", "--ft-steps", "1", "--eps", "0.01", "--r-step", "16",
            "--val-per-class", "2", "--workers", "0", "--batch-size", "32"]
    enospc_on(monkeypatch, "state.pt.tmp", after=1)
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert str(e.value.code) == (f"error: cannot write {out / 'state.pt'}: no space left there: free some, or pass "
                                 "--out on another disk (the same command resumes)")
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    saved = torch.load(out / "state.pt", weights_only=False)
    assert saved["next"] == vit.load_checkpoint(PROXY_CKPT).cfg.depth - 2  # one layer (L-1) was searched
    monkeypatch.undo()
    resumed = cli(argv)
    assert resumed["resumed"] is True
    fresh = cli([a if a != str(out) else str(tmp_path / "fresh") for a in argv])
    assert resumed["kept_per_layer"] == fresh["kept_per_layer"]
    assert (out / "masks.json").read_text() == (tmp_path / "fresh" / "masks.json").read_text()


@needs_onnx
def test_a_failed_export_leaves_no_truncated_onnx_file(tmp_path, monkeypatch):
    enospc_on(monkeypatch, ".onnx.tmp")
    with pytest.raises(SystemExit, match="no space left there"):
        cli(["--export", "onnx", "--weights", PROXY_CKPT, "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_images_of_another_size_than_a_small_model_are_refused_or_skipped(tmp_path):
    """At the small-image recipe's sizes nothing is resized: a 640x480 image would be centre-cropped to its middle
    32x32, a 1x1 image zero-padded. They are a one-line error naming the file, or, with --skip-bad-images, skipped
    and counted."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in os.listdir(os.path.join(CIFAR, split)):
            (root / split / name).mkdir(parents=True)
            for f in sorted(os.listdir(os.path.join(CIFAR, split, name)))[:2]:
                (root / split / name / f).write_bytes(open(os.path.join(CIFAR, split, name, f), "rb").read())
    Image.new("RGB", (640, 480), (10, 20, 30)).save(root / "val" / "cat" / "big.jpg")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "val" / "dog" / "tiny.png")
    argv = ["--eval-only", "--data", "folder", "--data-path", str(root), "--weights", PROXY_CKPT, "--workers", "0",
            "--out", str(tmp_path / "ev")]
    with pytest.raises(SystemExit) as e:
        cli(argv)
    message = str(e.value.code)
    assert "\n" not in message and "big.jpg is 640x480 px but the model takes 32x32" in message
    assert "--skip-bad-images" in message
    ev = cli(argv + ["--skip-bad-images"])
    assert ev["skipped_images"] == 2 and ev["val_images"] == 20 and ev["val_files"] == 22
    assert "skipped 2 image files (--skip-bad-images)" in (tmp_path / "ev" / "eval.log").read_text()


def test_masks_and_slimmed_checkpoints_in_the_wrong_place_are_refused(tmp_path):
    """--masks with a slimmed checkpoint (it would replace the checkpoint's own), --masks with a search (a search
    makes its own), and a slimmed checkpoint as the start of a search (it would be reported as dense)."""
    slimmed, _, _ = slimmed_proxy(tmp_path, os.path.join(REPO, "results", "cifar10-proxy", "masks.json"))
    masks = os.path.join(REPO, "results", "cifar10-proxy", "masks.json")
    base = ["--data", "folder", "--data-path", CIFAR, "--workers", "0", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="is a slimmed checkpoint with its own masks, and --masks .* would replace"):
        cli(base + ["--eval-only", "--weights", str(slimmed), "--masks", masks])
    with pytest.raises(SystemExit, match="--masks .* is for --eval-only"):
        cli(base + ["--weights", PROXY_CKPT, "--masks", masks])
    with pytest.raises(SystemExit, match="is a slimmed checkpoint \\(it carries masks\\): a search starts from the dense"):
        cli(base + ["--weights", str(slimmed)])


def test_the_model_holds_only_what_its_forward_reads():
    """Must-hold 3 of the redesign: what a checkpoint carries besides weights (class names, normalisation, DPS-ViT's
    predictors) comes back beside the model (vit.CheckpointInfo), not on it; every attribute the model has beyond
    nn.Module's own is its config, its modules and parameters, or the masks its forward runs."""
    import ast
    import inspect
    module_own = set(vars(torch.nn.Module()))
    model = vit.VisionTransformer(SMALL_CFG)
    extra = set(vars(model)) - module_own  # cfg, the masks, and the optional distillation parts (None here)
    assert {"cfg", "keep", "tokens"} <= extra and not extra & {"normalisation", "classes", "dynamic"}, extra
    source = inspect.getsource(vit.VisionTransformer)
    read = {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}
    assert extra <= read


def test_python_api_of_a_slimmed_model_and_of_offline_weights(tmp_path, monkeypatch):
    """A slimmed checkpoint called without keep= runs its own masks (not every token); vit.deit(pretrained=True)
    offline raises one UserError, not chained, whose fix fits a Python caller; a mask index -1 is refused as such."""
    path, keep, tokens = slimmed_proxy(tmp_path, os.path.join(REPO, "results", "cifar10-proxy", "masks.json"))
    slimmed, dense = vit.load_checkpoint(str(path)), vit.load_checkpoint(PROXY_CKPT)
    x = torch.stack([data.build_dataset(CIFAR, "val", 32)[i][0] for i in range(0, 200, 20)])
    with torch.no_grad():
        assert torch.equal(slimmed(x), dense(x, keep=keep, tokens=tokens))
        assert (slimmed(x) - dense(x)).abs().max() > 0.1  # the masks change the logits of these real images
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        vit.deit("deit_small", pretrained=True)
    assert "vit.deit(name, pretrained=PATH)" in str(e.value) and "\n" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    bad = [torch.tensor([-1] + list(range(64)))] + [torch.arange(65)] * 10 + [torch.tensor([0])]
    with pytest.raises(UserError, match="masks layer 1 has token index -1: indices run from 0 to 64"):
        vit.check_keep(bad, dense.cfg)


def test_flops_cli_takes_the_geometry_of_the_masks_file(capsys):
    """python flops.py --masks FILE, no --model: the geometry the file records (the proxy's, not DeiT-S's)."""
    total = flops.main(flops.get_args_parser().parse_args(["--masks", os.path.join(REPO, "results/cifar10-proxy/masks.json")]))
    cfg = vit.load_checkpoint(PROXY_CKPT).cfg
    assert total == flops.count_flops(cfg, vit.load_masks(os.path.join(REPO, "results/cifar10-proxy/masks.json"), cfg)[0])


def test_results_files_hold_top1_without_float_noise(tmp_path):
    ev = cli(["--eval-only", "--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--workers", "0",
                   "--val-per-class", "3", "--out", str(tmp_path)])
    text = (tmp_path / "eval.json").read_text()
    assert ev["top1"] == round(ev["top1"], 4) and not re.search(r'"top1": \d+\.\d{5,}', text), text


def test_val_classes_that_differ_from_train_or_the_checkpoint_are_refused(tmp_path):
    """The class index is the sorted folder name: a val folder renamed (cat -> zcat) shifts every label after it,
    silently. It is refused against train/, and, without train/, against the class names a slimmed checkpoint
    carries."""
    names = [f"c{i}" for i in range(10)]
    renamed = names[:3] + ["zc3"] + names[4:]
    ckpt = tmp_path / "small.pth"
    torch.save({"model": vit.VisionTransformer(SMALL_CFG).state_dict()}, ckpt)
    def run(root, weights=ckpt):
        with pytest.raises(SystemExit) as e:
            cli(["--eval-only", "--data", "folder", "--data-path", root, "--weights", str(weights), "--workers",
                      "0", "--out", str(tmp_path / "out")])
        return str(e.value.code)
    shifted = class_folders(tmp_path / "shifted", names, renamed)
    assert "has other class folders than train/ (only here: ['zc3'], only in train/: ['c3'])" in run(shifted)
    with pytest.raises(SystemExit, match="other class folders than train/"):  # the search path alike
        cli(["--data", "folder", "--data-path", shifted, "--weights", str(ckpt), "--workers", "0",
                  "--out", str(tmp_path / "search")])
    val_only = class_folders(tmp_path / "val_only", None, renamed)
    slimmed = tmp_path / "slimmed.pth"
    torch.save({"model": vit.VisionTransformer(SMALL_CFG).state_dict(), "classes": names}, slimmed)
    assert vit.read_checkpoint(str(slimmed))[1].classes == names
    assert "other class folders than the checkpoint (only here: ['zc3']" in run(val_only, slimmed)
    same = class_folders(tmp_path / "same", names, names)
    ok = cli(["--eval-only", "--data", "folder", "--data-path", same, "--weights", str(slimmed), "--workers", "0",
                   "--out", str(tmp_path / "ok")])
    assert ok["val_images"] == 10
    with pytest.raises(SystemExit, match="has no train/ subfolder"):  # the search needs train/, and says so
        cli(["--data", "folder", "--data-path", val_only, "--weights", str(ckpt), "--workers", "0",
                  "--out", str(tmp_path / "search")])


def test_completed_args_are_complete(tmp_path, monkeypatch):
    """complete_args leaves no default to be filled later (the bench scripts build their settings from its result
    alone), and check_args changes nothing."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    args = pipeline_cli.complete_args(pipeline_cli.get_args_parser().parse_args(["--data-path", "x", "--error", "final"]))
    assert isinstance(args.workers, int) and args.workers >= 1 and args.eps == pipeline_cli.FINAL_EPS
    before = dict(vars(args))
    pipeline_cli.check_args(args)
    assert vars(args) == before
    assert pipeline_cli.complete_args(pipeline_cli.get_args_parser().parse_args(["--data-path", "x", "--workers", "0"])).workers == 0
    parse = pipeline_cli.get_args_parser().parse_args
    assert parse(["--data-path", "x"]).search == "alg1"
    assert parse(["--data-path", "x", "--search", "fast"]).search == "fast"


def test_unreadable_files_are_one_line_or_skipped(tmp_path):
    root = image_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=3, size=(32, 32), grow=0)
    good = (root / "val" / "n00000000" / "img_0.JPEG").read_bytes()
    (root / "val" / "n00000000" / "truncated.JPEG").write_bytes(good[:len(good) // 2])
    (root / "val" / "n00000001" / "notes.JPEG").write_bytes(b"this is not an image")
    ckpt = tmp_path / "small.pth"
    torch.save({"model": vit.VisionTransformer(vit.ViTConfig(**{**vit.asdict(SMALL_CFG), "num_classes": 2})).state_dict()},
               ckpt)
    argv = ["--eval-only", "--data", "folder", "--data-path", str(root), "--weights", str(ckpt), "--workers", "1"]
    with pytest.raises(SystemExit) as e:
        cli(argv + ["--out", str(tmp_path / "a")])
    msg = str(e.value.code)
    assert "\n" not in msg and "is not a readable image" in msg and "--skip-bad-images" in msg
    assert "truncated.JPEG" in msg or "notes.JPEG" in msg
    result = cli(argv + ["--out", str(tmp_path / "b"), "--skip-bad-images"])
    on_disk = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert result["val_images"] == on_disk["val_images"] == 6 and on_disk["skipped_images"] == 2
    assert sorted(os.path.basename(p) for p in on_disk["skipped_files"]) == ["notes.JPEG", "truncated.JPEG"]
    assert "skipped 2 image files (--skip-bad-images)" in (tmp_path / "b" / "eval.log").read_text()


def test_final_finetune_steps_through_batches_of_unreadable_files():
    """With --skip-bad-images a batch whose every file is unreadable still counts as a step (a data-parallel step is
    taken on every rank), so an epoch ends where it should instead of looping; a large --seed is fine."""
    student, teacher, keep, ds, s = small_finetune_setup(distill="soft", mixup=0.0, cutmix=0.0, seed=0)

    class MostlyBad(torch.utils.data.Dataset):
        bad = data.BadFiles(skip=True)  # the dataset's registry, as a run gives its datasets under --skip-bad-images

        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i] if i < 6 else data.BadFile(f"img_{i}.JPEG", "is not a readable image (OSError: image file is truncated)")
    s = replace(s, seed=12_345_678)
    assert pipeline_finetune.finetune(student, teacher, keep, "frozen", schedule(MostlyBad(), s), print) == 10
    assert len(MostlyBad.bad.paths) == 34


def test_out_of_memory_is_one_line(tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.50 GiB")
    monkeypatch.setattr(pipeline_run, "cache_search_sets", no_memory)  # where a too-large cache would run out
    root = image_folder(tmp_path / "data", classes=10, train_per_class=2, val_per_class=1, size=(32, 32))
    ckpt = tmp_path / "small.pth"
    torch.save({"model": vit.VisionTransformer(SMALL_CFG).state_dict()}, ckpt)
    with pytest.raises(SystemExit) as e:
        cli(["--data", "folder", "--data-path", str(root), "--weights", str(ckpt), "--out", str(tmp_path / "o"),
                  "--workers", "0"])
    assert str(e.value.code).startswith("error: out of memory on cpu: pass a smaller --batch-size")
    assert "--cache-device cpu" in str(e.value.code)


def test_non_finite_loss_stops_without_a_checkpoint(tmp_path):
    student, teacher, keep, ds, s = small_finetune_setup(distill="soft", mixup=0.0, cutmix=0.0)
    with torch.no_grad():
        student.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="loss is not finite at epoch 1, step 0"):
        pipeline_finetune.finetune(student, teacher, keep, "frozen", schedule(ds, s), print,
                                   pipeline_finetune.Checkpoint(str(tmp_path / "ft.pt"), {}))
    assert not (tmp_path / "ft.pt").exists()


# ----------------------------------------------------------------------------- what a fresh clone holds
# A clone runs its main job and this suite on what it ships: the proxy (models/), a few images (data/cifar10-mini),
# CIFAR-10 written once from torchvision's download, and the method's spec (docs/method.md).

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def fake_cifar10_batches(root, train_per_class, test_per_class):
    """torchvision's cifar-10-batches-py folder (pickled dicts of uint8 rows and labels), written here with smooth
    images (JPEG keeps them within a few levels); returns the (H, W, 3) images of each split in file order, labels."""
    import pickle
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(32), np.arange(32)).astype(np.float64)  # a diagonal gradient, 0..62

    def images(n_per_class):
        labels = [int(c) for c in rng.permutation(np.repeat(np.arange(10), n_per_class))]  # classes interleaved
        base = rng.integers(20, 170, (len(labels), 1, 1, 3))
        return (base + ramp[None, :, :, None] * rng.uniform(0.5, 1.3, (len(labels), 1, 1, 3))).astype(np.uint8), labels

    splits = {"train": images(train_per_class), "test": images(test_per_class)}
    x, y = splits["train"]
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5)):  # data_batch_1 .. 5, in order
        rows = x[part].transpose(0, 3, 1, 2).reshape(len(part), -1)  # CIFAR's rows: R plane, G plane, B plane
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": rows, "labels": [y[j] for j in part]}, f)
    x, y = splits["test"]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(len(y), -1), "labels": y}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES}, f)
    return splits


def test_cifar10_is_written_once_as_the_imagefolder_tree_of_the_proxy(tmp_path, monkeypatch):
    """Must-hold 2 of the clone: a (fake) download becomes train/<class>/%04d.jpg, every training image in file
    order, and val/<class>/%04d.jpg, the first CIFAR10_VAL_PER_CLASS of each class of the test split; the decoded
    JPEGs are the originals within JPEG error; a second call uses the tree as it is."""
    import torchvision.datasets.cifar as tv_cifar
    splits = fake_cifar10_batches(tmp_path, train_per_class=3, test_per_class=4)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the fake files have other md5 sums
    monkeypatch.setattr(data, "CIFAR10_VAL_PER_CLASS", 2)  # 500 in the real split; 2 of 4 here shows the cut
    assert data.cifar10_tree(str(tmp_path)) == str(tmp_path)
    for split, (x, y), per_class in (("train", splits["train"], 3), ("val", splits["test"], 2)):
        assert sorted(os.listdir(tmp_path / split)) == CIFAR10_CLASSES
        for c, name in enumerate(CIFAR10_CLASSES):
            expected = [x[i] for i in range(len(y)) if y[i] == c][:per_class]  # in the split's order
            files = sorted(os.listdir(tmp_path / split / name))
            assert files == [f"{k:04d}.jpg" for k in range(per_class)], (split, name, files)
            for k, want in enumerate(expected):
                got = np.asarray(Image.open(tmp_path / split / name / files[k]).convert("RGB")).astype(int)
                err = np.abs(got - want.astype(int))
                assert err.mean() < 3 and err.max() < 40, (split, name, k, err.mean(), err.max())
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    monkeypatch.setattr(data.datasets, "CIFAR10", lambda *a, **k: pytest.fail("a written tree was downloaded again"))
    assert data.cifar10_tree(str(tmp_path)) == str(tmp_path)
    ds = data.build_dataset(str(tmp_path), "val", 32)
    assert ds.classes == CIFAR10_CLASSES and len(ds) == 20


def test_cifar10_without_tree_or_network_is_one_line(tmp_path, monkeypatch, capsys):
    import urllib.error
    import torchvision.datasets.cifar as tv_cifar

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as e:
        cli(["--data", "cifar10", "--data-path", str(tmp_path / "none"), "--eval-only", "--out", str(tmp_path / "o")])
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "none") in message and "could not be downloaded (URLError)" in message
    assert "connect to the network" in message and "--data-path" in message


def test_data_cifar10_uses_the_shipped_proxy(tmp_path):
    """--data cifar10 with no --weights evaluates the shipped checkpoint (models/) on the tree it is given."""
    ev = cli(["--data", "cifar10", "--data-path", CIFAR, "--eval-only", "--val-per-class", "2", "--workers", "0",
                   "--out", str(tmp_path / "ev")])
    assert ev["val_images"] == 20
    log = (tmp_path / "ev" / "eval.log").read_text()
    assert vit.PROXY_CHECKPOINT in log and "on 20 cifar10 val images" in log


def test_readme_python_snippet_runs_as_written(tmp_path):
    """The README's "In Python" block, run in a fresh interpreter from the repository root, on files a clone has."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    snippet = re.search(r"<!-- test_slim.py runs this block -->\n```python\n(.*?)```", readme, re.S).group(1)
    run = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    predicted, gflops = run.stdout.split("] ")
    assert len(json.loads(predicted + "]")) == 10 and float(gflops.split()[0]) == pytest.approx(0.138, abs=5e-4)


def test_train_proxy_writes_a_checkpoint_of_the_shipped_format(tmp_path):
    """bench/train_proxy.py, a few steps on the committed images: a checkpoint with the shipped proxy's keys, shapes
    and geometry that vit.load_checkpoint loads with strict=True, and whose weights moved from their start; its
    learning rate warms up linearly to the peak and ends at the floor of the cosine."""
    out = tmp_path / "proxy.pth"
    run = subprocess.run([sys.executable, "bench/train_proxy.py", "--data-path", CIFAR, "--out", str(out), "--epochs",
                          "0.2", "--batch-size", "16", "--warmup-epochs", "0.1", "--workers", "0"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    made, shipped = (torch.load(p, map_location="cpu", weights_only=False) for p in (out, PROXY_CKPT))
    assert made["config"] == shipped["config"] and set(made) == set(shipped)
    assert {k: v.shape for k, v in made["model"].items()} == {k: v.shape for k, v in shipped["model"].items()}
    model = vit.load_checkpoint(str(out))  # strict=True inside
    assert model.cfg.num_tokens == 65 and made["train_log"][-1]["step"] == round(0.2 * (300 // 16))
    torch.manual_seed(0)
    start = vit.VisionTransformer(model.cfg).state_dict()
    assert any(not torch.equal(start[k], made["model"][k]) for k in start)
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_proxy", os.path.join(REPO, "bench", "train_proxy.py"))
    train_proxy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_proxy)
    lr = [train_proxy.learning_rate(s, 100, 10, 1e-3, 1e-5) for s in range(101)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3) and lr[10] == pytest.approx(1e-3)
    assert lr[100] == pytest.approx(1e-5) and lr[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def project_imports():
    """module -> (the project modules it imports, those imported inside a function), read from the source; the launcher
    under `if __name__ == "__main__":` is left out (slim.py's two lines that start the CLI)."""
    import ast
    import glob
    files = ["vit.py", "flops.py", "data.py", "slim.py"] + sorted(glob.glob(os.path.join(REPO, "pipeline", "*.py")))
    names = {os.path.relpath(os.path.join(REPO, f), REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__"): f
             for f in files}
    graph, deferred = {}, {}
    for name, f in names.items():
        with open(os.path.join(REPO, f), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        launcher = {id(n) for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
                    for n in ast.walk(node)}
        in_function = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(node) if n is not node}
        for node in ast.walk(tree):
            if id(node) in launcher or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in found:
                if target in names and target != name and target != "pipeline":
                    graph.setdefault(name, set()).add(target)
                    if id(node) in in_function:
                        deferred.setdefault(name, set()).add(target)
    return graph, deferred


def test_no_function_of_the_method_or_pipeline_is_over_60_lines():
    """Files read end to end: no function of vit, slim, flops, data or pipeline/ runs past 60 lines (the argument
    parsers aside, a flat list of flags)."""
    import ast
    import glob
    long = []
    for f in ["vit.py", "slim.py", "flops.py", "data.py"] + sorted(glob.glob(os.path.join(REPO, "pipeline", "*.py"))):
        with open(os.path.join(REPO, f), encoding="utf-8") as fh:
            for node in ast.walk(ast.parse(fh.read())):
                if isinstance(node, ast.FunctionDef) and node.name not in ("get_args_parser", "add_arguments"):
                    if node.end_lineno - node.lineno + 1 > 60:
                        long.append(f"{os.path.basename(f)}:{node.name} {node.end_lineno - node.lineno + 1}")
    assert long == []


def test_no_function_of_the_method_or_pipeline_takes_more_than_8_parameters():
    """Context is not threaded by hand: no function of vit, slim, flops, data or pipeline/ takes more than 8
    parameters (positional and keyword-only, self and cls aside); what belongs together travels as one value (a
    settings dataclass, pipeline/run.py's Run, pipeline/finetune.py's Schedule)."""
    import ast
    import glob
    many = []
    for f in ["vit.py", "slim.py", "flops.py", "data.py"] + sorted(glob.glob(os.path.join(REPO, "pipeline", "*.py"))):
        with open(os.path.join(REPO, f), encoding="utf-8") as fh:
            for node in ast.walk(ast.parse(fh.read())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    a = node.args
                    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                    if len(names) > 8:
                        many.append(f"{os.path.basename(f)}:{getattr(node, 'name', 'lambda')} {len(names)}")
    assert many == []


def test_the_import_graph_points_down_only():
    """Must-hold 1 of the redesign: no module imports one that imports it, directly or through others, and no project
    import is deferred into a function to dodge a circle. vit is at the bottom; the CLI (pipeline.cli) at the top."""
    graph, deferred = project_imports()
    assert deferred == {}
    order, state = [], {}

    def visit(m, path):
        if state.get(m) == "open":
            pytest.fail(f"import circle: {' -> '.join(path + [m])}")
        if state.get(m) != "done":
            state[m] = "open"
            for n in sorted(graph.get(m, ())):
                visit(n, path + [m])
            state[m], _ = "done", order.append(m)
    for m in sorted(graph):
        visit(m, [])
    assert "vit" not in graph and graph["slim"] <= {"vit", "pipeline.distributed", "pipeline.finetune",
                                                    "pipeline.evaluate", "pipeline.resume"}
    assert not any("pipeline.cli" in targets for targets in graph.values())


SPEC_FREE = ["README.md", "docs", "models", "slim.py", "vit.py", "flops.py", "data.py", "pipeline", "bench"]


def project_text(paths, suffixes=(".py", ".md", ".sh")):
    for top in paths:
        full = os.path.join(REPO, top)
        walk = [(full, [], [""])] if os.path.isfile(full) else os.walk(full)
        for folder, _, names in walk:
            for name in names:
                path = os.path.join(folder, name)
                if path.endswith(suffixes) and not os.path.basename(path).startswith("test_"):
                    with open(path, encoding="utf-8") as f:
                        yield os.path.relpath(path, REPO), f.read()


def test_no_document_or_program_needs_files_outside_the_clone():
    """Must-hold 3 of the clone: the README, the docs and the non-test code never name ../shared or METHOD.md."""
    offenders = [path for path, text in project_text(SPEC_FREE) if "../shared" in text or "METHOD.md" in text]
    assert offenders == []


def test_every_label_the_code_cites_is_defined_in_docs_method():
    """Every [P]/[C] label cited in the code (P1, C3a, ...) has its definition in docs/method.md: a bold `**P4 — `
    paragraph, or the label table of its last section."""
    with open(os.path.join(REPO, "docs", "method.md"), encoding="utf-8") as f:
        spec = f.read()
    defined = set(re.findall(r"\*\*([PC]\d+[a-z]?) —", spec)) | set(re.findall(r"(?m)^\| ([PC]\d+[a-z]?) \|", spec))
    cited = {}
    for path, text in project_text(["slim.py", "vit.py", "flops.py", "data.py", "pipeline", "bench"], (".py",)):
        for label in re.findall(r"(?<![\w\"'])([PC]\d+[a-z]?)(?![\w\"'])", text):
            cited.setdefault(label, path)
    assert cited and {label: path for label, path in cited.items() if label not in defined} == {}
    assert {"P1", "P3", "P4", "P5", "P6", "C1", "C3a", "C3b", "C4", "C5", "C6", "C7", "C8"} <= defined


# ----------------------------------------------------------------------------- end-to-end runs
# The CLI as a user runs it: on the CIFAR-10 proxy, under torchrun with two processes, at DeiT-S shapes with a killed
# fine-tune, on DeiT-III and distilled checkpoints; and the documents' tables against the results files.


def test_cli_end_to_end_on_cifar10_subset(tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--out", str(out), "--fit-images", "128",
            "--held-images", "64", "--score-images", "32", "--ft-steps", "2", "--val-per-class", "10", "--eps", "0.3",
            "--workers", "1"]
    report = cli(argv)
    on_disk = json.loads((out / "report.json").read_text())
    cfg = vit.load_checkpoint(PROXY_CKPT).cfg
    keep, tokens = vit.load_masks(out / "masks.json", cfg)
    assert tokens == "frozen" == on_disk["tokens"]  # the paper's semantics by default, written into the masks
    assert on_disk["slimmed_gflops"] == pytest.approx(flops.count_flops(cfg, keep, tokens="frozen") / 1e9)
    assert on_disk["kept_per_layer"] == [k.numel() for k in keep] and report["slimmed_top1"] == on_disk["slimmed_top1"]
    assert 0 < on_disk["slimmed_gflops"] < on_disk["dense_gflops"]
    slimmed = vit.load_checkpoint(out / "slimmed.pth")  # weights + masks + semantics, loadable as promised
    assert [k.tolist() for k in slimmed.keep] == [k.tolist() for k in keep] and slimmed.tokens == "frozen"
    ev = cli(["--eval-only", "--data", "folder", "--data-path", CIFAR, "--weights", str(out / "slimmed.pth"),
                   "--out", str(tmp_path / "ev"), "--val-per-class", "10", "--workers", "1"])
    assert ev["top1"] == pytest.approx(on_disk["slimmed_top1"]) and ev["gflops"] == pytest.approx(on_disk["slimmed_gflops"])
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["top1"] == ev["top1"]
    ev2 = cli(["--eval-only", "--data", "folder", "--data-path", CIFAR, "--weights", str(out / "slimmed.pth"),
                    "--out", str(tmp_path / "ev"), "--val-per-class", "10", "--workers", "1", "--tokens", "removed"])
    assert ev2["tokens"] == "removed" and ev2["gflops"] < ev["gflops"]  # explicit, and logged as such
    assert "searched with tokens='frozen'" in (tmp_path / "ev" / "eval.log").read_text()
    from pipeline import run
    monkeypatch.setattr(run.Run, "evaluate",
                        lambda *a, **k: pytest.fail("the dense model was evaluated before the refusal"))
    with pytest.raises(SystemExit, match=r"other settings \(eps 0.3 -> 0.5\)"):  # refused before any work
        cli(argv[:-4] + ["--eps", "0.5", "--workers", "1"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keep": [[0, 1]] * 3}))
    with pytest.raises(SystemExit, match="masks have 3 layers but the model has depth 12"):
        cli(["--eval-only", "--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--masks", str(bad),
                  "--out", str(tmp_path / "ev2")])


def test_torchrun_two_processes_reach_the_one_process_result(tmp_path):
    """A real 2-process run (torchrun, gloo) on a proxy subset: the same masks as one process, and the same top-1 within
    one image, on the same (exactly counted) val images."""
    argv = ["--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--fit-images", "64", "--held-images",
            "32", "--score-images", "16", "--ft-steps", "3", "--val-per-class", "20", "--eps", "0.02", "--workers", "1",
            "--final-epochs", "0.003"]
    one = cli(argv + ["--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "slim.py", *argv, "--out", str(tmp_path / "two")], cwd=os.path.dirname(os.path.abspath(__file__)),
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2 and "processes: 2 (world size; torchrun, gloo)" in (tmp_path / "two" / "log.txt").read_text()
    cfg = vit.load_checkpoint(PROXY_CKPT).cfg
    masks = [vit.load_masks(tmp_path / name / "masks.json", cfg)[0] for name in ("one", "two")]
    assert [k.tolist() for k in masks[0]] == [k.tolist() for k in masks[1]]
    assert one["val_images"] == two["val_images"] == 200
    assert abs(one["slimmed_top1"] - two["slimmed_top1"]) <= 100 / 200 + 1e-9
    p1, p2 = (np.load(tmp_path / name / "predictions.npz") for name in ("one", "two"))
    assert np.array_equal(p1["labels"], p2["labels"]) and np.array_equal(p1["dense"], p2["dense"])  # val order kept


def test_dress_rehearsal_at_deit_small_shapes_with_a_killed_finetune(tmp_path):
    """The whole pipeline at DeiT-S shapes (224 px, 197 tokens, random weights) on a tiny ImageNet-layout folder with
    DeiT's recipe: search, final fine-tune, eval. The fine-tune is killed (SIGTERM, as a cluster would) mid-epoch; the
    same command resumes from where it stopped, and a rerun with other arguments is refused."""
    root = image_folder(tmp_path / "data", classes=4, train_per_class=3, val_per_class=2, size=(232, 256))
    cfg = vit.ViTConfig(**{**vit.asdict(vit.PRESETS["deit_small"]), "num_classes": 4})
    torch.manual_seed(0)
    torch.save({"model": vit.VisionTransformer(cfg).state_dict()}, tmp_path / "deit_small_random.pth")
    out = tmp_path / "out"
    argv = [sys.executable, "slim.py", "--data", "folder", "--data-path", str(root), "--weights",
            str(tmp_path / "deit_small_random.pth"), "--out", str(out), "--fit-images", "8", "--held-images", "4",
            "--score-images", "4", "--ft-steps", "2", "--batch-size", "4", "--eps", "0.01", "--r-step", "98",
            "--recipe", "deit", "--final-epochs", "2", "--final-batch-size", "4", "--warmup-epochs", "0", "--workers", "1"]
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen(argv, cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, t0 = out / "log.txt", time.time()
    while proc.poll() is None and "step 4/6" not in (log.read_text() if log.exists() else ""):  # the event
        assert time.time() - t0 < 1800, "the rehearsal did not reach step 4 of its fine-tune in 30 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode != 0 and "interrupted: rerun the same command" in err, err[-1500:]
    stopped = int(re.search(r"interrupted after step (\d+)/6", log.read_text()).group(1))
    assert 4 <= stopped < 6  # mid-epoch 2 (3 steps an epoch), so epoch 1's checkpoint and more were kept
    done = subprocess.run(argv, cwd=here, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-1500:]
    text = log.read_text()
    assert f"({stopped}/6 done)" in text and f"epoch 2, step {stopped - 3} of 3" in text
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] and report["val_images"] == 8 and 0 < report["slimmed_gflops"] < report["dense_gflops"]
    assert report["final_finetune"]["randaugment"] and report["final_finetune"]["mixup"] == 0.8
    refused = subprocess.run(argv[:-1] + ["1", "--final-lr", "1e-4"], cwd=here, capture_output=True, text=True,
                             timeout=1200)
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0
    assert "holds a final fine-tune made with other settings (lr 5e-05 -> 0.0001)" in refused.stderr


@pytest.mark.parametrize("preset", ["deit3_small", "deit_small_distilled"])
def test_cli_search_and_eval_on_deit3_and_distilled_release_checkpoints(tmp_path, preset):
    """A tiny full CLI run (random release-format weights at 224 px, a tiny ImageNet-layout folder): search, then
    eval of the slimmed checkpoint; the family is recognised from the keys and the prefix tokens survive."""
    root = image_folder(tmp_path / "data", classes=3, train_per_class=6, val_per_class=2, size=(224, 240))
    ckpt = release_checkpoint(tmp_path / "release.pth", preset, num_classes=3)
    out = tmp_path / "out"
    report = cli(["--data", "folder", "--data-path", str(root), "--weights", str(ckpt), "--out", str(out),
                       "--fit-images", "16", "--held-images", "4", "--score-images", "4", "--ft-steps", "1",
                       "--batch-size", "4", "--eps", "0.01", "--workers", "0"])
    assert (report["fit_images_used"], report["held_images_used"]) == (9, 4)  # 18 training images: at most half
    assert "the search uses 9 fit + 4 held images, not the 16 + 4 asked" in (out / "log.txt").read_text()
    P = vit.PRESETS[preset].prefix_tokens
    keep, tokens = vit.load_masks(out / "masks.json", vit.load_checkpoint(ckpt).cfg)
    assert report["kept_per_layer"][-1] == P and all(k[:P].tolist() == list(range(P)) for k in keep)
    assert report["val_images"] == 6 and report["slimmed_gflops"] < report["dense_gflops"]
    family = {k: vit.PRESETS[preset].__dict__[k] for k in ("prefix_tokens", "pos_embed_prefix", "layer_scale")}
    assert {k: json.loads((out / "masks.json").read_text())["config"][k] for k in family} == family  # recognised
    log = (out / "log.txt").read_text()
    assert "assumed ImageNet's: the checkpoint does not say" in log
    ev = cli(["--eval-only", "--data", "folder", "--data-path", str(root), "--weights", str(out / "slimmed.pth"),
                   "--out", str(tmp_path / "ev"), "--workers", "0"])
    assert ev["top1"] == pytest.approx(report["slimmed_top1"]) and ev["gflops"] == pytest.approx(report["slimmed_gflops"])
    assert "from the checkpoint's config" in (tmp_path / "ev" / "eval.log").read_text()  # slimmed.pth carries it


def test_every_results_file_the_documents_name_exists():
    """A number in README.md or docs/ names its results file: each file named there (a path under results/ with an
    extension, or a folder written with its trailing slash) must be in the tree. Output paths in commands
    (`--out results/x`) and git-ignored weights (*.pth) are not results files."""
    root = os.path.dirname(os.path.abspath(__file__))
    docs = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(root, "docs")))
    named = {(doc, m) for doc in docs for m in re.findall(r"results/[\w./-]*(?:\.(?:json|npz|png|md|log|txt)\b|/)",
                                                            open(os.path.join(root, doc)).read())}
    missing = [f"{doc}: {path}" for doc, path in sorted(named) if not os.path.exists(os.path.join(root, path))]
    assert len(named) > 30 and not missing, missing


def test_docs_tables_come_from_the_results_files():
    """The result tables of the README and docs/ are what bench/report.py generates from results/ (no number typed
    by hand): editing a results file, or a table, without the other fails here."""
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "report.py"),
                           "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout


# ----------------------------------------------------------------------------- ToMe and EViT, the comparison methods (bench/peers.py)
# The peers (method.md §8) match references written here: dense at no reduction, ToMe's merge, EViT's fusion, FLOPs.

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
import common  # noqa: E402
import peers  # noqa: E402

PEER_SETTINGS = [peers.ToMe(r=2), peers.ToMe(r=3, inflect=-1), peers.ToMe(r=8), peers.EViT(0.5, (2, 3)),
                 peers.EViT(0.3, (1, 2, 4)), peers.EViT(0.7, (2,), "sum")]  # r = 8 is capped at half the tokens


def plain_attention(q, k, v):
    """softmax(q k^T / sqrt(dh)) v, written out: (B, H, n, dh) each."""
    return ((q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5).softmax(-1) @ v


@pytest.mark.parametrize("family", FAMILY)
def test_peers_that_reduce_nothing_give_the_dense_logits(family):
    """Must-hold 1: ToMe with r = 0 and EViT with keep rate 1 (at every layer) are vit.py's dense forward."""
    model, img = family_model(family), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = model(img)
        for peer in (peers.ToMe(r=0), peers.EViT(1.0, (1, 2, 3, 4))):
            assert torch.allclose(peers.PeerModel(model, peer)(img), dense, atol=1e-5), peer


def tome_merge_reference(x, size, metric, r, protected):
    """ToMe's merge written from its paper, one image at a time: A = even positions, B = odd; each A token but the class
    token points to its most cosine-similar B token other than the distillation token; the r A tokens with the most
    similar partners join them, by the size-weighted mean. Output order: the A tokens that stay, then B, with the
    distillation token (B's first) put second."""
    out_x, out_size = [], []
    for xb, sb, mb in zip(x, size, metric):
        A, Bs = list(range(0, len(xb), 2)), list(range(1, len(xb), 2))
        partners = [b for b in Bs if not (protected == 2 and b == 1)]
        cos = lambda i, j: float(mb[i] @ mb[j] / (mb[i].norm() * mb[j].norm()))  # noqa: E731
        edges = {i: max(partners, key=lambda j: cos(i, j)) for i in A if i != 0}
        merged = sorted(edges, key=lambda i: -cos(i, edges[i]))[:r]
        total = {j: sb[j] * xb[j] for j in Bs}
        weight = {j: sb[j].clone() for j in Bs}
        for i in merged:
            total[edges[i]] = total[edges[i]] + sb[i] * xb[i]
            weight[edges[i]] = weight[edges[i]] + sb[i]
        order = [(i, None) for i in A if i not in merged] + [(None, j) for j in Bs]
        if protected == 2:
            order = order[:1] + [(None, 1)] + [o for o in order[1:] if o != (None, 1)]
        out_x.append(torch.stack([xb[i] if j is None else total[j] / weight[j] for i, j in order]))
        out_size.append(torch.stack([sb[i] if j is None else weight[j] for i, j in order]))
    return torch.stack(out_x), torch.stack(out_size)


@pytest.mark.parametrize("protected", [1, 2])
def test_tome_merge_conserves_the_size_weighted_sum_and_matches_its_definition(protected):
    """Must-hold 2 (merge): after one merge of r tokens, sum(size x) and sum(size) are what they were, the prefix tokens
    are untouched, and the result is the reference merge written above from the paper."""
    g = torch.Generator().manual_seed(protected)
    x, metric = torch.randn(3, 13, 6, generator=g), torch.randn(3, 13, 4, generator=g)
    size = torch.randint(1, 5, (3, 13, 1), generator=g).float()
    match = peers.bipartite_soft_matching(metric, 4, protected)
    merged, merged_size = peers.merge_wavg(x, size, match, protected)
    assert merged.shape == (3, 9, 6) and merged_size.shape == (3, 9, 1)
    assert torch.allclose((merged * merged_size).sum(1), (x * size).sum(1), atol=1e-5)
    assert torch.equal(merged_size.sum(1), size.sum(1))
    assert torch.allclose(merged[:, :protected], x[:, :protected], atol=1e-6)  # x size / size: rounding only
    ref_x, ref_size = tome_merge_reference(x, size, metric, 4, protected)
    assert torch.allclose(merged, ref_x, atol=1e-6) and torch.equal(merged_size, ref_size)
    assert (peers.bipartite_soft_matching(metric[:, :3], 4, protected) is None) == (protected == 2)  # r <= (n - P) // 2


def test_proportional_attention_is_attention_over_repeated_tokens():
    """Must-hold 2 (attention): with unit sizes (or none) it is softmax(q k^T / sqrt(dh)) v written out; with size s_j
    it is plain attention over a sequence where key/value j appears s_j times (the reason for log(size))."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    plain = plain_attention(q, k, v)
    assert torch.allclose(peers.proportional_attention(q, k, v, torch.ones(2, 5, 1)), plain, atol=1e-6)
    assert torch.allclose(peers.proportional_attention(q, k, v, None), plain, atol=1e-6)
    size = torch.tensor([[1, 3, 2, 1, 4], [2, 1, 1, 5, 1]]).float()[..., None]
    for b in range(2):
        rep = torch.repeat_interleave(torch.arange(5), size[b, :, 0].long())
        expected = plain_attention(q[b:b + 1], k[b:b + 1, :, rep], v[b:b + 1, :, rep])
        assert torch.allclose(peers.proportional_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], size[b:b + 1]), expected,
                              atol=1e-5)


@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("fuse", ["mean", "sum"])
def test_evit_fused_token_is_the_attention_weighted_mean_of_the_dropped_tokens(family, fuse):
    """Must-hold 3: EViT pruning at layer 2 equals a reference written here: attention written out, the head-averaged
    class-token attention, the ceil(rate m) patches with the most of it kept, the others fused by a loop into their
    attention-weighted mean (method.md §8; "sum": the released code's weighted sum), then the MLP and dense blocks."""
    model, img = family_model(family), torch.randn(2, 3, 32, 32)
    P, rate = model.cfg.prefix_tokens, 0.4
    with torch.no_grad():
        x = model.blocks[0](model.embed(img))
        blk = model.blocks[1]
        B, n, d = x.shape
        H = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(x)).view(B, n, 3, H, d // H).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) / (d // H) ** 0.5).softmax(-1)
        y = x + blk.ls1(blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, n, d)))
        cls = attn[:, :, 0, P:].mean(1)
        m = n - P
        n_keep = int(np.ceil(rate * m))
        rows = []
        for b in range(B):
            order = sorted(range(m), key=lambda i: -float(cls[b, i]))
            fused, weight = torch.zeros(d), 0.0
            for i in order[n_keep:]:
                fused, weight = fused + cls[b, i] * y[b, P + i], weight + cls[b, i]
            fused = fused / weight if fuse == "mean" else fused
            rows.append(torch.cat([y[b, :P], y[b, [P + i for i in sorted(order[:n_keep])]], fused[None]]))
        z = torch.stack(rows)
        z = z + blk.ls2(blk.mlp(blk.norm2(z)))
        for blk in model.blocks[2:]:
            z = blk(z)
        expected = model.classify(model.norm(z[:, :P]))
        got = peers.PeerModel(model, peers.EViT(rate, (2,), fuse))(img)
    assert z.shape[1] == P + n_keep + 1
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("peer", PEER_SETTINGS, ids=lambda p: p.describe())
def test_peer_flops_match_torch_counter(family, peer):
    """Must-hold 4: the closed form equals what the peer's real forward executes (FlopCounterMode), every family."""
    model = family_model(family)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        peers.PeerModel(model, peer)(torch.randn(1, 3, 32, 32))
    assert peers.peer_flops(model.cfg, peer) == fc.get_total_flops() / 2


@pytest.mark.parametrize("family", FAMILY)
def test_peer_budget_search_lands_closest_at_or_below(family):
    """at_gflops takes the setting closest at or below the budget: the next more expensive one (r - 1; a slightly larger
    keep rate) costs more than the budget; searching ToMe's schedule too lands no farther; an unreachable budget is a
    one-line error."""
    cfg = FAMILY[family]
    dense = flops.count_flops(cfg)
    for fraction in (0.55, 0.7, 0.85):
        target = fraction * dense / 1e9
        tome = peers.at_gflops(cfg, "tome", target)
        assert peers.peer_flops(cfg, tome) <= target * 1e9
        assert tome.r == 0 or peers.peer_flops(cfg, peers.ToMe(r=tome.r - 1)) > target * 1e9
        scheduled = peers.at_gflops(cfg, "tome", target, inflect=None)  # constant r among the schedules searched
        assert peers.peer_flops(cfg, tome) <= peers.peer_flops(cfg, scheduled) <= target * 1e9
        evit = peers.at_gflops(cfg, "evit", target, layers=(2, 3))
        assert peers.peer_flops(cfg, evit) <= target * 1e9
        assert evit.rate == 1 or peers.peer_flops(cfg, peers.EViT(evit.rate + 1e-6, (2, 3))) > target * 1e9
    with pytest.raises(UserError, match="costs .* more than"):
        peers.at_gflops(cfg, "evit", 0.6 * dense / 1e9, layers=(3, 4))  # layers 1, 2 dense: >= 0.68


def peer_model_trains_and_predicts(peer, cfg=SMALL_CFG):
    """A PeerModel of `peer` on a random model of cfg: light_finetune (2 steps) moves its wrapped weights, predict
    gives one class per image. Returns the model."""
    torch.manual_seed(0)
    student, teacher = vit.VisionTransformer(cfg).eval(), vit.VisionTransformer(cfg).eval()
    ds = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    model = peers.PeerModel(student, peer)
    before = copy.deepcopy(model.model.state_dict())
    assert common.light_finetune(model, teacher, None, "removed", ds, 1, 1e-3, 8, 0, lambda m: None, workers=0) == 2
    assert any(not torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    preds, labels = evaluate.predict(model, ds, workers=0)
    assert preds.shape == labels.shape == (16,)
    return model


def test_peer_models_run_through_the_final_finetune_and_evaluation():
    """PeerModel is what pipeline/finetune.py and pipeline/evaluate.py run: light_finetune trains the wrapped weights
    under the peer's forward, predict gives one class per image; masks and bad settings are one-line errors."""
    student = vit.VisionTransformer(SMALL_CFG).eval()
    for peer in (peers.ToMe(r=3), peers.EViT(0.5, (2, 3))):
        model = peer_model_trains_and_predicts(peer)
        with pytest.raises(UserError, match="takes no masks"):
            model(torch.randn(1, 3, 32, 32), keep=random_nested_keep(SMALL_CFG, 0))
    for bad in (peers.EViT(0.0), peers.EViT(1.5), peers.EViT(0.5, (5,)), peers.ToMe(r=-1), peers.ToMe(r=2, inflect=2)):
        with pytest.raises(UserError):
            peers.PeerModel(student, bad)


# ----------------------------------------------------------------------------- export, speed in every runtime, the GPU check
# The ONNX file computes PyTorch's logits and only flops.py's FLOPs; CUDA agrees with the CPU; gpu_check.sh runs; docs from results.
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402

from pipeline import export as pipeline_export  # noqa: E402


with warnings.catch_warnings():  # no pytest ini file (the design card: no new top-level files) registers the marker
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    cuda = pytest.mark.cuda  # the CUDA tests bench/gpu_check.sh selects with pytest -m cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (bench/gpu_check.sh runs these "
                                "on a GPU machine)")


def onnx_macs(path):
    """Multiply-adds of the MatMul, Gemm and Conv nodes of an ONNX file at batch 1, read off the shapes onnx's own
    shape inference gives every tensor (independent of flops.py)."""
    import onnx
    m = onnx.load(path)
    for v in (m.graph.input[0], m.graph.output[0]):  # the dynamic batch dimension, fixed to 1
        v.type.tensor_type.shape.dim[0].Clear()
        v.type.tensor_type.shape.dim[0].dim_value = 1
    del m.graph.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
    shapes = {i.name: list(i.dims) for i in m.graph.initializer}
    for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]:
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    total = 0
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            a, w, y = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
            assert None not in a + w + y, f"{n.op_type} {n.name} has an unknown dimension: {a} {w} {y}"
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            inner = {"MatMul": a[-1], "Gemm": a[0] if trans_a else a[-1], "Conv": math.prod(w[1:])}[n.op_type]
            total += math.prod(y) * inner  # every output element sums `inner` products
    return total


DEIT_S_REMOVED = flops.linear_pyramid(vit.PRESETS["deit_small"], 2.6e9, "removed")  # the paper's 2.6 G, as
# bench/speed.py times it; the frozen semantics is exported from the trained proxy and from the other families below


@pytest.fixture(scope="module")
def deit_small_onnx(tmp_path_factory):
    """DeiT-S (random weights, 224 px) exported slimmed under the removed semantics: (model, path, keep)."""
    torch.manual_seed(0)
    model = vit.deit("deit_small").eval()
    keep = scattered_masks(DEIT_S_REMOVED, 197, seed=1)
    return model, pipeline_export.export_onnx(model, str(tmp_path_factory.mktemp("onnx") / "removed.onnx"), keep,
                                              "removed"), keep


def scattered_masks(counts, N, seed):
    """Nested masks with these kept counts, the patches of each layer a random subset of the layer before's."""
    g, prev, keep = torch.Generator().manual_seed(seed), torch.arange(N), []
    for n in counts:
        prev = torch.cat([prev[:1], prev[1:][torch.randperm(len(prev) - 1, generator=g)[:n - 1]]]).sort().values
        keep.append(prev)
    return keep


@needs_onnx
@pytest.mark.xdist_group("deit_small_onnx")  # one worker exports DeiT-S once for both
def test_onnx_matches_pytorch_and_the_eq2_reference_at_deit_small_shapes(deit_small_onnx):
    """onnxruntime on the exported file gives vit.py's logits to 1e-4 and the Eq. 2 reference's (written in this file)
    at any batch size; the masks are constants, the batch dimension is dynamic, and the metadata says how to feed it."""
    import onnx
    model, path, keep = deit_small_onnx
    tokens = "removed"
    session = pipeline_export.ort_session(path)
    for batch in (2, 3):
        img = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        got = torch.from_numpy(session.run(["logits"], {"img": img.numpy()})[0])
        with torch.no_grad():
            ref = eq2_reference(model, img, keep, tokens)
            assert (got - model(img, keep=keep, tokens=tokens)).abs().max() < 1e-4
        assert (got - ref).abs().max() < 1e-4 and ref.abs().max() > 1e-2  # logits well above the tolerance
    proto = onnx.load(path, load_external_data=False)
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim][0]  # batch: a named, free dimension
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 224, 224]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["mean"]) == list(vit.IMAGENET_MEAN) and json.loads(meta["std"]) == list(vit.IMAGENET_STD)
    assert meta["img_size"] == "224" and "CenterCrop(size=(224, 224)" in meta["eval_transform"]
    assert json.loads(meta["kept_per_layer"]) == DEIT_S_REMOVED and meta["tokens"] == tokens


@needs_onnx
@pytest.mark.xdist_group("deit_small_onnx")  # one worker exports DeiT-S once for both
def test_onnx_graph_computes_only_the_flops_flops_py_counts(deit_small_onnx):
    """The exported DeiT-S graph's multiply-adds (MatMul, Gemm and Conv, from onnx's shape inference) equal flops.py's
    count: no key or value for a patch that left (C1), no query or MLP row for it. (The frozen semantics' count, P1, is
    checked on the proxy's graph and on the other families' graphs.)"""
    model, path, keep = deit_small_onnx
    assert onnx_macs(path) == flops.count_flops(model.cfg, keep, tokens="removed")


@needs_onnx
@pytest.mark.parametrize("family, tokens", [("distilled", "removed"), ("deit3", "frozen")])
def test_onnx_of_every_family_matches_pytorch_and_counts_flops_py(tmp_path, family, tokens):
    """The distilled DeiT (two prefix tokens, two heads averaged) exports under the removed semantics, DeiT-III
    (LayerScale) under the frozen one (the plain DeiT's graphs: the proxy's frozen, DeiT-S's removed): onnxruntime gives
    vit.py's logits to 1e-4 and the graph's multiply-adds are flops.py's."""
    model = family_model(family)
    x = torch.randn(3, 3, 32, 32)
    keep = random_nested_keep(model.cfg, seed=2)
    path = pipeline_export.export_onnx(model, str(tmp_path / f"{family}_{tokens}.onnx"), keep, tokens)
    got = pipeline_export.ort_session(path).run(["logits"], {"img": x.numpy()})[0]
    with torch.no_grad():
        want = model(x, keep=keep, tokens=tokens)
    assert np.abs(got - want.numpy()).max() < 1e-4
    assert onnx_macs(path) == flops.count_flops(model.cfg, keep, tokens=tokens)


def slimmed_proxy(tmp_path, masks):
    """The proxy checkpoint with the masks of a committed run, saved as slim.py saves slimmed.pth."""
    ck = torch.load(PROXY_CKPT, map_location="cpu", weights_only=False)
    cfg = vit.load_checkpoint(PROXY_CKPT).cfg
    keep, tokens = vit.load_masks(masks, cfg)
    path = tmp_path / f"slimmed_{tokens}.pth"
    torch.save({"model": ck["model"], "config": vit.asdict(cfg), "keep": [k.tolist() for k in keep], "tokens": tokens,
                "classes": sorted(os.listdir(os.path.join(CIFAR, "val")))}, path)
    return path, keep, tokens


@needs_onnx
def test_export_cli_on_the_proxy_matches_pytorch_on_real_images(tmp_path, capsys):
    """`python slim.py --export onnx --weights OUT/slimmed.pth` on the trained proxy with the headline's committed masks:
    OUT/slimmed.onnx, whose logits on real CIFAR-10 val images are PyTorch's to 1e-4, with the checkpoint's
    normalisation and classes in its metadata; the dense checkpoint exports too. Both graphs hold the multiply-adds
    flops.py counts. (The removed semantics is exported at DeiT-S shapes below.)"""
    import onnx
    path, keep, tokens = slimmed_proxy(tmp_path, os.path.join(REPO, "results/cifar10-proxy/masks.json"))
    written = cli(["--export", "onnx", "--weights", str(path)])
    assert written == str(tmp_path / f"slimmed_{tokens}.onnx") and f"tokens {tokens}" in capsys.readouterr().out
    model = vit.load_checkpoint(PROXY_CKPT)
    val = data.build_dataset(CIFAR, "val", 32, mean=model.cfg.mean, std=model.cfg.std)
    img = torch.stack([val[i][0] for i in range(0, len(val), 10)])  # 20 images, 2 per class
    got = torch.from_numpy(pipeline_export.ort_session(written).run(["logits"], {"img": img.numpy()})[0])
    with torch.no_grad():
        assert (got - model(img, keep=keep, tokens=tokens)).abs().max() < 1e-4
        assert (got - eq2_reference(model, img, keep, tokens)).abs().max() < 1e-3  # another summation order
    meta = {p.key: p.value for p in onnx.load(written).metadata_props}
    assert json.loads(meta["mean"]) == list(model.cfg.mean) and meta["img_size"] == "32"
    assert json.loads(meta["classes"])[0] == "airplane" and meta["tokens"] == tokens == "frozen"
    dense = cli(["--export", "onnx", "--weights", PROXY_CKPT, "--out", str(tmp_path / "dense")])
    assert dense == str(tmp_path / "dense" / "deit_tiny_p4_cifar10.onnx")
    got = pipeline_export.ort_session(dense).run(["logits"], {"img": img.numpy()})[0]
    with torch.no_grad():
        assert (torch.from_numpy(got) - model(img)).abs().max() < 1e-4
    assert onnx_macs(dense) == flops.count_flops(model.cfg) and onnx_macs(written) == flops.count_flops(
        model.cfg, keep, tokens=tokens)


def test_export_bad_input_is_one_line(tmp_path, monkeypatch):
    """A masks file instead of a slimmed model, a checkpoint that is no DeiT, no --weights, a DPS-ViT checkpoint (per-image
    masks: no static graph), a missing extra: each a one-line error naming the fix. The main path never imports the
    extra."""
    keep = random_nested_keep(SMALL_CFG, 1)
    vit.save_masks(tmp_path / "masks.json", keep, SMALL_CFG, "frozen")
    with pytest.raises(SystemExit, match=r"masks.json is a masks file, not a model: pass the slimmed.pth beside it"):
        cli(["--export", "onnx", "--weights", str(tmp_path / "masks.json")])
    (tmp_path / "masks.pth").write_text((tmp_path / "masks.json").read_text())
    with pytest.raises(SystemExit, match=r"holds JSON \(a masks file\?\), not a model"):
        cli(["--export", "onnx", "--weights", str(tmp_path / "masks.pth")])
    torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 3, 3)}}, tmp_path / "resnet.pth")
    with pytest.raises(SystemExit, match="not a DeiT/timm ViT state dict"):
        cli(["--export", "onnx", "--weights", str(tmp_path / "resnet.pth")])
    with pytest.raises(SystemExit, match="--export needs --weights"):
        cli(["--export", "onnx"])
    torch.save({"model": vit.VisionTransformer(SMALL_CFG).state_dict(), "dynamic": {"counts": [17, 9, 5, 1]}},
               tmp_path / "dynamic.pth")
    with pytest.raises(SystemExit, match="is a DPS-ViT checkpoint .* the export writes static masks only"):
        cli(["--export", "onnx", "--weights", str(tmp_path / "dynamic.pth")])
    torch.save({"model": vit.VisionTransformer(SMALL_CFG).state_dict()}, tmp_path / "small.pth")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(SystemExit, match=r"needs the optional packages onnx, onnxscript \(onnxscript is missing\): "
                                         r"pip install -r requirements-export.txt"):
        cli(["--export", "onnx", "--weights", str(tmp_path / "small.pth")])
    code = ("import sys, slim, flops, data; from pipeline import run; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnx', 'onnxscript', 'onnxruntime'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-500:]


@cuda
@needs_cuda
@pytest.mark.parametrize("tokens", vit.TOKENS)
def test_cuda_slimmed_forward_equals_the_cpu_forward(tokens):
    """The gathered forward on CUDA: float32 (TF32 off) equals the CPU's to float rounding; under bfloat16 autocast
    (what slim.py runs on CUDA) to bfloat16's precision; for every family and random nested masks."""
    for family in FAMILY:
        model = family_model(family)
        keep = random_nested_keep(model.cfg, seed=2)
        img = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            ref = model(img, keep=keep, tokens=tokens)
            on_gpu = copy.deepcopy(model).cuda()
            matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            try:
                fp32 = on_gpu(img.cuda(), keep=keep, tokens=tokens).cpu()
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
            with evaluate.autocast(torch.device("cuda")):
                bf16 = on_gpu(img.cuda(), keep=keep, tokens=tokens).float().cpu()
        scale = ref.abs().max()
        assert (fp32 - ref).abs().max() <= 1e-4 * max(1.0, scale), family
        assert (bf16 - ref).abs().max() <= 3e-2 * scale, family  # bfloat16: 8 bits of mantissa, 12 layers deep at most
        assert (bf16 - ref).abs().max() > 0  # autocast did run in bfloat16


@cuda
@needs_cuda
def test_cuda_block_finetune_follows_the_cpu_one(monkeypatch):
    """The search's block fine-tune (C5) on CUDA: only block t moves; in float32 (autocast and TF32 off) it takes the
    CPU's steps to float rounding; under bfloat16 autocast (what slim.py runs on CUDA) E_{t+1} falls as on the CPU and
    the update points the CPU's way. Masks where E is large (tokens removed), so the steps are not noise."""
    model, fit, held, s = search_setup(eps=0.01, tokens="removed")
    s = replace(s, ft_steps=20)
    t, keep = 2, random_nested_keep(SMALL_CFG, seed=5)

    def finetuned(device):
        m = copy.deepcopy(model).to(device)
        slim.finetune_block(m, t, slim.at_layer(fit, t), keep, s, seed=0, desc="")
        e = slim.layer_error(m, slim.at_layer(held, t), keep, s.tokens, s.error, t, s.batch_size).relative
        return {k: v.cpu() for k, v in m.state_dict().items()}, e

    start = model.state_dict()
    before = slim.layer_error(model, slim.at_layer(held, t), keep, s.tokens, s.error, t, s.batch_size).relative
    cpu_sd, e_cpu = finetuned("cpu")
    bf16_sd, e_bf16 = finetuned("cuda")
    update = {name: torch.cat([(sd[k] - start[k]).flatten() for k in start]) for name, sd in (("cpu", cpu_sd),
                                                                                                ("bf16", bf16_sd))}
    moved = [k for k in start if not torch.equal(start[k], bf16_sd[k])]
    assert moved and all(k.startswith(f"blocks.{t - 1}.") for k in moved)
    assert e_cpu < before and e_bf16 < before and abs(e_bf16 - e_cpu) <= 0.1 * (before - e_cpu)
    assert torch.nn.functional.cosine_similarity(update["cpu"], update["bf16"], dim=0) > 0.99
    monkeypatch.setattr(slim, "autocast", lambda device: contextlib.nullcontext())  # float32 on CUDA
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    fp32_sd, e_fp32 = finetuned("cuda")
    gap = torch.cat([(fp32_sd[k] - cpu_sd[k]).flatten() for k in start]).norm()
    assert gap <= 1e-3 * update["cpu"].norm() and abs(e_fp32 - e_cpu) <= 1e-4 * e_cpu


def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path):
    """bench/gpu_check.sh --cpu-smoke: the GPU check's four steps at tiny size on the CPU, so that the script cannot rot
    unseen: the CUDA tests are selected by their marker (and skip here), the search and final fine-tune run through
    slim.py, torchrun is skipped with a line saying why, the speed bench times both semantics beside the paper's V100
    figure; one JSON holds it all."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(out), "--cpu-smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    res = json.loads((out / "gpu_check.json").read_text())
    steps = res["steps"]
    assert res["failed"] == [] and list(steps) == ["cuda-tests", "search", "torchrun", "speed"]
    cases = steps["cuda-tests"]["cases"]  # what pytest -m cuda collected and how each ended (the junit file)
    assert len(cases) == 3 and set(cases.values()) == ({"passed"} if torch.cuda.is_available() else {"skipped"})
    search = json.loads((out / "search" / "report.json").read_text())  # what slim.py itself wrote
    assert steps["search"]["slimmed_gflops"] == search["slimmed_gflops"] < search["dense_gflops"]
    speed = json.loads((out / "speed.json").read_text())
    assert steps["speed"]["speedup"]["frozen"]["eager"]["batch 1"] > 0 and speed


# ----------------------------------------------------------------------------- DPS-ViT, the dynamic variant (Sec. 4.4, method.md P6, C8)
# Per-image masks equal their references and are checked, G's FLOPs and per-image Eq. 6 targets are exact, the CLI runs.
from pipeline import dynamic as pipeline_dynamic  # noqa: E402


def per_image_keep(cfg, counts, batch, seed):
    """Random per-image nested masks with fixed counts: image b's m_t is the prefix tokens and a random counts[t-1] - P
    of its own m_{t-1}'s patches. A list of (batch, n_t) index tensors."""
    g, P = torch.Generator().manual_seed(seed), cfg.prefix_tokens
    images = []
    for _ in range(batch):
        prev, ks = torch.arange(cfg.num_tokens), []
        for n in counts:
            prev = torch.cat([prev[:P], prev[P:][torch.randperm(prev.numel() - P, generator=g)[:n - P]]]).sort().values
            ks.append(prev)
        images.append(ks)
    return [torch.stack([ks[t] for ks in images]) for t in range(len(counts))]


def dps_counts(cfg):
    """Kept counts for the 4-layer test models: every token, then 12 of 16 patches, 6, the prefix tokens alone."""
    P = cfg.prefix_tokens
    return [cfg.num_tokens, P + 12, P + 6, P]


@pytest.mark.parametrize("family", list(FAMILY))
@pytest.mark.parametrize("tokens", vit.TOKENS)
def test_per_image_forward_equals_static_and_the_per_image_eq2_reference(tokens, family):
    """Must-hold 1: with the same indices for every image the per-image forward equals the static one; with each
    image's own indices it equals Eq. 2 with a per-image diag(m), and image b's output is the static forward of
    image b alone with b's masks."""
    model, x = family_model(family, 1), torch.randn(3, 3, 32, 32)
    shared = random_nested_keep(model.cfg, 2)
    own = per_image_keep(model.cfg, dps_counts(model.cfg), 3, seed=3)
    assert not torch.equal(own[2][0], own[2][1])  # the images really keep different patches
    with torch.no_grad():
        static = model(x, keep=shared, tokens=tokens)
        assert torch.allclose(model(x, keep=[k.expand(3, -1) for k in shared], tokens=tokens), static, atol=1e-6)
        out = model(x, keep=own, tokens=tokens)
        ref = eq2_reference(model, x, own, tokens)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        for b in range(3):
            alone = model(x[b:b + 1], keep=[k[b] for k in own], tokens=tokens)
            assert torch.allclose(out[b:b + 1], alone, atol=1e-5)
        _, attention = model.attention_maps(model.embed(x), own, tokens)
    assert torch.equal(attention[2].query_rows, own[2]) and attention[2].P.shape[:3] == (3, model.cfg.num_heads, own[2].shape[1])


@pytest.mark.parametrize("family", list(FAMILY))
@pytest.mark.parametrize("tokens", vit.TOKENS)
def test_dps_keeps_the_prefix_and_the_patches_g_ranks_highest_among_the_previous_layer(tokens, family):
    """The keep rule (C8): at each layer with a G, image b keeps the prefix tokens and the n_t - P patches of its own
    m_{t-1} with the highest ŝ that G_t gives their rows of Z_{t-1}, recomputed here from the static per-image
    forward; the dynamic forward is that per-image forward with the masks it chose."""
    model, x = family_model(family, 4), torch.randn(4, 3, 32, 32)
    cfg, P = model.cfg, model.cfg.prefix_tokens
    dyn = pipeline_dynamic.DynamicSlimmed(model, dps_counts(cfg), tokens).eval()
    assert sorted(int(t) for t in dyn.predictors) == [2, 3]
    with torch.no_grad():
        out, keep = dyn.run_blocks(model.embed(x))
        assert torch.allclose(dyn.classify(model.features(out)), model(x, keep=keep, tokens=tokens), atol=1e-6)
        assert not torch.equal(keep[2][0], keep[2][1])
        for t in (2, 3):
            z = model.run_blocks(model.embed(x), keep, tokens, end=t - 1)  # Z_{t-1} as the dynamic forward saw it
            for b in range(4):
                prev = keep[t - 2][b]
                rows = z[b, prev[P:]] if tokens == "frozen" else z[b, P:]
                s_hat = dyn.predictors[str(t)](rows[None])[0]
                best = set(prev[P:][s_hat.argsort(descending=True)[:dyn.counts[t - 1] - P]].tolist())
                assert keep[t - 1][b, :P].tolist() == list(range(P)) and set(keep[t - 1][b, P:].tolist()) == best
    assert [k.shape[1] for k in keep] == dps_counts(cfg)


def test_per_image_masks_are_checked():
    """Must-hold 2: per-image masks must hold the prefix tokens, be sorted, fit the model and the batch, and be nested
    per image; each failure is a one-line error naming the image and the fix."""
    cfg = SMALL_CFG
    good = per_image_keep(cfg, dps_counts(cfg), 2, seed=0)
    not_nested = [k.clone() for k in good]
    dropped = next(i for i in range(1, 17) if i not in good[1][1].tolist())
    not_nested[2][1, -1] = dropped  # image 1's layer 3 takes a patch its layer 2 dropped
    not_nested[2][1] = not_nested[2][1].sort().values
    no_prefix, unsorted, too_big = ([k.clone() for k in good] for _ in range(3))
    no_prefix[1][0, 0] = good[0][0, -1]
    unsorted[1][1, 1:3] = unsorted[1][1, 1:3].flip(0)
    too_big[0] = torch.arange(1, 18).expand(2, -1).clone()
    too_big[0][:, 0] = 0
    cases = {"not nested: layer 3 of image 1 keeps tokens \\[" + str(dropped): not_nested,
             "layer 2 of image 0 does not keep the prefix tokens \\[0\\]": no_prefix,
             "layer 2 of image 1 indices are not sorted": unsorted,
             "token index 17 but the model has 17 tokens": too_big,
             "per-image masks for 2 images but the batch has 3": good}
    model = vit.VisionTransformer(cfg)
    for msg, keep in cases.items():
        with pytest.raises(UserError, match=msg):
            model(torch.randn(3 if "batch has 3" in msg else 2, 3, 32, 32), keep=keep)
    with pytest.raises(UserError, match="non-increasing counts"):
        pipeline_dynamic.DynamicSlimmed(model, [17, 6, 12, 1])
    with pytest.raises(UserError, match="chooses its own masks"):
        pipeline_dynamic.DynamicSlimmed(model, dps_counts(cfg))(torch.randn(1, 3, 32, 32), keep=good)


@pytest.mark.parametrize("name,tokens", [("deit_tiny", "frozen"), ("deit_tiny", "removed"), ("deit_tiny_distilled", "frozen")])
def test_dps_flops_with_g_match_torch_counter(name, tokens):
    """Must-hold 3: flops.py's count of the dynamic forward, G included, equals FlopCounterMode's on the real forward
    (a pyramid with a layer that keeps its candidates, where G does not run); G costs under 2% of the dense DeiT-S at
    the Fig. 5 pyramid; counts scaled to 2.4/2.6 of the FLOPs (the paper's DPS/PS ratio) get there."""
    cfg = vit.PRESETS[name]
    counts = [n - 1 + cfg.prefix_tokens for n in FIG5_PYRAMID]
    counts[4] = counts[3]  # layer 5 keeps every candidate: no choice, so G_5 is not run nor counted
    dyn = pipeline_dynamic.DynamicSlimmed(vit.deit(name), counts, tokens).eval()
    ours = flops.count_flops(cfg, counts=counts, tokens=tokens, predictor_width=dyn.width)
    assert ours == counted_macs(dyn, None, tokens), (ours, counted_macs(dyn, None, tokens))
    g = flops.predictor_flops(cfg, counts, dyn.width)
    assert sum(g) == ours - flops.count_flops(cfg, counts=counts, tokens=tokens) and g[4] == 0 and min(g[2:4]) > 0
    small = vit.PRESETS["deit_small"]
    assert sum(flops.predictor_flops(small, FIG5_PYRAMID, small.embed_dim // 8)) < 0.02 * flops.count_flops(small)
    scaled = flops.scaled_counts(cfg, counts, 2.4 / 2.6 * flops.count_flops(cfg, counts=counts, tokens=tokens), tokens,
                                 dyn.width)
    ratio = flops.count_flops(cfg, counts=scaled, tokens=tokens, predictor_width=dyn.width) / flops.count_flops(
        cfg, counts=counts, tokens=tokens)
    assert abs(ratio - 2.4 / 2.6) < 0.005 and all(a >= b for a, b in zip(scaled, scaled[1:]))


@pytest.mark.parametrize("tokens", vit.TOKENS)
@pytest.mark.parametrize("t", [1, 2])
def test_per_image_eq6_target_is_the_static_score_of_each_image_alone(t, tokens):
    """Must-hold 4: the per-image target of layer t (layer t updating every row, layers above pruned per image by
    their G) equals, image by image, the averaged static score (slim.layer_scores, checked against brute-force
    paths above) of a batch holding that image alone, with its own masks as static masks."""
    model = family_model("distilled", 5)
    dyn = pipeline_dynamic.DynamicSlimmed(model, dps_counts(model.cfg), tokens).eval()
    with torch.no_grad():
        z = model.run_blocks(model.embed(torch.randn(3, 3, 32, 32)), end=t - 1)  # Z_{t-1}, layers 1..t-1 dense
        target = pipeline_dynamic.dynamic_targets(dyn, z, t)
        _, keep = dyn.run_blocks(z, t, maps=[])
    N = model.cfg.num_tokens
    assert keep[0].shape == (3, N) and not torch.equal(keep[1][0], keep[1][1])
    for b in range(3):
        static_keep = [torch.arange(N)] * t + [k[b] for k in keep[1:]]
        alone = slim.layer_scores(model, z[b:b + 1], static_keep, tokens, t, "significance", batch_size=1)
        assert torch.allclose(target[b], alone, rtol=1e-4, atol=1e-30), (target[b], alone)


def test_fit_loss_and_measures_match_their_definitions():
    """The top-k ListMLE against the Plackett-Luce likelihood written as a loop; the top-k recall against sets; and a G fitted with the loss ranks a learnable target well."""
    g = torch.Generator().manual_seed(0)
    s_hat, s, k = torch.randn(3, 9, generator=g), torch.rand(3, 9, generator=g), 4
    nll = 0.0
    for b in range(3):
        order = s[b].argsort(descending=True)
        for j in range(k):
            rest = s_hat[b, order[j:]]
            nll -= (s_hat[b, order[j]] - rest.exp().sum().log()).item()
    assert slim.top_k_listmle(s_hat, s, k).item() == pytest.approx(nll / (3 * k), rel=1e-5)
    recall = pipeline_dynamic.top_k_recall(s_hat, s, k)
    for b in range(3):
        found = set(s_hat[b].topk(k).indices.tolist()) & set(s[b].topk(k).indices.tolist())
        assert recall[b].item() == pytest.approx(len(found) / k)
    torch.manual_seed(0)  # a target G can express: the feature a fixed direction reads, per image
    G, z, w = slim.Predictor(16, 8), torch.randn(128, 12, 16), torch.randn(16)
    target = (z @ w).exp()
    opt = torch.optim.AdamW(G.parameters(), lr=1e-2)
    before = slim.spearman(G(z).detach(), target).mean()
    for _ in range(150):
        opt.zero_grad()
        slim.top_k_listmle(G(z), target, 4).backward()
        opt.step()
    after = slim.spearman(G(z).detach(), target).mean()
    assert after > 0.8 and after > before + 0.3, (before, after)


def test_cli_dynamic_end_to_end_on_cifar10_subset(tmp_path):
    """Must-hold 5: a tiny static run, then `--dynamic --from OUT` (fit, fine-tune with G frozen, evaluation), its
    --eval-only, its resume and its refusals, on the CIFAR-10 proxy."""
    out = tmp_path / "run"
    common = ["--val-per-class", "3", "--workers", "1", "--batch-size", "32"]
    cli(["--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--out", str(out), "--fit-images", "64",
              "--held-images", "32", "--score-images", "16", "--ft-steps", "1", "--eps", "0.01", "--r-step", "16",
              *common])
    argv = ["--dynamic", "--from", str(out), "--fit-images", "64", "--held-images", "32", "--predictor-steps", "5",
            "--final-epochs", "0.0013", "--flops-ratio", "0.95", *common]
    report = cli(argv)
    on_disk = json.loads((out / "dynamic.json").read_text())
    cfg = vit.load_checkpoint(PROXY_CKPT).cfg
    static_counts = [k.numel() for k in vit.load_masks(out / "masks.json", cfg)[0]]
    assert on_disk["dynamic_top1"] == report["dynamic_top1"] and on_disk["static_kept_per_layer"] == static_counts
    counts = on_disk["kept_per_layer"]
    assert counts != static_counts and on_disk["layers"]
    assert on_disk["gflops"] == pytest.approx(flops.count_flops(cfg, counts=counts, predictor_width=24) / 1e9)
    assert on_disk["gflops"] == pytest.approx(0.95 * on_disk["static_gflops"], rel=0.02)
    dyn = pipeline_dynamic.DynamicSlimmed.from_checkpoint(*vit.read_checkpoint(out / "dynamic.pth"))
    slimmed = vit.load_checkpoint(out / "slimmed.pth")
    for name, p in dyn.predictors.named_parameters():  # G frozen in the fine-tune: exactly the fitted predictor
        assert torch.equal(p, torch.load(out / "dynamic_state.pt", weights_only=False)["predictors"][name])
    assert any(not torch.equal(p, q) for p, q in zip(dyn.vit.parameters(), slimmed.parameters()))  # the network moved
    ev = cli(["--eval-only", "--data", "folder", "--data-path", CIFAR, "--weights", str(out / "dynamic.pth"),
                   "--out", str(tmp_path / "ev"), *common])
    assert ev["top1"] == pytest.approx(on_disk["dynamic_top1"]) and ev["gflops"] == pytest.approx(on_disk["gflops"])
    again = cli(argv)  # the same command resumes: nothing is fitted or fine-tuned again
    assert again["dynamic_top1"] == pytest.approx(on_disk["dynamic_top1"])
    assert "the predictor fit in" in (out / "dynamic_log.txt").read_text()
    # the log opens with the command slim.cli ran, not the calling process's own arguments (pytest's here)
    assert (out / "dynamic_log.txt").read_text().startswith(f"python slim.py --dynamic --from {out} ")
    with pytest.raises(SystemExit, match=r"other settings \(steps 5 -> 6\)"):
        cli([a if a != "5" else "6" for a in argv])
    with pytest.raises(SystemExit, match="drop --masks"):
        cli(["--eval-only", "--data", "folder", "--data-path", CIFAR, "--weights", str(out / "dynamic.pth"),
                  "--masks", str(out / "masks.json"), "--out", str(tmp_path / "ev")])
    with pytest.raises(SystemExit, match="is a DPS-ViT checkpoint: evaluate it with --eval-only"):
        cli(["--data", "folder", "--data-path", CIFAR, "--weights", str(out / "dynamic.pth"), "--out",
                  str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="has no report.json"):
        cli(["--dynamic", "--from", str(tmp_path / "ev")])
    with pytest.raises(SystemExit, match="--dynamic needs --from OUT"):
        cli(["--dynamic", "--data", "folder", "--data-path", CIFAR])


def test_dynamic_fit_under_torchrun_two_processes_equals_one_process(tmp_path):
    """DPS-ViT's fit under a real 2-process torchrun (gloo): every rank draws the same image numbers and the gradients
    are summed (pipeline/distributed.py's data_parallel_steps, as pipeline.dynamic.fit_predictor runs it), so the
    fitted predictors, their ranking quality on the held images and the dynamic model's predictions equal one
    process's, up to float summation order."""
    static = tmp_path / "static"
    common = ["--val-per-class", "3", "--workers", "1", "--batch-size", "32"]
    cli(["--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--out", str(static), "--fit-images",
              "64", "--held-images", "32", "--score-images", "16", "--ft-steps", "1", "--eps", "0.01", "--r-step", "16",
              *common])
    argv = ["--dynamic", "--from", str(static), "--fit-images", "64", "--held-images", "32", "--predictor-steps", "4",
            "--final-epochs", "0", "--flops-ratio", "0.95", *common]
    one = cli(argv + ["--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "slim.py", *argv, "--out", str(tmp_path / "two")], cwd=os.path.dirname(os.path.abspath(__file__)),
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "dynamic.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1 and len(one["layers"]) == len(two["layers"]) > 0
    for a, b in zip(one["layers"], two["layers"]):
        assert a["layer"] == b["layer"] and a["spearman"] == pytest.approx(b["spearman"], abs=2e-3), (a, b)
    g1, g2 = (torch.load(tmp_path / name / "dynamic_state.pt", weights_only=False)["predictors"] for name in ("one", "two"))
    # the readout bias shifts every score of an image alike, which no ranking (nor ListMLE) sees: its gradient is
    # float noise that AdamW scales up to lr-sized steps, so it is the one parameter not compared
    assert g1.keys() == g2.keys() and all(torch.allclose(g1[k], g2[k], atol=1e-6) for k in g1 if "readout.bias" not in k)
    assert any(not torch.allclose(g1[k], torch.zeros_like(g1[k])) for k in g1)
    p1, p2 = (np.load(tmp_path / name / "dynamic_predictions.npz") for name in ("one", "two"))
    assert np.array_equal(p1["labels"], p2["labels"]) and (p1["dynamic"] != p2["dynamic"]).sum() <= 1
