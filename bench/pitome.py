"""
PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024), a peer that
patch slimming (arXiv 2106.02852) is compared with: ToMe (bench/peers.py) with an energy score that protects
isolated tokens. Comparison method, not the method. In every block, between attention and MLP, on the keys averaged
over heads of the T non-prefix tokens:
- energy (its Eq. 4, as its released code computes it): E_i = mean_j ELU(cos(k_i, k_j) - m_l, alpha), over every
  non-prefix token j (i included). A token in a large cluster of similar tokens has high energy; an isolated one
  low energy. The margin m_l falls with depth, m_l = margin (1 - l / L) for block l = 0..L-1 (the released code:
  margin 0.75);
- r = floor(T (1 - ratio)) tokens merge away (ratio: the fraction kept at each block, as the released code sets it);
- the first ceil(L / 2) blocks (the released code's "pitome_bsm" blocks) split all T tokens, ordered by energy,
  alternately into A and B and run ToMe's bipartite matching: the r A tokens with the most similar B partner join it;
- the later blocks protect the T - 2r lowest-energy tokens: only the 2r highest-energy tokens, alternately A and B
  in energy order, take part, and each of the r A tokens joins its most similar B token;
- a merge is ToMe's size-weighted average (sizes carried between blocks); proportional attention (log size added to
  the attention logits) is an option, off by default: the released DeiT code does not pass the sizes to attention.
Checked by reading hchautran/PiToMe (algo/pitome/merge.py, patch/timm.py, patch/deit.py); written afresh. The prefix
tokens (class, and distillation) never merge and stay first (the released code protects the class token only).
Tokens are removed (method.md C1): keys and values shrink with them.

FLOPs (flops.py's convention, multiply-adds of matmuls): the energy's cosine matrix, T^2 dh, in each merging block,
on top of the attention over n tokens and the MLP over n - r (bench/peers.py, peer_flops); the bipartite blocks read
their A-B similarities out of that matrix. Checked against FlopCounterMode in bench/test_peers.py.
"""
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402
from peers import UserError, attention_branch, mlp_residual, proportional_attention, split_heads  # noqa: E402


@dataclass(frozen=True)
class PiToMe:
    ratio: float = 1.0       # the fraction of the non-prefix tokens kept at each block (1: no merging)
    margin: float = 0.75     # the energy margin of block 0; block l uses margin (1 - l / L) (released code: 0.75)
    alpha: float = 1.0       # ELU's alpha in the energy
    prop_attn: bool = False  # proportional attention (log size on the logits); the released DeiT code has it off

    def describe(self):
        return f"PiToMe keep ratio {self.ratio:.3g}, margin {self.margin:g}" + \
            (", proportional attention" if self.prop_attn else "")

    def check(self, cfg):
        if not 0 < self.ratio <= 1:
            raise UserError(f"PiToMe keep ratio must lie in (0, 1], got {self.ratio}")
        if not -1 <= self.margin < 1:
            raise UserError(f"PiToMe margin must lie in [-1, 1) (a cosine), got {self.margin}")
        if self.alpha <= 0:
            raise UserError(f"PiToMe alpha must be > 0, got {self.alpha}")

    def merged(self, T):
        """r: how many of T non-prefix tokens a block merges away, floor(T (1 - ratio)), at most T // 2."""
        return min(T // 2, math.floor(T * (1 - self.ratio) + 1e-9))  # 1e-9: a ratio k/T written in floats

    def margins(self, depth):
        return [self.margin * (1 - l / depth) for l in range(depth)]

    def bipartite(self, l, depth):
        """Whether block l (0-based) runs the bipartite matching (the first ceil(L / 2)) or protects tokens."""
        return l < math.ceil(depth / 2)

    def features(self, model, img):
        x, size, P, L = model.embed(img), None, model.cfg.prefix_tokens, model.cfg.depth
        for l, (blk, m) in enumerate(zip(model.blocks, self.margins(L))):
            x, size = pitome_block(blk, x, size, self.merged(x.shape[1] - P), P, m, self.alpha,
                                   self.bipartite(l, L), self.prop_attn)
        return model.features(x)

    def tokens_per_layer(self, cfg):
        P, n, plan = cfg.prefix_tokens, cfg.num_tokens, []
        for _ in range(cfg.depth):
            plan.append((n, n - self.merged(n - P)))
            n = plan[-1][1]
        return plan

    def reduction_flops(self, cfg, n, n_out):
        """The energy's cosine matrix over the T = n - prefix tokens, T^2 dh, where a block merges."""
        return (n - cfg.prefix_tokens) ** 2 * (cfg.embed_dim // cfg.num_heads) if n_out < n else 0


# ----------------------------------------------------------------------------- pure tensor functions

def energy(metric, margin, alpha=1.0):
    """metric: (B, T, c), the non-prefix tokens' keys averaged over heads. Returns (energy (B, T), cos (B, T, T)):
    E_i = mean_j ELU(cos_ij - margin, alpha) (PiToMe Eq. 4, as its released code computes it), and the cosines."""
    unit = F.normalize(metric, dim=-1)
    cos = unit @ unit.transpose(-1, -2)
    return F.elu(cos - margin, alpha=alpha).mean(dim=-1), cos


@torch.no_grad()
def pitome_match(metric, r, margin, alpha=1.0, bipartite=False):
    """Which of T non-prefix tokens merge. metric: (B, T, c). Returns (stay (B, T - r), src (B, r), dst (B, r)):
    positions among the T of the tokens the block keeps, of the tokens merged away, and, for each of those, the
    position in `stay` of the token it joins. The tokens are ordered by energy, highest first; A = that order's
    even places, B = its odd places.
    bipartite (the first blocks): A and B span all T tokens; each A token's edge goes to its most similar B token
    and the r strongest edges merge (ToMe's matching). stay = the other A tokens, then B.
    otherwise: only the 2r highest-energy tokens form A and B (r each); every A token joins its most similar B
    token. stay = the T - 2r protected (lowest-energy) tokens, then B."""
    E, cos = energy(metric, margin, alpha)
    order = E.argsort(dim=-1, descending=True, stable=True)
    B_, T = E.shape
    pool = order if bipartite else order[:, :2 * r]
    a, b = pool[:, ::2], pool[:, 1::2]
    sim = cos.gather(1, a[..., None].expand(-1, -1, T)).gather(2, b[:, None, :].expand(-1, a.shape[1], -1))
    best, best_b = sim.max(dim=-1)                         # each A token's most similar B token: (B, |A|)
    if bipartite:
        edges = best.argsort(dim=-1, descending=True, stable=True)
        src_a, kept_a = edges[:, :r], edges[:, r:].sort(dim=-1).values
        stay = torch.cat([a.gather(1, kept_a), b], dim=1)
        return stay, a.gather(1, src_a), kept_a.shape[1] + best_b.gather(1, src_a)
    stay = torch.cat([order[:, 2 * r:], b], dim=1)
    return stay, a, (T - 2 * r) + best_b


def merge_into(x, size, stay, src, dst):
    """Size-weighted merge: x (B, T, d), size (B, T, 1) -> (B, T - r, d), (B, T - r, 1): rows `stay` of x, each
    the size-weighted mean of itself and the src rows whose dst is its position; sizes summed."""
    take = lambda t, idx: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    total = take(x * size, stay).scatter_add(1, dst[..., None].expand(-1, -1, x.shape[-1]), take(x * size, src))
    size_out = take(size, stay).scatter_add(1, dst[..., None], take(size, src))
    return total / size_out, size_out


def pitome_block(blk, x, size, r, protected, margin, alpha=1.0, bipartite=False, prop_attn=False):
    """One block under PiToMe: attention over x (B, n, d) (proportional to size (B, n, 1) when prop_attn; None = all
    1), then, when r > 0, the energy-guided merge of r non-prefix tokens, then the MLP on the n - r left. Returns
    (x, size); the prefix tokens stay first, unmerged."""
    q, k, v = split_heads(blk, x)
    x = x + attention_branch(blk, proportional_attention(q, k, v, size if prop_attn else None))
    if r > 0:
        stay, src, dst = pitome_match(k.mean(1)[:, protected:], r, margin, alpha, bipartite)
        size = torch.ones_like(x[..., :1]) if size is None else size
        merged, merged_size = merge_into(x[:, protected:], size[:, protected:], stay, src, dst)
        x, size = torch.cat([x[:, :protected], merged], 1), torch.cat([size[:, :protected], merged_size], 1)
    return mlp_residual(blk, x), size


def at_gflops(cfg, gflops, **settings):
    """The keep ratio (to 1/1000) whose FLOPs are the closest at or below gflops (ties: the largest ratio), the
    other fields from settings (margin, alpha, prop_attn)."""
    return peers.closest_at_or_below(cfg, [PiToMe(ratio=k / 1000, **settings) for k in range(1000, 299, -1)], gflops)
