"""
Tests of the peers added beside ToMe and EViT (bench/ppt.py: PPT; bench/pitome.py: PiToMe) and of the selection
protocol (bench/peers_select.py), on tiny random-weight models of every DeiT family vit.py loads (plain, distilled
with two prefix tokens, DeiT-III with LayerScale). Each peer: its neutral setting is the dense forward; its
reduction matches a reference written here from the paper and the released code, image by image with plain loops
(none of the implementation's helpers); its closed-form FLOPs equal FlopCounterMode on its real forward. The
selection: re-derivable from its results file, and never reading val. No network; a few seconds in all.

    .venv/bin/python -m pytest -q bench/test_peers.py
"""
import math
import os
import sys
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import data  # noqa: E402
import flops  # noqa: E402
import vit  # noqa: E402
from vit import UserError  # noqa: E402
import peers  # noqa: E402
import peers_select  # noqa: E402
import pitome  # noqa: E402
import ppt  # noqa: E402

from test_slim import FAMILY, family_model, peer_model_trains_and_predicts  # noqa: E402  (the suite's DeiT family at test size: 16 patches)
SMALL = FAMILY["deit"]
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:  # CPU's fused attention, counted as SDPA
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}


# ----------------------------------------------------------------------------- references, one image at a time

def attention_written_out(blk, x, size):
    """Block blk's attention branch on one image's rows x (n, d), sizes (n,) added as log size to the logits: the
    residual output (n, d), the attention (H, n, n), the keys and values (H, n, dh)."""
    n, d = x.shape
    H = blk.attn.num_heads
    h = torch.nn.functional.layer_norm(x, (d,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = (qkv[:, i * d:(i + 1) * d].reshape(n, H, d // H).transpose(0, 1) for i in range(3))
    logits = q @ k.transpose(1, 2) / math.sqrt(d // H) + size.log()[None, None, :]
    attn = torch.exp(logits - logits.max(-1, keepdim=True).values)
    attn = attn / attn.sum(-1, keepdim=True)
    out = (attn @ v).transpose(0, 1).reshape(n, d) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    return x + blk.ls1(out), attn, k, v


def mlp_written_out(blk, x):
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def cosine(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def merge_by_hand(x, size, kept, joins):
    """Rows kept (in that order) of x (n, d); joins: {source row: destination row (one of kept)}; each destination
    becomes the size-weighted mean of itself and its sources. Returns rows and sizes."""
    rows, sizes = [], []
    for j in kept:
        members = [j] + [i for i, dst in joins.items() if dst == j]
        w = sum(float(size[i]) for i in members)
        rows.append(sum(float(size[i]) * x[i] for i in members) / w)
        sizes.append(w)
    return torch.stack(rows), torch.tensor(sizes)


def pitome_step_reference(blk, x, size, r, P, margin, alpha, bipartite, prop_attn):
    """PiToMe's block on one image, from the paper and released code: attention (log size when prop_attn), then the
    energy of each non-prefix token j, mean over all of them of ELU(cos(k_j, k_i) - margin) with the keys averaged
    over heads; tokens in descending energy; A = even places, B = odd; bipartite: ToMe's matching over all of them,
    the r best edges merge; otherwise only the first 2r take part and each A token joins its best B. Output: the
    prefix, then the unmerged A tokens (bipartite) or the protected ones, in energy order, then B in energy order."""
    y, _, k, _ = attention_written_out(blk, x, size if prop_attn else torch.ones_like(size))
    if r == 0:
        return mlp_written_out(blk, y), size
    key = k.mean(0)
    toks = list(range(P, len(x)))
    elu = lambda z: z if z > 0 else alpha * (math.exp(z) - 1)  # noqa: E731
    E = {i: sum(elu(cosine(key[i], key[j]) - margin) for j in toks) / len(toks) for i in toks}
    order = sorted(toks, key=lambda i: -E[i])
    pool = order if bipartite else order[:2 * r]
    A, B = pool[0::2], pool[1::2]
    best = {i: max(B, key=lambda j: cosine(key[i], key[j])) for i in A}
    if bipartite:
        src = sorted(A, key=lambda i: -cosine(key[i], key[best[i]]))[:r]
        kept = list(range(P)) + [i for i in A if i not in src] + B
    else:
        src = A
        kept = list(range(P)) + order[2 * r:] + B
    rows, sizes = merge_by_hand(y, size, kept, {i: best[i] for i in src})
    return mlp_written_out(blk, rows), sizes


def tome_merge_by_hand(y, size, key, r, P):
    """ToMe's merge of one image (ToMe Sec. 3): A = even positions, B = odd; every A token but the class token has an
    edge to its most cosine-similar B token (not the distillation token); the r strongest edges merge. Output: the
    class token, the distillation token (P = 2), the other unmerged A tokens, the other B tokens."""
    A, B = list(range(0, len(y), 2)), list(range(1, len(y), 2))
    partners = [j for j in B if j >= P]
    best = {i: max(partners, key=lambda j: cosine(key[i], key[j])) for i in A if i != 0}
    src = sorted(best, key=lambda i: -cosine(key[i], key[best[i]]))[:r]
    kept = list(range(P)) + [i for i in A if i not in src and i >= P] + [j for j in B if j >= P]
    return merge_by_hand(y, size, kept, {i: best[i] for i in src})


def ppt_step_reference(blk, x, size, r, P, threshold, prop_attn):
    """PPT's block on one image: attention (log size when prop_attn); scores s_j = (sum over heads of the class
    token's attention to j) * ||v_j|| over the non-prefix tokens, normalised; their variance (n - 1 divisor) below
    the threshold: ToMe's merge of r tokens on the head-mean keys; else keep the prefix and the highest-scoring
    tokens, highest first. Returns rows, sizes and whether it pooled."""
    y, attn, k, v = attention_written_out(blk, x, size if prop_attn else torch.ones_like(size))
    toks = list(range(P, len(x)))
    r = min(r, len(toks) // 2)
    if r == 0:
        return mlp_written_out(blk, y), size, None
    raw = {j: float(attn[:, 0, j].sum()) * float(v[:, j].flatten().norm()) for j in toks}
    s = {j: raw[j] / sum(raw.values()) for j in toks}
    mean = sum(s.values()) / len(toks)
    var = sum((s[j] - mean) ** 2 for j in toks) / (len(toks) - 1)
    if var < threshold:
        rows, sizes = tome_merge_by_hand(y, size, k.mean(0), r, P)
    else:
        kept = list(range(P)) + sorted(toks, key=lambda j: -s[j])[:len(toks) - r]
        rows, sizes = y[kept], size[kept]
    return mlp_written_out(blk, rows), sizes, var < threshold


def forward_by_hand(model, img, step):
    """Logits of model with step(t, blk, x, size) -> (x, size) applied at every block t = 0..L-1, image by image."""
    out = []
    for one in img:
        x = model.embed(one[None])[0]
        size = torch.ones(len(x))
        for t, blk in enumerate(model.blocks):
            x, size = step(t, blk, x, size)[:2]
        out.append(model.classify(model.norm(x[:model.cfg.prefix_tokens])[None])[0])
    return torch.stack(out)


# ----------------------------------------------------------------------------- must hold 1: neutral = dense

@pytest.mark.parametrize("family", FAMILY)
def test_neutral_settings_give_the_dense_logits(family):
    """PPT with r = 0 (at every layer, any threshold) and PiToMe with keep ratio 1 (any margin) are vit.py's dense
    forward."""
    model, img = family_model(family), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = model(img)
        for peer in (ppt.PPT(r=0, layers=(1, 2, 3, 4), threshold=0.0), ppt.PPT(r=0, layers=(2,), threshold=math.inf),
                     pitome.PiToMe(ratio=1.0), pitome.PiToMe(ratio=1.0, margin=0.1, prop_attn=True)):
            assert torch.allclose(peers.PeerModel(model, peer)(img), dense, atol=1e-5), peer.describe()


# ----------------------------------------------------------------------------- must hold 2: one step = the reference

@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("bipartite", [True, False])
@pytest.mark.parametrize("prop_attn", [False, True])
def test_pitome_step_matches_the_reference(family, bipartite, prop_attn):
    """One PiToMe block (pitome_block) on rows with unequal sizes equals the reference written above, image by image;
    and the whole forward equals the reference applied at every block with the released schedule (margin
    (1 - l / L), bipartite in the first ceil(L / 2) blocks)."""
    model, img = family_model(family), torch.randn(2, 3, 32, 32)
    P, blk, margin, r = model.cfg.prefix_tokens, model.blocks[1], 0.3, 5
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = model.blocks[0](model.embed(img))
        size = torch.randint(1, 4, (2, x.shape[1], 1), generator=g).float()
        got, got_size = pitome.pitome_block(blk, x, size, r, P, margin, 1.0, bipartite, prop_attn)
        for b in range(2):
            ref, ref_size = pitome_step_reference(blk, x[b], size[b, :, 0], r, P, margin, 1.0, bipartite, prop_attn)
            assert got.shape[1] == x.shape[1] - r
            assert torch.allclose(got[b], ref, atol=1e-5) and torch.equal(got_size[b, :, 0], ref_size)
        peer = pitome.PiToMe(ratio=0.75, margin=0.6, prop_attn=prop_attn)
        L = model.cfg.depth

        def step(t, blk, x, size):
            T = len(x) - P
            return pitome_step_reference(blk, x, size, min(T // 2, int(T * 0.25 + 1e-9)), P, 0.6 * (1 - t / L), 1.0,
                                         t < math.ceil(L / 2), prop_attn)
        assert torch.allclose(peers.PeerModel(model, peer)(img), forward_by_hand(model, img, step), atol=1e-4)


@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("prop_attn", [True, False])
def test_ppt_step_matches_the_reference(family, prop_attn):
    """One PPT block (ppt_block) on a batch where some images prune and others pool (the threshold between their
    variances) equals the reference written above, image by image; and the whole forward equals the reference at
    the reducing layers with ToMe's schedule of r over them."""
    model, img = family_model(family), torch.randn(4, 3, 32, 32)
    P, blk, r = model.cfg.prefix_tokens, model.blocks[1], 4
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        x = model.blocks[0](model.embed(img))
        size = torch.randint(1, 4, (4, x.shape[1], 1), generator=g).float()
        variances = []
        for b in range(4):  # the variances, from a first reference pass with threshold 0 (every image prunes)
            y, attn, k, v = attention_written_out(blk, x[b], size[b, :, 0] if prop_attn else torch.ones(x.shape[1]))
            raw = torch.tensor([float(attn[:, 0, j].sum()) * float(v[:, j].flatten().norm()) for j in range(P, len(y))])
            variances.append(float((raw / raw.sum()).var()))
        threshold = sum(sorted(variances)[1:3]) / 2  # two images pool, two prune
        got, got_size = ppt.ppt_block(blk, x, size, r, P, threshold, prop_attn)
        pooled = []
        for b in range(4):
            ref, ref_size, pool = ppt_step_reference(blk, x[b], size[b, :, 0], r, P, threshold, prop_attn)
            pooled.append(pool)
            assert torch.allclose(got[b], ref, atol=1e-5) and torch.equal(got_size[b, :, 0], ref_size), b
        assert sorted(pooled) == [False, False, True, True]
        peer = ppt.PPT(r=3, layers=(2, 4), threshold=threshold, inflect=1.0, prop_attn=prop_attn)
        rs = {1: 0, 3: 6}  # ToMe's schedule over the two reducing blocks, inflect 1: r (1 - 1) = 0, then 2r = 6

        def step(t, blk, x, size):
            return ppt_step_reference(blk, x, size, rs.get(t, 0), P, threshold, prop_attn)
        assert torch.allclose(peers.PeerModel(model, peer)(img), forward_by_hand(model, img, step), atol=1e-4)


# ----------------------------------------------------------------------------- must hold 3: FLOPs = FlopCounterMode

NEW_PEERS = [ppt.PPT(r=3, layers=(1, 3), threshold=math.inf), ppt.PPT(r=2, layers=(2, 3, 4), inflect=-1.0,
             threshold=math.inf, prop_attn=False), ppt.PPT(r=3, layers=(1, 3), threshold=0.0),
             pitome.PiToMe(ratio=0.8), pitome.PiToMe(ratio=0.5, margin=0.2, prop_attn=True),
             pitome.PiToMe(ratio=0.3)]  # ratio 0.3 is capped at half the tokens


@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("peer", NEW_PEERS, ids=lambda p: p.describe())
def test_new_peer_flops_match_torch_counter(family, peer):
    """peer_flops is what the forward executes, counted by FlopCounterMode; for PPT an image that prunes (threshold 0)
    skips the matching, ceil(n/2) floor(n/2) dh per reducing block: the closed form is its upper bound."""
    model = family_model(family)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        peers.PeerModel(model, peer)(torch.randn(1, 3, 32, 32))
    expected = peers.peer_flops(model.cfg, peer)
    if isinstance(peer, ppt.PPT) and peer.threshold == 0:
        dh = model.cfg.embed_dim // model.cfg.num_heads
        expected -= sum(math.ceil(n / 2) * (n // 2) * dh for n, n_out in peers.tokens_per_layer(model.cfg, peer)
                        if n_out < n)
    assert expected == fc.get_total_flops() / 2
    assert sum(n_out < n for n, n_out in peers.tokens_per_layer(model.cfg, peer)) > 0


@pytest.mark.parametrize("family", FAMILY)
def test_new_peer_budget_search_lands_closest_at_or_below(family):
    """ppt.at_gflops and pitome.at_gflops land at or below the budget, and the next more expensive setting (r - 1;
    the ratio 1/1000 higher) costs more than it."""
    cfg = FAMILY[family]
    dense = flops.count_flops(cfg)
    for fraction in (0.6, 0.75, 0.9):
        target = fraction * dense / 1e9
        p = ppt.at_gflops(cfg, target, layers=(1, 2, 3), threshold=1e-3)
        assert peers.peer_flops(cfg, p) <= target * 1e9
        assert p.r == 0 or peers.peer_flops(cfg, replace(p, r=p.r - 1)) > target * 1e9
        q = pitome.at_gflops(cfg, target, margin=0.5)
        assert peers.peer_flops(cfg, q) <= target * 1e9
        assert q.ratio == 1 or peers.peer_flops(cfg, replace(q, ratio=round(q.ratio + 0.001, 3))) > target * 1e9
    with pytest.raises(UserError, match="costs .* more than"):
        ppt.at_gflops(cfg, 0.5 * dense / 1e9, layers=(3, 4))


def test_new_peers_run_through_the_final_finetune_and_evaluation():
    """PeerModel with PPT (both branches in one batch) or PiToMe trains its wrapped weights under light_finetune and
    predicts one class per image; bad settings are one-line errors."""
    student = vit.VisionTransformer(SMALL).eval()
    for peer in (ppt.PPT(r=3, layers=(2, 3), threshold=1.5e-3), pitome.PiToMe(ratio=0.7)):
        peer_model_trains_and_predicts(peer, SMALL)
    for bad in (ppt.PPT(r=-1, layers=(1,)), ppt.PPT(r=2, layers=(5,)), ppt.PPT(r=2, layers=(1,), threshold=-1.0),
                pitome.PiToMe(ratio=0.0), pitome.PiToMe(ratio=0.5, margin=1.0)):
        with pytest.raises(UserError):
            peers.PeerModel(student, bad)


# ----------------------------------------------------------------------------- the selection protocol

def test_selection_is_rederived_from_the_results_file():
    """results/peers_selection.json: each method's selected setting is, of its candidates, the one with the highest
    held-out top-1 (ties: the first listed), re-derived here without the implementation's select; every candidate
    lists its setting, FLOPs (at or below the budget) and held-out top-1; the val numbers are the selected
    setting's."""
    path = os.path.join(ROOT, "results", "peers_selection.json")
    if not os.path.exists(path):
        pytest.skip("results/peers_selection.json not made yet (python bench/peers_select.py)")
    res = peers_select.read_json(path)
    assert res["held_out"]["split"] == "train" and res["budgets"]
    for budget, b in res["budgets"].items():
        for method, m in b["methods"].items():
            cands = m["candidates"]
            assert cands and all({"setting", "gflops", "held_out_top1"} <= set(c) for c in cands), (budget, method)
            assert all(c["within_tolerance"] == (b["target_gflops"] * (1 - res["tolerance"]) - 1e-12 <= c["gflops"] <=
                                                 b["target_gflops"] + 1e-12) for c in cands), (budget, method)
            best = max(c["held_out_top1"] for c in cands)
            assert m["selected"] == [c["held_out_top1"] for c in cands].index(best), (budget, method)
            assert all(c["gflops"] <= b["target_gflops"] + 1e-12 for c in cands), (budget, method)
            if "val" in m:
                assert m["val"]["setting"] == cands[m["selected"]]["setting"]


def test_selection_never_reads_val(monkeypatch, tmp_path):
    """The selection stage builds its held-out images from train/ only: with val's loader made to raise, it runs
    and picks the better of two candidates on the held-out images (one neutral, one that merges away most tokens)."""
    from PIL import Image
    for split in ("train", "val"):
        for c in range(2):
            os.makedirs(tmp_path / split / f"c{c}")
            for i in range(6):
                Image.new("RGB", (32, 32), (40 * i, 100 * c, 50)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    real = data.build_dataset

    def no_val(root, split, *a, **kw):
        if split == "val":
            raise AssertionError("the selection read val")
        return real(root, split, *a, **kw)
    monkeypatch.setattr(data, "build_dataset", no_val)
    model = family_model("deit")
    held = peers_select.held_out_slice(str(tmp_path), model.cfg, images=8, seed=0)
    assert len(held) == 8 and held.tensors[0].shape == (8, 3, 32, 32)
    cands = [pitome.PiToMe(ratio=1.0), pitome.PiToMe(ratio=0.3)]
    budget = peers.peer_flops(model.cfg, cands[0]) / 1e9
    rows = peers_select.score_candidates(model, cands, held, budget, tolerance=1.0)
    assert [r["setting"] for r in rows] == [c.describe() for c in cands]
    assert all(0 <= r["held_out_top1"] <= 100 for r in rows)
    best = peers_select.select(rows)
    assert rows[best]["held_out_top1"] == max(r["held_out_top1"] for r in rows)
    # the whole stage main runs at a budget, on the held-out images alone: masks, ToMe and PiToMe candidates
    target = 0.8 * flops.count_flops(model.cfg) / 1e9
    masks = [peers_select.Masks(None, "every patch (over the budget, for the test)")]
    out, chosen = {}, {}
    peers_select.select_at_budget(model, target, held, masks, out, chosen, "b", ["patch slimming", "ToMe", "PiToMe"])
    for method in ("ToMe", "PiToMe"):
        assert len(out[method]["candidates"]) >= peers_select.LEAST
        assert chosen[("b", method)].describe() == out[method]["candidates"][out[method]["selected"]]["setting"]
        assert all(c["gflops"] <= target + 1e-12 for c in out[method]["candidates"])
        # the fine-tune stage rebuilds the selected setting from its name in the results file alone
        named = out[method]["candidates"][out[method]["selected"]]["setting"]
        rebuilt = peers_select.rebuild(model.cfg, model, None, [], target, method, named, 0)
        assert vars(rebuilt) == vars(chosen[("b", method)]) and type(rebuilt) is type(chosen[("b", method)])
    with pytest.raises(UserError, match="not among its candidates"):
        peers_select.rebuild(model.cfg, model, None, [], target, "ToMe", "ToMe r = 999", 0)
    with pytest.raises(AssertionError, match="read val"):
        data.build_dataset(str(tmp_path), "val", 32)


def test_finetuned_rows_are_paired_with_patch_slimming_of_the_same_seed(tmp_path):
    """bench/peers_select.py --finetune's comparisons, read from the stored predictions: patch slimming − each peer,
    per seed and over both seeds, on the same images (100 images: patch slimming right on all; ToMe wrong on 10 with
    seed 0 and on 20 with seed 1)."""
    from pipeline.evaluate import save_predictions
    labels = torch.arange(100) % 10
    preds = {"labels": labels}
    for seed, wrong in ((0, 10), (1, 20)):
        preds[peers_select.pred_key("b", "patch slimming", seed)] = labels
        tome = labels.clone()
        tome[:wrong] = (tome[:wrong] + 1) % 10
        preds[peers_select.pred_key("b", "ToMe", seed)] = tome
    path = str(tmp_path / "p.npz")
    save_predictions(path, **preds)
    done = {"seed 0": {"top1": 0}, "seed 1": {"top1": 0}}
    res = {"finetune": {"seeds": [0, 1]}, "budgets": {"b": {"methods": {
        m: {"finetuned": {k: dict(v) for k, v in done.items()}} if m in ("patch slimming", "ToMe") else {}
        for m in peers_select.METHODS}}}}
    peers_select.finetuned_pairs(res, "b", [], path)
    tome = res["budgets"]["b"]["methods"]["ToMe"]
    assert tome["finetuned"]["seed 0"]["ps_minus_this"]["diff"] == 10.0
    assert tome["finetuned"]["seed 1"]["ps_minus_this"]["diff"] == 20.0
    assert tome["finetuned_seeds_together"]["diff"] == 15.0 and tome["finetuned_seeds_together"]["seeds"] == 2
    assert "finetuned_seeds_together" not in res["budgets"]["b"]["methods"]["EViT"]  # not run: no row
