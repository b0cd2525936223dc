"""
Patch slimming (Tang et al., "Patch Slimming for Efficient Vision Transformers", CVPR 2022, arXiv 2106.02852), the
method: significance scores, the top-down mask search of the paper's Algorithm 1 with per-layer fine-tuning, and
DPS-ViT's predictor. `python slim.py ...` starts the command line, which lives in pipeline/cli.py.

    python slim.py --data cifar10 --out results/cifar10-proxy --final-epochs 1 --final-lr 3e-4   # the shipped proxy
    # -> top-1 61.04% (dense 61.36%) at 62.2% fewer FLOPs: results/cifar10-proxy/report.json (12-13 min, 2-core Xeon)
    python slim.py --data imagenet --data-path /path/to/imagenet               # slim the released DeiT-S
    python slim.py --data folder --data-path DIR --weights ckpt.pth --out OUT  # any ImageFolder + DeiT ckpt
    python slim.py --eval-only --data ... [--masks OUT/masks.json]             # top-1 and FLOPs -> OUT/eval.json
    python slim.py --dynamic --from OUT                                        # DPS-ViT -> OUT/dynamic.pth (docs/dynamic.md)
    python slim.py --export onnx --weights OUT/slimmed.pth                     # -> OUT/slimmed.onnx (pipeline/export.py)
    torchrun --nproc_per_node 8 slim.py --data imagenet --data-path DIR        # the same run on 8 GPUs

Under torchrun every stage splits its images over the processes and every process reaches the one-process
decisions (pipeline/distributed.py says how); the final fine-tune is DeiT's recipe (pipeline/finetune.py, C7).

The method is specified in docs/method.md: [P] labels are the paper's, [C] our choices where it is
silent; both are cited beside the code. Layers are numbered as in the paper, t = 1..L; keep[t-1] is m_t (vit.py).
Token semantics (vit.py): "frozen" (P1, default) or "removed" (the v1 variant, C1). Scores (method.md §3): Eq. 6
evaluated exactly ("significance", P3/C3a, default), and the comparison scores "head-mean" (v1), "attn" (Fig. 7's
baseline), "class-attn" (EViT-like) and "random".

Algorithm 1 (Sec. 4.3, method.md §4). m_L = e_0 (the prefix tokens of a distilled DeiT); for t = L-1 down to 1:
score the patches (layers 1..t dense, t+1..L pruned), then for r = 0, r', 2 r', ...: m_t = m_{t+1} ∪ the r best,
fine-tune block t on the error, and stop at the first r whose error after fine-tuning is <= eps. The error (--error):
- "next" (the paper's, P4, default): E_{t+1}, the relative squared error (C4) of layer t+1's kept rows when the two
  pruned blocks t, t+1 run on the unpruned Z_{t-1}; block t is fine-tuned on that same objective (C5).
- "final" (v1): the relative error of the final class feature, cumulative over the layers searched so far.
Two loops choose r (--search, C6):
- "alg1" (default): the loop as written, search_layer_alg1. Its only savings are exact: the dense Z_0 .. Z_L are
  cached once for a fixed sample of training images ("fit": one augmented view each, for fine-tuning and scores;
  "held": the evaluation transform, for E). Layers 1..t-1 stay dense while layer t is searched, so Z_{t-1} and the
  target Z_{t+1} are exact for the whole search, and caching them changes no decision.
- "fast" (an option, not the paper's loop): search_layer_fast, whose docstring says in one place how it differs.
"""
import copy
import time
from collections import namedtuple
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import vit
from pipeline import distributed, finetune
from pipeline.evaluate import autocast
from pipeline.resume import load_if_made_with, write_atomically
from vit import UserError


def device_of(model):
    return next(model.parameters()).device


@dataclass
class SearchSettings:
    """Everything that decides the masks: saved in the search state, and a resume with other values is refused."""
    tokens: str = "frozen"        # what a pruned patch becomes: "frozen" (P1, the paper) or "removed" (C1, v1)
    score: str = "significance"   # patch score, a key of SCORES: Eq. 6 exactly (P3) or a comparison score
    error: str = "next"           # the error Alg. 1 tests: "next", E_{t+1} (P4), or "final", v1's final-feature error
    eps: float = 0.002            # tolerated error. "next": on C4's relative scale, ||diag(m)(Ẑ-Z)||² / ||diag(m)Z||²
    #                               of layer t+1's kept rows; the paper's Eq. 3 writes the error unnormalised and its
    #                               0.01/0.02 (P5) do not transfer to this scale (report.json gives both). 0.002 meets
    #                               the paper's DeiT-S budget on the proxy (README). "final" has its own scale (0.2)
    search: str = "alg1"          # the loop over r (C6): "alg1", Alg. 1 as written, or "fast" (search_layer_fast)
    r_step: int = 0               # r', tokens added per search step; 0 = the paper's 10 of 196 patches, scaled (P5)
    score_images: int = 512       # training images the scores average over (Alg. 1, line 3)
    fit_images: int = 4096        # cached augmented training images the block fine-tunes draw from
    held_images: int = 1024       # held training images (eval transform) E is measured on
    ft_steps: int = 100           # fine-tuning steps per candidate r, block t only (C5)
    ft_lr: float = 1e-3           # AdamW learning rate of those steps (cosine schedule over ft_steps)
    ft_weight_decay: float = 0.05  # AdamW weight decay of those steps
    ft_reach: float = 1.5         # "fast" only: fine-tune a candidate only if its E before fine-tuning <= ft_reach*eps
    ft_tries: int = 2             # "fast" only: at most this many fine-tunes of candidates with E0 > eps per layer
    batch_size: int = 64          # images per step of scoring, caching, error and fine-tuning
    seed: int = 0                 # chooses the fit/held images and seeds the fine-tunes


# ----------------------------------------------------------------------------- scores (Sec. 4.2, method.md §3)
#
# Each score is a pure function score(maps, z_in, block) of one forward over blocks t..L
# (vit.VisionTransformer.attention_maps): maps[0] is layer t, run dense (every row of Z_{t-1} updated), maps[1:] are
# layers t+1..L under their masks; z_in is Z_{t-1}, block t's input (C3b), and block is block t (the v1 score reads
# its weights). A map is a vit.AttentionMap: P (B, H, n_q, n_keys), the per-head attention of its query rows over its
# key rows, and the global indices of those rows (query_rows = m_l; key_rows = all N under "frozen", the rows alive
# under "removed"). Every score returns (B, N): one value per token.


def embed_map(rec, N):
    """A map's attention as N x N matrices per head, rows m_l, columns its key rows, zeros elsewhere: diag(m_l) P^h_l
    in the paper's global indexing. (B, H, N, N)."""
    P = rec.P.float()
    full = P.new_zeros(P.shape[0], P.shape[1], N, N)
    full[:, :, rec.query_rows[:, None], rec.key_rows[None, :]] = P
    return full


def path_sum(maps, N):
    """Σ over every path of heads (one head per layer t+1..L) of ||A[:, i]||², A = Π_{l=t+1..L} diag(m_l) P^h_l,
    evaluated exactly by the recursion of method.md C3a: G ← Σ_h (D_L P^h_L)ᵀ(D_L P^h_L), then for l = L-1 .. t+1
    G ← Σ_h (D_l P^h_l)ᵀ G (D_l P^h_l); the path sum of token i is G[i, i]. Cost H·n_l·N² per layer and image.
    maps: layers t+1..L (per-image masks, DPS-ViT: each map embedded whole by per_image_map). Returns (B, N)."""
    G = None
    for rec in reversed(maps):
        rec = rec if rec.query_rows.dim() == 1 else per_image_map(rec, N)
        P, rows, keys = rec.P.float(), rec.query_rows, rec.key_rows
        inner = P if G is None else G[:, rows][:, :, rows].unsqueeze(1) @ P       # G[m_l, m_l] P^h: (B, H, n_q, n_keys)
        G_keys = torch.einsum("bhqi,bhqj->bij", P, inner)                          # Σ_h P^hᵀ G P^h over key rows
        G = G_keys.new_zeros(P.shape[0], N, N)
        G[:, keys[:, None], keys[None, :]] = G_keys
    return G.diagonal(dim1=1, dim2=2)


def per_image_map(rec, N):
    """A map of per-image masks (query_rows (B, n_q); key_rows (N,) or (B, n_keys)) as embed_map's diag(m_l) P^h_l
    per image, with every row and column: an AttentionMap with P (B, H, N, N) and query and key rows all N."""
    P = rec.P.float()
    B, H, n_q, n_keys = P.shape
    keys = rec.key_rows.to(P.device).expand(B, -1)
    cols = P.new_zeros(B, H, n_q, N).scatter_(3, keys[:, None, None].expand(-1, H, n_q, -1), P)
    full = P.new_zeros(B, H, N, N).scatter_(2, rec.query_rows.to(P.device)[:, None, :, None].expand(-1, H, -1, N), cols)
    every = torch.arange(N, device=P.device)
    return vit.AttentionMap(full, every, every)


def significance_score(maps, z_in, block=None):
    """Eq. 6 (method.md P3): s_{t,i} = Σ_{head paths} ||A[:, i] U^h_t[i, :]||²_F with U^h_t = P^h_t |Z_{t-1}|, the sum over
    one head per layer t..L. As ||a bᵀ||²_F = ||a||² ||b||², it factors (C3a) into path_sum(layers t+1..L) times
    Σ_h ||U^h_t[i, :]||² (layer t's head). (B, N)."""
    U = maps[0].P.float() @ z_in.float().abs().unsqueeze(1)                   # U^h_t = P^h_t |Z_{t-1}|: (B, H, N, d)
    return path_sum(maps[1:], U.shape[2]) * U.pow(2).sum(-1).sum(1)


def head_outputs(block, z_in, P):
    """What each head of block t adds to the residual, (B, H, n, d): LayerScale of (P^h V^h) W_o^h, with V from the
    block's own projection of LN1(Z_{t-1}) (the v1 score's U)."""
    attn = block.attn
    B, n, d = z_in.shape
    v = attn.heads(block.norm1(z_in))[2].float()                              # (B, H, n, dh)
    w_o = attn.proj.weight.float().view(d, attn.num_heads, attn.head_dim).permute(1, 2, 0)  # head h's columns of W_o
    return block.ls1((P.float() @ v) @ w_o)


def head_mean_score(maps, z_in, block):
    """The v1 score (method.md §3, "v1 head-mean"): ||Ā[:, i]||² Σ_h ||U_h[i, :]||² with Ā = Π_{l=t+1..L} diag(m_l) P̄_l,
    P̄ the head-averaged attention, and U_h head h's output after W_o. (B, N)."""
    head_out = head_outputs(block, z_in, maps[0].P)
    N, A = head_out.shape[2], None
    for rec in reversed(maps[1:]):
        M = embed_map(rec, N).mean(1)                                              # diag(m_l) P̄_l: (B, N, N)
        A = M if A is None else A @ M
    return A.pow(2).sum(1) * head_out.float().pow(2).sum(-1).sum(1)


def attn_score(maps, z_in=None, block=None):
    """Fig. 7's "Attn" baseline, read as in method.md §3: the norm of patch i's column of layer t's attention, over
    its queries and heads. (B, N)."""
    return maps[0].P.float().pow(2).sum(dim=(1, 2)).sqrt()


def class_attention_score(maps, z_in=None, block=None):
    """The class token's head-averaged attention at layer t+1 to each token (EViT's criterion, averaged into a static
    mask). (B, N)."""
    return embed_map(maps[1], maps[0].P.shape[-1]).mean(1)[:, 0]


SCORES = {"significance": significance_score, "head-mean": head_mean_score, "attn": attn_score,
          "class-attn": class_attention_score, "random": None}  # random: layer_scores draws it from the seed


def spearman(a, b):
    """Spearman's rho along the last dimension: (..., n) each -> (...), Pearson's correlation of the ranks (ties,
    rare in real-valued scores, broken by position)."""
    ra, rb = (v.argsort(-1).argsort(-1).double() for v in (a, b))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)


# ----------------------------------------------------------------------------- running blocks from the cache

LayerCache = namedtuple("LayerCache", "z_in z_next feat logits positions")  # block t's view: Z_{t-1}, Z_{t+1}, ...


def at_layer(cache, t):
    """The part of a DenseCache that searching layer t reads: its input Z_{t-1} and the target Z_{t+1} of P4."""
    return LayerCache(cache.z[t - 1], cache.z[t + 1], cache.feat, cache.logits, cache.positions)


def cache_rows(cache, idx):
    """A LayerCache restricted to images idx (a slice or an index tensor)."""
    return LayerCache(*(v[idx] for v in cache))


def tail_features(model, x, keep, tokens, start):
    """Final features the heads read (B, prefix tokens, d), float32, from x entering block `start` (1-based) under
    masks keep."""
    cfg = model.cfg
    alive = cfg.num_tokens if start == 1 or tokens == "frozen" else len(keep[start - 2])
    if x.shape[1] != alive:
        raise ValueError(f"tokens entering block {start}: {x.shape[1]}, but keep leaves {alive} rows")
    device = device_of(model)
    with autocast(device):
        return model.features(model.run_blocks(x.to(device), keep, tokens, start)).float()


Error = namedtuple("Error", "relative absolute")  # per image (B,) tensors, or their means over a set (floats)


def next_layer_error(model, batch, keep, tokens, t):
    """P4, per image, differentiable: Error(relative, absolute) with absolute = ||diag(m_{t+1})(Ẑ_{t+1} - Z_{t+1})||²_F,
    Eq. 3's unnormalised squared norm over the kept rows, and relative = absolute / ||diag(m_{t+1}) Z_{t+1}||²_F (C4,
    the scale eps is on). Ẑ_{t+1} = B̂_{t+1}(B̂_t(Z_{t-1})) runs the two pruned blocks t, t+1 on the unpruned network's
    Z_{t-1} (layers < t are still dense) and Z_{t+1} is the unpruned feature. For t = L-1, m_L = the prefix tokens:
    their output of the last block (the class token; with a distillation token both, every token the heads read).
    batch: a LayerCache of a few images."""
    device = device_of(model)
    rows = keep[t].to(device)                                           # m_{t+1}
    with autocast(device):
        z_hat = model.run_blocks(batch.z_in.to(device), keep, tokens, start=t, end=t + 1).float()
    if tokens == "frozen":                                              # all N rows; "removed" returns m_{t+1}'s
        z_hat = z_hat.index_select(1, rows)
    z = batch.z_next.to(device).float().index_select(1, rows)
    absolute = (z_hat - z).pow(2).sum((1, 2))
    return Error(absolute / z.pow(2).sum((1, 2)), absolute)


def final_feature_error(model, batch, keep, tokens, t):
    """The v1 error (method.md §4, "v1 option"), per image: Error(relative, absolute) with absolute = ||f - f_dense||
    of the final features the heads read (the class token, and the distillation token when there is one), blocks
    t..L pruned, and relative = absolute / ||f_dense||; cumulative over the layers searched so far."""
    f, f_dense = tail_features(model, batch.z_in, keep, tokens, t), batch.feat.to(device_of(model))
    absolute = (f - f_dense).flatten(1).norm(dim=-1)
    return Error(absolute / f_dense.flatten(1).norm(dim=-1), absolute)


ERRORS = {"next": next_layer_error, "final": final_feature_error}


@torch.no_grad()
def layer_error(model, cache, keep, tokens, error, t, batch_size):
    """The error Alg. 1 tests at layer t (error "next", P4, or "final", v1), averaged over the images of cache (a
    LayerCache; under torchrun over every rank's share, so that each rank gets the same numbers): Error of floats."""
    total = torch.zeros(3, dtype=torch.float64)  # sums of the relative and absolute per-image errors, images
    for i in range(0, len(cache.z_in), batch_size):
        e = ERRORS[error](model, cache_rows(cache, slice(i, i + batch_size)), keep, tokens, t)
        total += torch.tensor([e.relative.double().sum().item(), e.absolute.double().sum().item(), len(e.relative)],
                              dtype=torch.float64)
    total = distributed.all_reduce_sum(total)
    return Error((total[0] / total[2]).item(), (total[1] / total[2]).item())


@torch.no_grad()
def layer_scores(model, z_in, keep, tokens, t, score, batch_size, seed=0):
    """Scores of every token of layer t (1-based), averaged over the images z_in (Z_{t-1}, inputs of block t; Alg. 1, line 3).
    keep: layers 1..t dense (keep[t-1] = all), t+1..L pruned. score: a key of SCORES. Returns (N,)."""
    N, device = model.cfg.num_tokens, device_of(model)
    if score == "random":
        return torch.rand(N, generator=torch.Generator().manual_seed(seed + t))
    total = torch.zeros(N + 1, dtype=torch.float64)  # score sums, then the image count (all-reduced under torchrun)
    for i in range(0, len(z_in), batch_size):
        z = z_in[i:i + batch_size].to(device)
        with autocast(device):
            _, maps = model.attention_maps(z, keep, tokens, t)
            total[:N] += SCORES[score](maps, z, model.blocks[t - 1]).sum(0).double().cpu()
        total[N] += len(z)
    total = distributed.all_reduce_sum(total)
    return (total[:N] / total[N]).float()


# ----------------------------------------------------------------------------- fine-tuning (method.md C5)


def finetune_block(model, t, fit, keep, settings, seed, desc):
    """Train only block t's parameters (C5): settings.ft_steps AdamW steps at settings.ft_lr (weight decay
    settings.ft_weight_decay) with a cosine schedule, batches of settings.batch_size images (at most the sample's
    size) drawn from fit (a LayerCache: the input is the ORIGINAL Z_{t-1}). The objective is the error the search
    tests: E_{t+1} itself (P4, settings.error == "next"), or v1's distillation of the final feature ("final").
    Under torchrun each rank holds a share of the images, and pipeline/distributed.py's data_parallel_steps takes
    the step of one process."""
    device = device_of(model)
    params = list(model.blocks[t - 1].parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.ft_lr, weight_decay=settings.ft_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.ft_steps)

    def loss_of(mine):  # the summed per-image error of the drawn images mine
        batch = cache_rows(fit, mine)
        if settings.error == "next":
            return next_layer_error(model, batch, keep, settings.tokens, t).relative.sum()
        f = tail_features(model, batch.z_in, keep, settings.tokens, t)
        return finetune.distill_loss(f, model.classify(f), batch.feat.to(device), batch.logits.to(device), True).sum()
    try:
        distributed.data_parallel_steps(loss_of, opt, sched, settings.ft_steps, fit.positions, settings.batch_size,
                                        seed, desc)
    except FloatingPointError:
        raise UserError(f"the fine-tune of block {t} produced a non-finite loss: lower --ft-lr") from None
    for p in params:
        p.requires_grad_(False)
        p.grad = None


# ----------------------------------------------------------------------------- the search (Alg. 1, method.md §4)


def with_layer(keep, t, k):
    """keep with layer t's (1-based) kept indices replaced by k."""
    return keep[:t - 1] + [k] + keep[t:]


def ranked_candidates(scores, forced):
    """The tokens a layer may add (those not in m_{t+1}), best score first. scores: (N,); forced: indices."""
    free = torch.ones(len(scores), dtype=torch.bool)
    free[forced] = False
    cand = free.nonzero().flatten()
    return cand[scores[cand].argsort(descending=True, stable=True)]


def default_r_step(cfg):
    """The paper's r' = 10 of 196 patches (P5), scaled by the patch count (3 of 64 for the 32-px proxy)."""
    return max(1, round(10 * (cfg.num_tokens - cfg.prefix_tokens) / 196))


def candidate_masks(forced, ranked, r_step):
    """Alg. 1, line 6, for r = 0, r', 2 r', ... and finally every candidate: [(r, m_t = m_{t+1} ∪ the r best)].
    forced: m_{t+1}; ranked: the other tokens, best score first."""
    return [(r, torch.cat([forced, ranked[:r]]).sort().values)
            for r in list(range(0, len(ranked), r_step)) + [len(ranked)]]


def trial_record(r, k_t, e0, e=None, kept_weights=None):
    """The report's record of one candidate r: |m_t|, its error E0 before and E after block t's fine-tune (relative,
    on eps's scale, C4, and absolute, Eq. 3's unnormalised norm), and (fast path) whether the fine-tuned weights were
    kept."""
    rec = {"r": r, "kept": int(k_t.numel()), "E0": float(f"{e0.relative:.4g}"), "E0_abs": float(f"{e0.absolute:.4g}")}
    if e is not None:
        rec.update(E=float(f"{e.relative:.4g}"), E_abs=float(f"{e.absolute:.4g}"))
    if kept_weights is not None:
        rec["kept_weights"] = kept_weights
    return rec


def held_error(model, held, keep, t, settings):
    """The error the search tests at layer t (settings.error) of masks keep, on the held images (a LayerCache)."""
    return layer_error(model, held, keep, settings.tokens, settings.error, t, settings.batch_size)


def finetune_seed(settings, t, r):
    """The seed of block t's fine-tune at candidate r (the same in both loops)."""
    return settings.seed + 1000 * t + r


def search_layer_alg1(model, t, keep, candidates, fit, held, settings):
    """Alg. 1, lines 5-10, as written (method.md C6's default): for each candidate (r, m_t) in order, fine-tune block
    t with m_t in place, its weights carried over from the previous r (never reset, C5), and stop at the first r whose
    error after fine-tuning is <= eps; the last candidate keeps every token and ends the loop whatever its error.
    candidates: candidate_masks; fit, held: LayerCaches of block t. Returns (m_t, the trial records, E of m_t)."""
    trials = []
    for r, k_t in candidates:                                     # line 5: repeat (line 9: r = r + r')
        trial_keep = with_layer(keep, t, k_t)                     # line 6: m_t = m_{t+1} ∪ the r best patches
        e0 = held_error(model, held, trial_keep, t, settings)    # recorded only: no decision reads it
        finetune_block(model, t, fit, trial_keep, settings, finetune_seed(settings, t, r),  # line 7: block t only,
                       f"layer {t} r={r} fine-tune")              # from the weights the previous r left
        e = held_error(model, held, trial_keep, t, settings)      # line 8: E_{t+1}
        trials.append(trial_record(r, k_t, e0, e))
        if e.relative <= settings.eps:                                   # line 10: until E_{t+1} <= eps
            break
    return k_t, trials, e


def first_at_most(e0s, measure, n, bound):
    """Bisection for the first index 0..n-1 whose E0 <= bound (n-1 if none), assuming E0 falls as the index grows.
    e0s: {index: E0} already measured, filled in with each index this measures (measure(i) -> Error)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if mid not in e0s:
            e0s[mid] = measure(mid)
        lo, hi = (lo, mid) if e0s[mid].relative <= bound else (mid + 1, hi)
    return lo


def search_layer_fast(model, t, keep, candidates, fit, held, settings):
    """The fast path (--search fast; method.md C6's named option, not Alg. 1). It differs from search_layer_alg1, and
    can choose other masks, in exactly these ways:
    1. It measures E0, the error *before* fine-tuning, and bisects for the first r with E0 <= eps (i_ok) and the
       first with E0 <= ft_reach * eps (i_ft), assuming E0 falls as r grows. Alg. 1 never reads E0.
    2. Candidates before i_ft are rejected without a fine-tune, though a fine-tune might have brought them under eps.
    3. Of i_ft .. i_ok-1, only the first ft_tries are fine-tuned; each is accepted if its E after fine-tuning is
       <= eps, otherwise block t's weights are restored (Alg. 1 carries them over).
    4. i_ok is fine-tuned too, but its new weights are kept only if they lower E (else restored).
    Returns (m_t, the trial records, E of m_t with the weights block t is left with)."""
    def measure(i):
        return held_error(model, held, with_layer(keep, t, candidates[i][1]), t, settings)
    e0s = {}
    i_ok = first_at_most(e0s, measure, len(candidates), settings.eps)
    i_ft = first_at_most(e0s, measure, len(candidates), settings.ft_reach * settings.eps)
    tries = {}  # index: (E after its fine-tune, whether the fine-tuned weights were kept)
    for i in list(range(i_ft, i_ok))[:settings.ft_tries] + [i_ok]:
        r, k_t = candidates[i]
        if i not in e0s:
            e0s[i] = measure(i)
        block = model.blocks[t - 1]
        before = copy.deepcopy(block.state_dict())
        trial_keep = with_layer(keep, t, k_t)
        finetune_block(model, t, fit, trial_keep, settings, finetune_seed(settings, t, r), f"layer {t} r={r} fine-tune")
        e = held_error(model, held, trial_keep, t, settings)
        bound = settings.eps if i < i_ok else e0s[i].relative  # 3. accepted only if E <= eps; 4. only if E drops
        kept = e.relative <= bound
        if not kept:
            block.load_state_dict(before)
        tries[i] = (e, kept)
        if i == i_ok or kept:
            break
    trials = [trial_record(*candidates[j], e0s[j], *tries.get(j, (None, None))) for j in sorted(e0s)]
    e, kept = tries[i]                                          # i: the candidate the loop stopped at
    return candidates[i][1], trials, e if kept else e0s[i]


SEARCH_LOOPS = {"alg1": search_layer_alg1, "fast": search_layer_fast}


def search_layer(model, t, keep, fit, held, settings, log):
    """Choose m_t given m_{t+1..L} (Alg. 1, lines 3-10). fit, held: LayerCaches of block t. Returns (m_t, the layer's
    record for report.json)."""
    N, tokens, batch_size = model.cfg.num_tokens, settings.tokens, settings.batch_size
    full = with_layer(keep, t, torch.arange(N))                 # layers 1..t dense
    scoring = fit.z_in[fit.positions < settings.score_images]  # the first score_images of the sample (this rank's)
    scores = layer_scores(model, scoring, full, tokens, t, settings.score, batch_size, settings.seed)  # line 3: s_t
    forced = keep[t]                                            # line 4: m_t starts as m_{t+1} (so nested)
    ranked = ranked_candidates(scores, forced)
    info = {"layer": t}
    candidates = candidate_masks(forced, ranked, settings.r_step)
    k_t, info["trials"], e = SEARCH_LOOPS[settings.search](model, t, keep, candidates, fit, held, settings)
    info.update(kept=int(k_t.numel()), E=float(f"{e.relative:.4g}"), E_abs=float(f"{e.absolute:.4g}"))
    log(f"layer {t:2d}: keep {k_t.numel():3d}/{N} tokens, E = {e.relative:.4f} (absolute {e.absolute:.4g}; "
        f"eps = {settings.eps}), {len(info['trials'])} candidates measured ({settings.search})")
    return k_t, info


def search(model, fit, held, settings, log, state_path=None, run_id=None):
    """Algorithm 1: m_L = e_0 (P1, Sec. 4.2; every prefix token for a distilled DeiT), then t = L-1 ... 1. fit, held: DenseCaches. Resumes from state_path
    when it exists, provided it was made with the same settings (and run_id: what else identifies the run, such as
    the weights and data); otherwise a one-line error. The state is written after every layer."""
    L, N = model.cfg.depth, model.cfg.num_tokens
    made_with = {**asdict(settings), **(run_id or {})}
    state = {"keep": [torch.arange(N)] * (L - 1) + [vit.prefix_mask(model.cfg)], "layers": [], "next": L - 1,
             "settings": made_with}
    saved = load_if_made_with(state_path, made_with, "a search")
    if saved:
        state = saved
        model.load_state_dict(state["model"])
        log(f"resuming the search at layer {state['next']} from {state_path}" if state["next"] > 0 else
            f"the search in {state_path} is complete: its masks and weights are used")
    for t in range(state["next"], 0, -1):
        t0 = time.time()
        k_t, info = search_layer(model, t, state["keep"], at_layer(fit, t), at_layer(held, t), settings, log)
        info["seconds"] = round(time.time() - t0, 1)
        state["keep"][t - 1] = k_t
        state["layers"].append(info)
        state["next"] = t - 1
        distributed.broadcast_state(model)  # a guard: every rank took the same steps, so this changes nothing
        state["model"] = model.state_dict()
        if state_path and distributed.is_main():
            write_atomically(state_path, state)
    return state


# ----------------------------------------------------------------------------- DPS-ViT (Sec. 4.4, method.md P6, C8)
#
# The dynamic variant: each image chooses its own patches. The model that runs these pieces, the fit and the CLI's
# --dynamic are in pipeline/dynamic.py; the per-image gathered forward is vit.py's.


class Predictor(nn.Module):
    """G_t (P6): the candidate rows of block t's input Z_{t-1} -> their predicted scores ŝ_t. The paper names only "a
    down-sampling layer, linear layer and activation functions", after FBS; [C] here: the down-sampling is FBS's
    average pooling, over the candidate patches, into one context vector of the image; one linear layer maps each
    candidate's normed features plus that context to `width` units (default d/8: 24 for DeiT-Ti, 48 for DeiT-S); GELU;
    a linear readout gives the score. About d·width MACs per candidate, 1% of a block's per-row cost
    (flops.predictor_flops); DynamicViT's PredictorLG (d -> d -> d/2 -> d/4 -> 2) costs some 13 times more."""

    def __init__(self, dim, width):
        super().__init__()
        self.norm, self.fc, self.context = nn.LayerNorm(dim), nn.Linear(dim, width), nn.Linear(dim, width, bias=False)
        self.act, self.readout = nn.GELU(), nn.Linear(width, 1)

    def forward(self, z):
        """z: (B, n, d), the candidates' rows of Z_{t-1} -> ŝ (B, n)."""
        h = self.norm(z)
        return self.readout(self.act(self.fc(h) + self.context(h.mean(1, keepdim=True)))).squeeze(-1)


def predicted_layers(cfg, counts):
    """The layers t that hold a G_t: P < n_t < N (a layer that keeps every token, or only the prefix tokens, never
    chooses). At inference G_t runs only where it has a choice, n_t < n_{t-1}."""
    return [t for t, n in enumerate(counts, 1) if cfg.prefix_tokens < n < cfg.num_tokens]


def dynamic_choice(G, x, prev, n, prefix, tokens):
    """C8's keep rule at layer t: the prefix tokens and the n - prefix patches of m_{t-1} that G (a Predictor) ranks
    highest, so m_t ⊆ m_{t-1} per image by construction. x: block t's input, (B, N, d) under "frozen", (B, n_{t-1}, d)
    (the rows of m_{t-1}) under "removed"; prev: (B, n_{t-1}) m_{t-1}, sorted. Returns the (B, n) positions of m_t
    among m_{t-1}, sorted (m_t = prev.gather(1, positions))."""
    s_hat = G(vit.take_rows(x, prev[:, prefix:]) if tokens == "frozen" else x[:, prefix:])
    top = s_hat.topk(n - prefix, dim=1).indices.sort(1).values
    return torch.cat([torch.arange(prefix, device=x.device).expand(x.shape[0], -1), prefix + top], 1)


def top_k_listmle(s_hat, s, k):
    """[C] G's loss (P6 says only "trained to fit s_l"): top-k ListMLE (Xia et al., NeurIPS 2009), the negative
    log-likelihood of the true order's first k places under the Plackett-Luce model of ŝ. Rank-aware because only the
    order of the patches decides what is kept (Eq. 6's values span orders of magnitude over images and layers, which a
    regression would chase), and only its first k places (k = n_t - P): below the cut the order is never used.
    s_hat, s: (B, n) predicted and exact scores of the candidates. Mean over images and places."""
    ranked = s_hat.gather(1, s.argsort(dim=1, descending=True, stable=True))  # ŝ in the true order
    rest = ranked.flip(1).logcumsumexp(1).flip(1)                              # log Σ_{j >= i} exp ŝ_(j)
    return (rest - ranked)[:, :k].mean()


if __name__ == "__main__":  # python slim.py ...: the command line, pipeline/cli.py (the one import that points up)
    from pipeline.cli import cli; cli()
