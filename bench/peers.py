"""
Two of the peers patch slimming (arXiv 2106.02852) is compared with, written from their papers as method.md §8 reads
them, on vit.py's weights, and what every peer shares. Comparison methods, not the method:
- ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023): in every block, between attention and MLP,
  bipartite soft matching on the keys (mean over heads) merges r tokens into others by a size-weighted average;
  proportional attention adds log(size) to the attention logits. Training-free; r constant per layer by default.
- EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022): at three layers (4, 7, 10 of 12), after
  attention, keep the k = ceil(rate (n - prefix)) patches with the largest head-averaged class-token attention and
  fuse the rest into one token, their attention-weighted mean (method.md §8; EViT's released code sums instead: the
  option fuse="sum").
Checked by reading facebookresearch/ToMe (tome/merge.py, tome/patch/timm.py) and youweiliang/evit (evit.py); the
code here is written afresh. Each runs a vit.VisionTransformer of any DeiT family (plain, distilled with two prefix
tokens, DeiT-III with LayerScale) through functions that call the blocks' submodules (norm1, attn.qkv, attn.proj,
ls1, norm2, mlp, ls2): no class of vit.py is patched. The prefix tokens (class, and distillation) are protected:
never merged or dropped, always first. Both shrink the sequence: keys and values come only from the tokens left
(the "removed" semantics of method.md C1), so they are counted that way.

Also here, for every peer (ToMe and EViT here; PPT in bench/ppt.py, PiToMe in bench/pitome.py, each a frozen
dataclass with check, features, tokens_per_layer, reduction_flops and describe): closed-form FLOPs (multiply-adds,
flops.py's convention; checked against FlopCounterMode in test_slim.py and bench/test_peers.py), the search of the
setting that lands at a GFLOPs budget (the closest at or below it), and PeerModel, the adapter that
pipeline/evaluate.py and pipeline/finetune.py run as they run a vit.VisionTransformer. bench/peers_select.py,
bench/peers_compare.py and bench/peers_speed.py use them (docs/peers.md).
"""
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flops  # noqa: E402
from vit import UserError  # noqa: E402


@dataclass(frozen=True)
class ToMe:
    r: int = 0              # tokens merged away in each block (ToMe's r)
    inflect: float = 0.0    # ToMe's r schedule: 0 constant r (default), -1 its "decreasing" schedule (2r down to 0),
    #                         +1 increasing; any value in [-1, 1] (tome/utils.py parse_r)
    prop_attn: bool = True  # proportional attention: log(size) added to the attention logits

    def schedule(self, depth):
        """r of blocks 1..depth, ToMe's parse_r: linear from r (1 - inflect) to r (1 + inflect), truncated."""
        low = int(self.r * (1.0 - self.inflect))
        step = (2 * self.r - 2 * low) / max(1, depth - 1)
        return [int(low + step * i) for i in range(depth)]

    def describe(self):
        return f"ToMe r = {self.r}" + (f", inflect {self.inflect:g}" if self.inflect else "") + \
            ("" if self.prop_attn else ", no proportional attention")

    def check(self, cfg):
        if not isinstance(self.r, int) or self.r < 0:
            raise UserError(f"ToMe r must be a whole number >= 0, got {self.r!r}")
        if not -1 <= self.inflect <= 1:
            raise UserError(f"ToMe inflect must lie in [-1, 1] (0: constant r), got {self.inflect}")

    def features(self, model, img):
        return tome_features(model, img, self)

    def tokens_per_layer(self, cfg):
        P, n, plan = cfg.prefix_tokens, cfg.num_tokens, []
        for r in self.schedule(cfg.depth):
            plan.append((n, n - max(0, min(r, (n - P) // 2))))
            n = plan[-1][1]
        return plan

    def reduction_flops(self, cfg, n, n_out):
        """The cosine similarities of the matching, ceil(n/2) floor(n/2) dh, where a block merges."""
        return math.ceil(n / 2) * (n // 2) * (cfg.embed_dim // cfg.num_heads) if n_out < n else 0


@dataclass(frozen=True)
class EViT:
    rate: float = 1.0          # keep rate: the fraction of the non-prefix tokens kept at each pruning layer
    layers: tuple = (4, 7, 10)  # the pruning layers, 1-based (EViT's DeiT-S and DeiT-B: 4, 7, 10 of 12)
    fuse: str = "mean"         # the fused token: "mean" (method.md §8) or "sum" (EViT's released code: sum a_i x_i)

    def describe(self):
        return f"EViT keep rate {self.rate:.3g} at layers {', '.join(map(str, self.layers))}" + \
            ("" if self.fuse == "mean" else ", fused by the attention-weighted sum")

    def check(self, cfg):
        if not 0 < self.rate <= 1:
            raise UserError(f"EViT keep rate must lie in (0, 1], got {self.rate}")
        check_layers("EViT", self.layers, cfg, "--evit-layers")
        if self.fuse not in ("mean", "sum"):
            raise UserError(f"EViT fuse must be 'mean' or 'sum', got {self.fuse!r}")

    def features(self, model, img):
        return evit_features(model, img, self)

    def tokens_per_layer(self, cfg):
        P, n, plan = cfg.prefix_tokens, cfg.num_tokens, []
        for t in range(1, cfg.depth + 1):
            keep = evit_keep_count(self.rate, n - P) if t in self.layers else n - P
            plan.append((n, n if keep >= n - P else P + keep + 1))
            n = plan[-1][1]
        return plan

    def reduction_flops(self, cfg, n, n_out):
        """The fused token, (n - n' + 1) d multiply-adds (its n - n' + 1 dropped tokens weighted), where a block prunes."""
        return (n - n_out + 1) * cfg.embed_dim if n_out < n else 0


def add_arguments(parser):
    """The bench scripts' flags of the peers' settings (the searched parameter, r or the keep rate, is not a flag)."""
    g = parser.add_argument_group("peers (bench/peers.py)")
    g.add_argument("--tome-inflect", type=float, default=0.0, help="ToMe's r schedule: 0 constant r (its default), "
                   "-1 its decreasing schedule, +1 increasing")
    g.add_argument("--evit-layers", type=int, nargs="+", default=[4, 7, 10], help="EViT's pruning layers, 1-based "
                   "(its DeiT-S and DeiT-B: 4 7 10)")
    g.add_argument("--evit-fuse", default="mean", choices=["mean", "sum"], help="EViT's fused token: the "
                   "attention-weighted mean (method.md §8) or sum (its released code)")


def settings_from_args(args):
    """{kind: the settings at_gflops passes on} from add_arguments' flags."""
    return {"tome": {"inflect": args.tome_inflect}, "evit": {"layers": tuple(args.evit_layers), "fuse": args.evit_fuse}}


def check_layers(name, layers, cfg, flag):
    """A one-line error unless layers are distinct 1-based layers of cfg's depth."""
    layers = tuple(layers)
    if not layers or any(not 1 <= t <= cfg.depth for t in layers) or len(set(layers)) != len(layers):
        raise UserError(f"{name} layers {layers} must be distinct layers 1..{cfg.depth} of this model: pass "
                        f"layers within the depth ({flag})")


def check_peer(peer, cfg):
    """A one-line error for settings the model cannot run; returns peer. A peer is a frozen dataclass with
    check(cfg), features(model, img), tokens_per_layer(cfg), reduction_flops(cfg, n, n_out) and describe():
    ToMe and EViT here, ppt.PPT (bench/ppt.py) and pitome.PiToMe (bench/pitome.py)."""
    if not all(hasattr(peer, f) for f in ("check", "features", "tokens_per_layer", "reduction_flops", "describe")):
        raise UserError(f"unknown peer {peer!r}: pass a peers.ToMe, peers.EViT, ppt.PPT or pitome.PiToMe")
    peer.check(cfg)
    return peer


# ----------------------------------------------------------------------------- pure tensor functions

def proportional_attention(q, k, v, size=None):
    """ToMe's proportional attention, softmax(q k^T / sqrt(dh) + log s) v: a token of size s (the number of patches
    merged into it) counts as s copies of itself among the keys. q, k, v: (B, H, n, dh); size: (B, n, 1) or None
    (every size 1: plain attention). Returns (B, H, n, dh)."""
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)  # (B, 1, 1, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@torch.no_grad()
def bipartite_soft_matching(metric, r, protected):
    """ToMe's matching (ToMe Sec. 3). metric: (B, n, c), each token's key averaged over heads. The tokens alternate
    into set A (positions 0, 2, ...) and set B (1, 3, ...); each A token's edge goes to its most cosine-similar B
    token, and the r strongest edges are merged. protected (1 or 2) prefix tokens never merge: the class token
    (position 0, in A) has no edge, the distillation token (position 1, in B) receives none. r is capped at
    (n - protected) // 2. Returns None when nothing merges, else (unmerged (B, n_A - r), src (B, r), dst (B, r)):
    positions in A of the tokens that stay (ascending, so the class token stays first), in A of the tokens merged
    away, and in B of the token each of those joins."""
    n = metric.shape[1]
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return None
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, n_A, n_B) cosines
    similarity[:, 0, :] = -math.inf                                  # the class token has no edge
    if protected == 2:
        similarity[:, :, 0] = -math.inf                              # nothing joins the distillation token
    best, best_b = similarity.max(dim=-1)                            # each A token's edge: (B, n_A)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    return order[:, r:].sort(dim=-1).values, src, best_b.gather(1, src)


def merge_sum(x, match, protected):
    """x: (B, n, c) -> (B, n - r, c): each merged A token is added into its B token (match from
    bipartite_soft_matching). Order: the prefix tokens first, then the other tokens of A, then those of B."""
    unmerged, src, dst = match
    a, b = x[:, ::2], x[:, 1::2]
    c = x.shape[-1]
    kept_a = a.gather(1, unmerged[..., None].expand(-1, -1, c))
    b = b.scatter_reduce(1, dst[..., None].expand(-1, -1, c), a.gather(1, src[..., None].expand(-1, -1, c)),
                         reduce="sum")
    if protected == 2:  # the distillation token is B's first: put it back second
        return torch.cat([kept_a[:, :1], b[:, :1], kept_a[:, 1:], b[:, 1:]], dim=1)
    return torch.cat([kept_a, b], dim=1)


def merge_wavg(x, size, match, protected):
    """ToMe's size-weighted average: x (B, n, d), size (B, n, 1) or None (all 1) -> x (B, n - r, d),
    size (B, n - r, 1). A token that receives merges becomes the size-weighted mean of itself and the tokens merged
    into it, and its size their sum, so sum(size * x) and sum(size) are conserved."""
    size = torch.ones_like(x[..., :1]) if size is None else size
    total = merge_sum(x * size, match, protected)
    size = merge_sum(size, match, protected)
    return total / size, size


def evit_keep_count(rate, m):
    """EViT's kept count of m non-prefix tokens at keep rate `rate`: ceil(rate m) (at least 1)."""
    return max(1, math.ceil(rate * m - 1e-9))  # 1e-9: a rate k/m written in floating point keeps exactly k


def evit_select(class_attention, k):
    """class_attention: (B, m), the head-averaged attention of the class token to the m non-prefix tokens; k: how
    many to keep (1 <= k <= m). Returns (kept (B, k), dropped (B, m - k)): positions among the m, each ascending;
    the kept are the k with the largest attention (EViT's attentive tokens)."""
    order = class_attention.argsort(dim=-1, descending=True)
    return order[:, :k].sort(dim=-1).values, order[:, k:].sort(dim=-1).values


def fuse_tokens(x, weights, fuse="mean"):
    """EViT's fused token (its inattentive-token fusion). x: (B, m, d) the dropped tokens; weights: (B, m) their
    class-token attention. Returns (B, 1, d): sum_i w_i x_i / sum_i w_i ("mean", method.md §8) or sum_i w_i x_i
    ("sum", the released code)."""
    fused = weights.unsqueeze(1).to(x.dtype) @ x
    return fused / weights.sum(-1)[:, None, None].to(x.dtype) if fuse == "mean" else fused


# ----------------------------------------------------------------------------- the peers' forwards

def split_heads(blk, x):
    """(q, k, v), each (B, H, n, dh), of block blk for its input rows x (B, n, d)."""
    attn = blk.attn
    B, n, _ = x.shape
    return attn.qkv(blk.norm1(x)).view(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)


def attention_branch(blk, o):
    """The attention branch's output for the residual: W_o and LayerScale on the heads' outputs o (B, H, n, dh)."""
    B, H, n, dh = o.shape
    return blk.ls1(blk.attn.proj(o.transpose(1, 2).reshape(B, n, H * dh)))


def mlp_residual(blk, x):
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def tome_block(blk, x, size, r, protected, prop_attn=True):
    """One block under ToMe: attention over x (B, n, d) (proportional to size (B, n, 1), None = all 1), then the
    matching on the keys and the merge of r tokens, then the MLP on the merged tokens. Returns (x, size)."""
    q, k, v = split_heads(blk, x)
    x = x + attention_branch(blk, proportional_attention(q, k, v, size if prop_attn else None))
    match = bipartite_soft_matching(k.mean(1), r, protected)  # the keys, averaged over heads: (B, n, dh)
    if match is not None:
        x, size = merge_wavg(x, size, match, protected)
    return mlp_residual(blk, x), size


def evit_block(blk, x, keep, protected, fuse="mean"):
    """One block under EViT: attention over x (B, n, d), then, when keep < n - protected, only the prefix tokens,
    the `keep` patches the class token attends to most (head-averaged) and one token fusing the rest, then the MLP.
    Returns (B, n', d), n' = n or protected + keep + 1."""
    q, k, v = split_heads(blk, x)
    m = x.shape[1] - protected
    if keep >= m:
        return mlp_residual(blk, x + attention_branch(blk, F.scaled_dot_product_attention(q, k, v)))
    attn = (q * blk.attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, n, n): the class token's row is read
    x = x + attention_branch(blk, attn @ v)
    class_attention = attn[:, :, 0, protected:].mean(dim=1)           # (B, m)
    kept, dropped = evit_select(class_attention, keep)
    patches = x[:, protected:]
    rows = lambda idx: patches.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    fused = fuse_tokens(rows(dropped), class_attention.gather(1, dropped), fuse)
    return mlp_residual(blk, torch.cat([x[:, :protected], rows(kept), fused], dim=1))


def tome_features(model, img, peer):
    """The final prefix-token features (B, prefix_tokens, d) of model under ToMe settings peer."""
    x, size, P = model.embed(img), None, model.cfg.prefix_tokens
    for blk, r in zip(model.blocks, peer.schedule(model.cfg.depth)):
        x, size = tome_block(blk, x, size, r, P, peer.prop_attn)
    return model.features(x)


def evit_features(model, img, peer):
    """The final prefix-token features (B, prefix_tokens, d) of model under EViT settings peer."""
    x, P = model.embed(img), model.cfg.prefix_tokens
    for t, blk in enumerate(model.blocks, 1):
        m = x.shape[1] - P
        x = evit_block(blk, x, evit_keep_count(peer.rate, m) if t in peer.layers else m, P, peer.fuse)
    return model.features(x)


class PeerModel(nn.Module):
    """A vit.VisionTransformer run under a peer (ToMe, EViT, PPT or PiToMe settings), shaped as pipeline/evaluate.py and
    pipeline/finetune.py use a model: model(img, keep=None, tokens=...) -> logits, forward_features, classify, cfg,
    parameters (those of the wrapped model, which a fine-tune trains). It takes no masks: the peer chooses its tokens
    per image; `tokens` is accepted and ignored (the peers always remove)."""

    def __init__(self, model, peer):
        super().__init__()
        self.model, self.peer, self.cfg = model, check_peer(peer, model.cfg), model.cfg

    def forward_features(self, img, keep=None, tokens=None):
        if keep is not None:
            raise UserError(f"{self.peer.describe()} chooses its own tokens and takes no masks: pass keep=None")
        return self.peer.features(self.model, img)

    def classify(self, f):
        return self.model.classify(f)

    def forward(self, img, keep=None, tokens=None):
        return self.classify(self.forward_features(img, keep, tokens))


# ----------------------------------------------------------------------------- closed-form FLOPs

def tokens_per_layer(cfg, peer):
    """[(n_t, n'_t)] for blocks t = 1..L: the tokens block t's attention runs on (its keys and queries) and the
    tokens its MLP runs on (and passes on)."""
    return check_peer(peer, cfg).tokens_per_layer(cfg)


def ends_flops(cfg):
    """The patch embedding and the heads, as flops.count_flops counts them (the same for every token count)."""
    dense = [cfg.num_tokens] * cfg.depth
    return flops.count_flops(cfg, counts=dense) - sum(flops.layer_flops(cfg, dense))


def peer_flops(cfg, peer):
    """Total multiply-adds of model cfg under peer, as the forward executes them (flops.py's convention: matmuls
    and convs; norms, softmax, GELU, adds, gathers and scatters not counted). Per block with n tokens in and n' out
    of the reduction: attention over n (flops.block_flops with n keys and n queries, less its MLP), the MLP on n',
    plus what the reduction itself multiplies (peer.reduction_flops): ToMe's cosine similarities,
    ceil(n/2) floor(n/2) dh, where it merges; EViT's fused token, (n - n' + 1) d, where it prunes; PPT's and
    PiToMe's in their modules."""
    d, total = cfg.embed_dim, ends_flops(cfg)
    for n, n_out in tokens_per_layer(cfg, peer):
        attention = flops.block_flops(n, n, d, cfg.mlp_ratio)
        total += sum(attention.values()) - attention["mlp"] + flops.block_flops(n_out, n_out, d, cfg.mlp_ratio)["mlp"]
        total += peer.reduction_flops(cfg, n, n_out)
    return total


SCHEDULES = [i / 10 for i in sorted(range(-10, 11), key=abs)]  # ToMe inflections searched with inflect=None: 0 first


def closest_at_or_below(cfg, candidates, gflops):
    """The candidate whose FLOPs are the closest at or below gflops (ties: the first listed). A one-line error when
    even the cheapest costs more."""
    costs = [peer_flops(cfg, check_peer(c, cfg)) for c in candidates]
    feasible = [(cost, -i) for i, cost in enumerate(costs) if cost <= gflops * 1e9]
    if not feasible:
        cheapest = min(range(len(costs)), key=costs.__getitem__)
        raise UserError(f"{candidates[cheapest].describe()}, the cheapest setting, costs {costs[cheapest] / 1e9:.4g} "
                        f"GFLOPs, more than the {gflops:.4g} asked: ask for a larger budget")
    return candidates[-max(feasible)[1]]


def at_gflops(cfg, kind, gflops, **settings):
    """The setting of a peer (kind "tome": r; "evit": the keep rate) whose FLOPs are the closest at or below gflops
    (ties: the smallest r, the largest rate). settings: the peer's other fields (ToMe inflect / prop_attn, EViT
    layers / fuse); ToMe's inflect=None searches the schedule too, over SCHEDULES (integer r cannot land near every
    budget with a constant schedule). A one-line error when even its cheapest setting costs more. PPT and PiToMe:
    ppt.at_gflops, pitome.at_gflops."""
    N = cfg.num_tokens
    if kind == "tome":
        inflects = SCHEDULES if settings.get("inflect", 0.0) is None else [settings.get("inflect", 0.0)]
        settings = {k: v for k, v in settings.items() if k != "inflect"}
        candidates = [ToMe(r=r, inflect=inflect, **settings) for inflect in inflects for r in range(N)]
    elif kind == "evit":  # EViT's counts change only at rates k/m: one candidate per distinct count pattern
        rates = sorted({k / m for m in range(1, N + 1) for k in range(1, m + 1)}, reverse=True)
        candidates = [EViT(rate=rate, **settings) for rate in rates]
    else:
        raise UserError(f"unknown peer {kind!r}: choose tome or evit")
    return closest_at_or_below(cfg, candidates, gflops)
