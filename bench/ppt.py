"""
PPT (Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers", arXiv 2310.01812), a peer that
patch slimming (arXiv 2106.02852) is compared with. Comparison method, not the method. At a few blocks (the released
DeiT-S setting: 4, 7 and 10 of 12, r = 50 of 197 tokens each), after attention, each image chooses how to remove r
tokens:
- its significance scores (PPT Sec. 3.3, from ATS): s_j = (sum over heads of the class token's attention to j)
  times ||v_j|| (the norm of token j's values, heads concatenated), over the non-prefix tokens, normalised to sum 1;
- their variance (PPT's redundancy criterion) at or above the threshold: the scores are peaked, so the image
  prunes: it keeps the prefix tokens and the n - prefix - r tokens of highest score, in descending score order
  (as the released code orders them);
- below it: the scores are flat, so the image pools: ToMe's bipartite matching on the keys (bench/peers.py) merges
  r tokens by the size-weighted average.
In practice shallow blocks prune and deep ones pool (PPT Fig. 3); the threshold decides it per image. Other blocks
run dense. Sizes are carried (a pruned image keeps its sizes); proportional attention adds log size to the logits
(the released code's default off the shelf). r follows ToMe's schedule over the reducing blocks (inflect 0: constant,
as released). Checked by reading huawei-noah/Efficient-Computing (Pruning/PPT/ppt_deit.py, tome.py); written
afresh. The prefix tokens (class, and distillation) are never scored, pruned or merged, and stay first. Tokens are
removed (method.md C1).

FLOPs (flops.py's convention): attention over n and the MLP over n - r as for every peer (bench/peers.py, peer_flops);
the matching's cosine similarities, ceil(n/2) floor(n/2) dh, are counted at every reducing block: exact for an image
that pools, an upper bound for one that prunes (pruning multiplies nothing more). threshold = inf makes every image
pool, 0 every image prune; both are checked against FlopCounterMode in bench/test_peers.py.
"""
import math
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402
from peers import UserError, attention_branch, mlp_residual, proportional_attention, split_heads  # noqa: E402


@dataclass(frozen=True)
class PPT:
    r: int = 0                  # tokens removed (pruned or pooled) at each reducing block
    layers: tuple = (4, 7, 10)  # the reducing blocks, 1-based (released DeiT-S: pp_loc_list 3 6 9, 0-based)
    threshold: float = 0.0      # variance of the significance scores below which an image pools (0: every image
    #                             prunes; inf: every image pools; released DeiT-S, 196 patches: 7e-5)
    inflect: float = 0.0        # r over the reducing blocks, ToMe's schedule (peers.ToMe.schedule): 0 constant
    prop_attn: bool = True      # proportional attention (the released default off the shelf)

    def describe(self):
        th = "inf" if math.isinf(self.threshold) else f"{self.threshold:.3g}"
        return f"PPT r = {self.r}" + (f", inflect {self.inflect:g}" if self.inflect else "") + \
            f" at layers {', '.join(map(str, self.layers))}, threshold {th}" + \
            ("" if self.prop_attn else ", no proportional attention")

    def check(self, cfg):
        if not isinstance(self.r, int) or self.r < 0:
            raise UserError(f"PPT r must be a whole number >= 0, got {self.r!r}")
        if not -1 <= self.inflect <= 1:
            raise UserError(f"PPT inflect must lie in [-1, 1] (0: constant r), got {self.inflect}")
        if not self.threshold >= 0:
            raise UserError(f"PPT threshold must be >= 0 (a variance), got {self.threshold}")
        peers.check_layers("PPT", self.layers, cfg, "the layers field")

    def schedule(self, depth):
        """r of blocks 1..depth: ToMe's schedule over the reducing blocks, 0 elsewhere."""
        rs = iter(peers.ToMe(r=self.r, inflect=self.inflect).schedule(len(self.layers)))
        return [next(rs) if t in sorted(self.layers) else 0 for t in range(1, depth + 1)]

    def features(self, model, img):
        x, size, P = model.embed(img), None, model.cfg.prefix_tokens
        for blk, r in zip(model.blocks, self.schedule(model.cfg.depth)):
            x, size = ppt_block(blk, x, size, r, P, self.threshold, self.prop_attn)
        return model.features(x)

    # ToMe's plan (r tokens fewer per reducing block, at most half) and ToMe's matching cost where a block reduces
    # (exact when the image pools, an upper bound when it prunes)
    tokens_per_layer = peers.ToMe.tokens_per_layer
    reduction_flops = peers.ToMe.reduction_flops


# ----------------------------------------------------------------------------- pure tensor functions

def significance(attn, v, protected):
    """PPT's significance scores (from ATS). attn: (B, H, n, n) attention probabilities; v: (B, H, n, dh). Returns
    (B, n - protected): for each non-prefix token j, sum_h attn[h, 0, j] * ||v_j|| (v_j: all heads' values of j),
    normalised to sum 1 over the non-prefix tokens."""
    B, H, n, dh = v.shape
    v_norm = v.transpose(1, 2).reshape(B, n, H * dh).norm(dim=-1)  # (B, n)
    s = attn[:, :, 0].sum(dim=1)[:, protected:] * v_norm[:, protected:]
    return s / s.sum(dim=-1, keepdim=True)


def prune_rows(x, size, scores, r, protected):
    """x (B, n, d), size (B, n, 1), scores (B, n - protected) -> the prefix rows, then the n - protected - r rows of
    highest score in descending score order; sizes alike."""
    order = scores.argsort(dim=-1, descending=True, stable=True)[:, :scores.shape[1] - r] + protected
    take = lambda t: torch.cat([t[:, :protected], t.gather(1, order[..., None].expand(-1, -1, t.shape[-1]))], 1)  # noqa: E731
    return take(x), take(size)


def ppt_block(blk, x, size, r, protected, threshold, prop_attn=True):
    """One block under PPT: attention over x (B, n, d) (proportional to size (B, n, 1) when prop_attn; None = all 1),
    then, when r > 0 (capped at (n - protected) // 2, as ToMe caps it), each image prunes r tokens (scores' variance
    >= threshold) or pools them (below), then the MLP on the n - r left. Returns (x, size)."""
    q, k, v = split_heads(blk, x)
    r = min(r, (x.shape[1] - protected) // 2)
    bias_size = size if prop_attn else None
    if r <= 0:
        return mlp_residual(blk, x + attention_branch(blk, proportional_attention(q, k, v, bias_size))), size
    logits = q * blk.attn.scale @ k.transpose(-2, -1)
    if bias_size is not None:
        logits = logits + bias_size.log()[:, None, None, :, 0].to(logits.dtype)
    attn = logits.softmax(dim=-1)                        # (B, H, n, n): the class token's row is read
    x = x + attention_branch(blk, attn @ v)
    scores = significance(attn, v, protected)
    pool = scores.var(dim=-1) < threshold                # (B,): PPT's criterion, per image
    size = torch.ones_like(x[..., :1]) if size is None else size
    out = x.new_empty(x.shape[0], x.shape[1] - r, x.shape[2])
    out_size = size.new_empty(x.shape[0], x.shape[1] - r, 1)
    if pool.any():
        match = peers.bipartite_soft_matching(k[pool].mean(1), r, protected)
        out[pool], out_size[pool] = peers.merge_wavg(x[pool], size[pool], match, protected)
    if (~pool).any():
        out[~pool], out_size[~pool] = prune_rows(x[~pool], size[~pool], scores[~pool], r, protected)
    return mlp_residual(blk, out), out_size


SCHEDULES = [i / 4 for i in range(-4, 5)]  # inflections searched by at_gflops: -1, -0.75, ..., 1


def at_gflops(cfg, gflops, **settings):
    """The r (and, with inflect=None, ToMe-style schedule over SCHEDULES) whose FLOPs are the closest at or below
    gflops (ties: the smallest r, constant schedule first), the other fields from settings (layers, threshold,
    prop_attn)."""
    inflects = sorted(SCHEDULES, key=abs) if settings.get("inflect", 0.0) is None else [settings.get("inflect", 0.0)]
    settings = {k: v for k, v in settings.items() if k != "inflect"}
    return peers.closest_at_or_below(cfg, [PPT(r=r, inflect=i, **settings) for i in inflects
                                           for r in range(cfg.num_tokens)], gflops)
