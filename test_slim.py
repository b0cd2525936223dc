"""
Correctness checks for the patch-slimming reference implementation (arXiv 2106.02852).

Three kinds (STYLE.md): parity with an independent implementation (timm's DeiT), invariants of the
method (keeping every patch changes nothing, the gathered forward equals a dense masked reference,
FLOPs fall as patches are dropped, masks stay nested), and end-to-end runs on the real CIFAR-10 proxy
in ../shared (skipped with a reason when ../shared is absent). Run: python -m pytest -q
"""
import json
import os

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import data
import flops
import slim
import vit
from vit import UserError

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared")
PROXY_CKPT = os.path.join(SHARED, "models", "deit_tiny_p4_cifar10.pth")
CIFAR = os.path.join(SHARED, "data", "cifar10")
needs_shared = pytest.mark.skipif(not os.path.exists(PROXY_CKPT),
                                  reason="../shared (CIFAR-10 proxy checkpoint and images) is absent on this machine")
torch.set_num_threads(2)
SMALL_CFG = vit.ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=4, num_heads=2)


def random_nested_keep(cfg, seed, last_cls_only=True):
    """Random nested masks: each layer keeps a random subset (with token 0) of the previous layer's."""
    g = torch.Generator().manual_seed(seed)
    prev, keep = torch.arange(cfg.num_tokens), []
    for l in range(cfg.depth):
        if last_cls_only and l == cfg.depth - 1:
            k = torch.tensor([0])
        else:
            n = int(torch.randint(1, prev.numel() + 1, (1,), generator=g))
            k = torch.cat([prev[:1], prev[1:][torch.randperm(prev.numel() - 1, generator=g)[: n - 1]]]).sort().values
        keep.append(k)
        prev = k
    return keep


def masked_reference(model, img, keep):
    """Dense masked forward with METHOD.md I2 semantics, written independently of the gathered one:
    every token is computed, attention only sees keys alive before the layer, the class token is read."""
    x = model.embed(img)
    B, N, d = x.shape
    alive = torch.ones(N, dtype=torch.bool)
    for blk, k in zip(model.blocks, keep):
        a = blk.attn
        q, kk, v = a.qkv(blk.norm1(x)).view(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        s = (q @ kk.transpose(-2, -1)) * a.scale
        p = s.masked_fill(~alive, float("-inf")).softmax(-1)
        x = x + a.proj((p @ v).transpose(1, 2).reshape(B, N, d))
        x = x + blk.mlp(blk.norm2(x))
        alive = torch.zeros(N, dtype=torch.bool)
        alive[k] = True
    return model.head(model.norm(x[:, 0]))


# ----------------------------------------------------------------------------- vit.py

@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224"])
def test_parity_with_timm(tmp_path, name):
    timm = pytest.importorskip("timm", reason="timm is a test dependency: pip install -r requirements-dev.txt")
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "release.pth")  # the release format, no config entry
    ours = vit.load_checkpoint(tmp_path / "release.pth", expect=vit.PRESETS[name.split("_patch")[0]])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-4)


def test_keep_all_is_exactly_dense():
    torch.manual_seed(0)
    model = vit.VisionTransformer(SMALL_CFG).eval()
    x = torch.randn(3, 3, 32, 32)
    keep = [torch.arange(SMALL_CFG.num_tokens)] * SMALL_CFG.depth
    with torch.no_grad():
        assert torch.equal(model(x, keep=keep), model(x))


@pytest.mark.parametrize("seed", range(4))
def test_gathered_forward_equals_masked_reference(seed):
    torch.manual_seed(seed)
    model = vit.VisionTransformer(SMALL_CFG).eval()
    x = torch.randn(3, 3, 32, 32)
    keep = random_nested_keep(SMALL_CFG, seed, last_cls_only=seed % 2 == 0)
    with torch.no_grad():
        out, ref = model(x, keep=keep), masked_reference(model, x, keep)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        records = []  # the recording path (explicit softmax) computes the same thing
        feats = model.forward_features(x, keep=keep, records=records)
        assert torch.allclose(model.head(feats), ref, atol=1e-5)
    assert [r["attn"].shape[2:] for r in records][-1] == (keep[-1].numel(), keep[-2].numel())
    # the per-head outputs U_h sum to the attention output before the projection bias (METHOD.md §4)
    blk, h = model.blocks[0], model.blocks[0].norm1(model.embed(x))
    with torch.no_grad():
        full = blk.attn(h, vit.keep_positions(keep, SMALL_CFG)[0])
    assert torch.allclose(records[0]["head_out"].sum(1) + blk.attn.proj.bias, full, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_packed_model_equals_the_plain_one():
    torch.manual_seed(0)
    model = vit.VisionTransformer(SMALL_CFG).eval()
    packed, x, keep = vit.pack_for_cpu(model), torch.randn(3, 3, 32, 32), random_nested_keep(SMALL_CFG, 1)
    with torch.inference_mode():
        for k in (None, keep):
            out, ref = packed(x, keep=k), model(x, keep=k)
            assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())  # every linear really is packed
    with pytest.raises(UserError, match="inference only"):  # training it would silently update nothing
        packed(x)
    with pytest.raises(UserError, match="float32 model on the CPU"):
        vit.pack_for_cpu(vit.VisionTransformer(SMALL_CFG).to(torch.bfloat16))


def test_bad_keep_is_a_clear_error():
    cfg, N = SMALL_CFG, SMALL_CFG.num_tokens
    good = random_nested_keep(cfg, 0)
    cases = {
        "layers but the model has depth": good[:-1],
        "does not keep the class token": [torch.arange(1, N)] + good[1:],
        "not sorted and unique": [torch.tensor([0, 3, 2])] + good[1:],
        "but the model has 17 tokens": [torch.arange(N + 1)] + good[1:],
        "masks are not nested": [torch.tensor([0, 1])] + [torch.tensor([0, 2])] + good[2:],
    }
    model = vit.VisionTransformer(cfg)
    for msg, keep in cases.items():
        with pytest.raises(UserError, match=msg):
            model(torch.randn(1, 3, 32, 32), keep=keep)


def test_masks_file_roundtrip_and_validation(tmp_path):
    keep = random_nested_keep(SMALL_CFG, 1)
    vit.save_masks(tmp_path / "m.json", keep, SMALL_CFG, name="small")
    back = vit.load_masks(tmp_path / "m.json", SMALL_CFG)
    assert all(torch.equal(a, b) for a, b in zip(keep, back))
    other = vit.ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=4, num_heads=2)
    with pytest.raises(UserError, match="is for 17 tokens but the model has 65"):
        vit.load_masks(tmp_path / "m.json", other)
    obj = json.loads((tmp_path / "m.json").read_text())
    obj["keep"][2] = [0, 16]
    obj["keep"][1] = [0, 15]
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(UserError, match="not nested"):
        vit.load_masks(tmp_path / "bad.json", SMALL_CFG)
    with pytest.raises(UserError, match="not found"):
        vit.load_masks(tmp_path / "none.json", SMALL_CFG)


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


# ----------------------------------------------------------------------------- flops.py

CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}


def counted_macs(model, keep):
    """torch's own FLOP counter on the real (gathered) forward; it counts 2 FLOPs per MAC."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        model(torch.randn(1, 3, model.cfg.img_size, model.cfg.img_size), keep=keep)
    return fc.get_total_flops() / 2


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_flops_match_torch_counter(seed):
    model = vit.deit("deit_tiny").eval()
    keep = None if seed is None else random_nested_keep(model.cfg, seed)
    ours, theirs = flops.count_flops(model.cfg, keep), counted_macs(model, keep)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


def test_dense_flops_match_paper():
    assert [round(flops.count_flops(vit.PRESETS[m]) / 1e9, 1) for m in ("deit_tiny", "deit_small", "deit_base")] \
        == [1.3, 4.6, 17.6]


def test_flops_fall_monotonically_as_tokens_drop():
    cfg = vit.PRESETS["deit_small"]
    counts = [cfg.num_tokens] * cfg.depth
    last = flops.count_flops(cfg, counts=counts)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):  # drop one more token at a random layer (and, to stay nested, every layer after it)
        l = int(torch.randint(0, cfg.depth, (1,), generator=g))
        if counts[l] == 1:
            continue
        counts = counts[:l] + [min(c, counts[l] - 1) for c in counts[l:]]
        now = flops.count_flops(cfg, counts=counts)
        assert now < last
        last = now


# ----------------------------------------------------------------------------- data.py

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
    Image.new("L", (40, 30), 128).save(d / "gray.png")
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(d / "cmyk.jpg")
    Image.new("P", (50, 50), 3).save(d / "palette.png")
    Image.new("RGBA", (32, 32)).save(d / "rgba.png")
    for size in (32, 224):
        ds = data.build_dataset(str(tmp_path), "val", size)
        assert all(ds[i][0].shape == (3, size, size) for i in range(len(ds)))


def test_eval_transform_is_deit_recipe_at_224():
    t = data.build_transform(224, train=False).transforms
    assert t[0].size == 256 and t[0].interpolation.value == "bicubic" and t[1].size == (224, 224)


def test_subsets_are_deterministic():
    class DS:
        targets = [i % 5 for i in range(100)]
    first = data.subset(DS, per_class=3).indices
    assert first == sorted(range(15))
    a, b = data.subset(DS, per_class=4, seed=1).indices, data.subset(DS, per_class=4, seed=1).indices
    assert a == b and sorted(DS.targets[i] for i in a) == sorted(list(range(5)) * 4)
    assert data.subset(DS, per_class=4, seed=2).indices != a


@needs_shared
def test_proxy_checkpoint_reproduces_its_val_top1():
    ck = torch.load(PROXY_CKPT, map_location="cpu", weights_only=False)
    model = vit.load_checkpoint(PROXY_CKPT)
    ds = data.build_dataset(CIFAR, "val", model.cfg.img_size)
    top1 = slim.evaluate(model, data.loader(ds, 250, workers=2), torch.device("cpu"))
    assert abs(top1 - 100 * ck["val_top1"]) <= 0.2, (top1, ck["val_top1"])


# ----------------------------------------------------------------------------- slim.py: scores and search

def test_significance_score_matches_its_definition():
    """s_{t,i} = sum_h ||(A_t[:, i]) (U_{h,t}[i, :])||_F^2 with A_t the chain of head-averaged maps (METHOD.md I3),
    computed here the long way: explicit diag(m) products over all N tokens and explicit outer products."""
    g = torch.Generator().manual_seed(0)
    B, H, N, d = 2, 3, 7, 5
    S = [torch.arange(N), torch.tensor([0, 2, 3, 5]), torch.tensor([0, 3]), torch.tensor([0])]  # S_t .. S_L
    maps = [torch.rand(B, H, len(S[j + 1]), len(S[j]), generator=g).softmax(-1) for j in range(3)]
    U = torch.randn(B, H, N, d, generator=g)
    got, flow = slim.significance_score(U, maps), slim.attention_flow_score(U, maps)
    for b in range(B):
        A = torch.eye(N)
        for j, p in enumerate(maps):  # embed each gathered map into N x N, rows m_{l}, cols m_{l-1}
            full = torch.zeros(N, N)
            full[S[j + 1][:, None], S[j][None, :]] = p[b].mean(0)
            A = full @ A
        for i in range(N):
            want = sum((torch.outer(A[:, i], U[b, h, i]) ** 2).sum() for h in range(H))
            assert torch.allclose(got[b, i], want, rtol=1e-5), (b, i)
            assert torch.allclose(flow[b, i], A[:, i].pow(2).sum(), rtol=1e-5), (b, i)


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert slim.spearman(a, a * 10) == pytest.approx(1.0)
    assert slim.spearman(a, -a) == pytest.approx(-1.0)


def search_setup(eps, seed=0):
    torch.manual_seed(seed)
    model = vit.VisionTransformer(SMALL_CFG).eval()
    ctx = slim.Ctx(model, torch.device("cpu"), 32)
    imgs = torch.utils.data.TensorDataset(torch.randn(96, 3, 32, 32), torch.zeros(96, dtype=torch.long))
    fit = slim.cache_dense(ctx, data.loader(torch.utils.data.Subset(imgs, range(64)), 32, workers=0), "fit")
    held = slim.cache_dense(ctx, data.loader(torch.utils.data.Subset(imgs, range(64, 96)), 32, workers=0), "held")
    args = slim.resolve(slim.get_args_parser().parse_args(
        ["--data-path", "x", "--eps", str(eps), "--r0", "2", "--ft-steps", "3", "--score-images", "16"]))
    return ctx, fit, held, args


@pytest.mark.parametrize("eps", [1e9, 0.3, 1e-4])
def test_search_gives_nested_masks_and_respects_eps(eps):
    ctx, fit, held, args = search_setup(eps)
    state = slim.search(ctx, fit, held, args, log=lambda s: None)
    keep = vit.check_keep(state["keep"], SMALL_CFG)  # nested, class token everywhere
    assert keep[-1].tolist() == [0]                  # I1
    counts = [k.numel() for k in keep]
    if eps == 1e9:   # anything goes: only what I1 forces is kept
        assert counts == [1] * SMALL_CFG.depth
    if eps == 1e-4:  # nothing may change: every patch is kept below the last layer
        assert counts[:-1] == [SMALL_CFG.num_tokens] * (SMALL_CFG.depth - 1)
    err = slim.feature_error(ctx, held[0][0], held[1], keep, 0)  # the final network honours eps
    assert err <= eps + 1e-6


def test_search_resumes_to_the_same_masks(tmp_path):
    ctx, fit, held, args = search_setup(0.3)
    whole = slim.search(ctx, fit, held, args, log=lambda s: None)
    ctx, fit, held, args = search_setup(0.3)
    path = str(tmp_path / "state.pt")
    assert slim.search(ctx, fit, held, args, log=lambda s: None, state_path=path, stop_after=1) is None
    ctx, fit, held, args = search_setup(0.3)  # a fresh process: the model reloaded from its weights
    resumed = slim.search(ctx, fit, held, args, log=lambda s: None, state_path=path)
    assert [k.tolist() for k in resumed["keep"]] == [k.tolist() for k in whole["keep"]]
    assert all(torch.equal(a, b) for a, b in zip(resumed["model"].values(), whole["model"].values()))


def test_cli_bad_input(tmp_path, capsys):
    def run(*argv):
        with pytest.raises(SystemExit) as e:
            slim.cli(list(argv))
        return str(e.value.code)
    assert "--eps must be > 0" in run("--data-path", "x", "--eps", "0")
    assert "--r0 must be >= 1" in run("--data-path", "x", "--r0", "0")
    assert "--data folder needs --weights" in run("--data", "folder", "--data-path", "x")
    ckpt = tmp_path / "small.pth"
    torch.save({"model": vit.VisionTransformer(SMALL_CFG).state_dict()}, ckpt)
    assert "does not exist" in run("--data", "folder", "--data-path", str(tmp_path / "none"), "--weights", str(ckpt))
    assert "has no val/ subfolder" in run("--data", "folder", "--data-path", str(tmp_path), "--weights", str(ckpt))
    assert "does not match the model" in run("--data-path", "x", "--model", "deit_small", "--weights", str(ckpt))
    assert "could not download" in run("--data-path", "x", "--weights", "http://127.0.0.1:9/w.pth")


@needs_shared
def test_cli_end_to_end_on_cifar10_subset(tmp_path):
    out = tmp_path / "run"
    argv = ["--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--out", str(out), "--fit-images", "128",
            "--held-images", "64", "--score-images", "32", "--ft-steps", "2", "--val-per-class", "10", "--eps", "0.3",
            "--quality-images", "16", "--workers", "1"]
    report = slim.cli(argv)
    on_disk = json.loads((out / "report.json").read_text())
    cfg = vit.load_checkpoint(PROXY_CKPT).cfg
    keep = vit.load_masks(out / "masks.json", cfg)
    assert on_disk["slimmed_gflops"] == pytest.approx(flops.count_flops(cfg, keep) / 1e9)
    assert on_disk["kept_per_layer"] == [k.numel() for k in keep] and report["slimmed_top1"] == on_disk["slimmed_top1"]
    assert 0 < on_disk["slimmed_gflops"] < on_disk["dense_gflops"]
    rhos = [v for lay in on_disk["layers"] for v in lay.get("spearman", {}).values()]  # layers with >= 3 candidates
    assert rhos and all(-1 <= v <= 1 for v in rhos)
    slimmed = vit.load_checkpoint(out / "slimmed.pth")  # weights + masks, loadable as promised
    assert [k.tolist() for k in slimmed.keep] == [k.tolist() for k in keep]
    ev = slim.cli(["--eval-only", "--data", "folder", "--data-path", CIFAR, "--weights", str(out / "slimmed.pth"),
                   "--out", str(tmp_path / "ev"), "--val-per-class", "10", "--workers", "1"])
    assert ev["top1"] == pytest.approx(on_disk["slimmed_top1"]) and ev["gflops"] == pytest.approx(on_disk["slimmed_gflops"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keep": [[0, 1]] * 3}))
    with pytest.raises(SystemExit, match="masks have 3 layers but the model has depth 12"):
        slim.cli(["--eval-only", "--data", "folder", "--data-path", CIFAR, "--weights", PROXY_CKPT, "--masks", str(bad),
                  "--out", str(tmp_path / "ev2")])


@pytest.mark.parametrize("score", ["significance", "class-attn", "random"])
def test_baseline_masks_have_the_asked_counts(score):
    ctx, fit, _, _ = search_setup(0.3)
    counts = flops.linear_pyramid(SMALL_CFG, 0.6 * flops.count_flops(SMALL_CFG))
    keep = slim.masks_for_counts(ctx, fit[0], counts, score)
    assert [k.numel() for k in vit.check_keep(keep, SMALL_CFG)] == counts
    assert counts[-1] == 1 and all(a >= b for a, b in zip(counts, counts[1:]))


def test_search_layer_takes_the_first_acceptable_candidate():
    """Alg. 1 stops at the first r (in steps of r0) whose error is <= eps. With fine-tuning off, the chosen
    candidate must have E0 <= eps and the grid point just below it E0 > eps (the bisection's guarantee)."""
    ctx, fit, held, args = search_setup(0.3)
    args.ft_tries, args.ft_steps = 0, 1
    N, L = SMALL_CFG.num_tokens, SMALL_CFG.depth
    keep, checked = [torch.arange(N)] * (L - 1) + [torch.tensor([0])], 0
    for t in range(L - 1, 0, -1):
        k_t, info = slim.search_layer(ctx, t, keep, (fit[0][t - 1], fit[1], fit[2]), (held[0][t - 1], held[1]),
                                      args, log=lambda s: None)
        e0 = {r["r"]: r["E0"] for r in info["trials"]}
        n_cand = N - len(keep[t])
        grid = list(range(0, n_cand, args.r0)) + [n_cand]
        r = int(k_t.numel()) - len(keep[t])
        assert r in grid and (r == n_cand or e0[r] <= args.eps)
        if r > 0:  # not the most aggressive choice: the grid point below was measured and rejected
            assert e0[grid[grid.index(r) - 1]] > args.eps
            checked += 1
        keep[t - 1] = k_t
    assert checked  # the case that matters happened at least once
