"""
Closed-form FLOP counter for dense and patch-slimmed DeiTs (Tang et al., CVPR 2022, arXiv 2106.02852).

Counts multiply-accumulates (MACs), the unit DeiT and fvcore report as "FLOPs", for the gathered
forward of vit.py (METHOD.md §3 and I2). Norms, softmax, GELU and residual adds are not counted.
Checked against torch.utils.flop_counter.FlopCounterMode on the real forward in test_slim.py.

    python flops.py --model deit_small [--masks results/.../masks.json]
"""
import argparse
import sys

from vit import PRESETS, UserError, check_keep, load_checkpoint, load_masks

NOT_COUNTED = "MACs of matmuls/convs only; norms, softmax, GELU and adds are not counted (as DeiT/fvcore)"


def block_flops(n_in, n_out, d, r):
    """One block taking n_in tokens and keeping n_out (METHOD.md §3): dict of MACs by part."""
    return {
        "kv": 2 * n_in * d * d,       # K, V projections over every alive token
        "q": n_out * d * d,           # queries only for kept tokens
        "qk": n_out * n_in * d,       # Q K^T
        "pv": n_out * n_in * d,       # P V
        "proj": n_out * d * d,        # output projection W_o
        "mlp": int(2 * r * n_out * d * d),
    }


def kept_counts(cfg, keep=None):
    """Tokens alive after each layer: [|S_1|, ..., |S_L|] (dense: N everywhere)."""
    if keep is None:
        return [cfg.num_tokens] * cfg.depth
    return [int(k.numel()) for k in check_keep(keep, cfg)]


def layer_flops(cfg, counts):
    """Per-layer MACs for a list of kept-token counts |S_1|..|S_L| (|S_0| = N)."""
    n_in, out = cfg.num_tokens, []
    for n_out in counts:
        out.append(sum(block_flops(n_in, n_out, cfg.embed_dim, cfg.mlp_ratio).values()))
        n_in = n_out
    return out


def count_flops(cfg, keep=None, counts=None):
    """Total MACs of the model: patch embedding + blocks + head. Give keep (indices) or counts (sizes)."""
    counts = kept_counts(cfg, keep) if counts is None else counts
    embed = (cfg.num_tokens - 1) * 3 * cfg.patch_size ** 2 * cfg.embed_dim
    head = cfg.embed_dim * cfg.num_classes
    return embed + sum(layer_flops(cfg, counts)) + head


def linear_pyramid(cfg, target):
    """Kept-token counts falling linearly with depth, |S_l| = 1 + (N-1) * max(0, 1 - a*l/L), with |S_L| = 1
    (METHOD.md I1); the slope a is bisected so that the total MACs come closest to target."""
    N, L = cfg.num_tokens, cfg.depth

    def counts(a):
        return [max(1, round(1 + (N - 1) * max(0.0, 1 - a * l / L))) for l in range(1, L)] + [1]

    lo, hi = 0.0, float(L)
    for _ in range(60):  # FLOPs fall monotonically as a grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_flops(cfg, counts=counts(mid)) > target else (lo, mid)
    return min((counts(lo), counts(hi)), key=lambda c: abs(count_flops(cfg, counts=c) - target))


def get_args_parser():
    p = argparse.ArgumentParser("Analytic FLOPs of a dense or patch-slimmed DeiT", add_help=True)
    p.add_argument("--model", default="deit_small", choices=list(PRESETS), help="architecture preset")
    p.add_argument("--weights", default=None, help="a checkpoint to read the architecture (and masks) from instead")
    p.add_argument("--masks", default=None, help="masks.json written by slim.py (default: dense)")
    return p


def main(args):
    cfg = load_checkpoint(args.weights).cfg if args.weights else PRESETS[args.model]
    keep = load_masks(args.masks, cfg) if args.masks else (load_checkpoint(args.weights).keep if args.weights else None)
    counts = kept_counts(cfg, keep)
    per_layer = layer_flops(cfg, counts)
    dense = count_flops(cfg)
    print(f"{'layer':>5} {'tokens in':>9} {'kept':>5} {'GFLOPs':>8}")
    n_in = cfg.num_tokens
    for l, (n, f) in enumerate(zip(counts, per_layer), 1):
        print(f"{l:>5} {n_in:>9} {n:>5} {f / 1e9:>8.4f}")
        n_in = n
    total = count_flops(cfg, counts=counts)
    print(f"total {total / 1e9:.2f} GFLOPs (dense {dense / 1e9:.2f} G, {100 * (1 - total / dense):.1f}% fewer)")
    print(NOT_COUNTED)
    return total


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
