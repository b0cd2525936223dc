"""
Closed-form FLOP counter for dense and patch-slimmed DeiTs (Tang et al., CVPR 2022, arXiv 2106.02852).

Counts multiply-accumulates (MACs), the unit DeiT and fvcore report as "FLOPs", for the gathered forward of
vit.py under either token semantics (method.md §2, "P1 FLOPs"). With n_t = |m_t| rows updated by block t:
- "frozen" (the paper's, Sec. 3 "Computation Efficiency"): keys and values from all N rows at every layer;
- "removed" (v1, C1): keys and values only from the n_{t-1} rows alive before block t.
Norms, softmax, GELU and residual adds are not counted. Checked against torch.utils.flop_counter.FlopCounterMode
on the real forward in test_slim.py. The DeiT-S pyramid of the paper's Fig. 5 costs 2.66 G frozen, 2.33 G removed.

    python flops.py --model deit_small [--masks results/.../masks.json] [--tokens frozen|removed]
"""
import argparse
import sys

from vit import PRESETS, UserError, check_keep, check_tokens, load_masks, masks_config, read_checkpoint, resolve_tokens

NOT_COUNTED = "MACs of matmuls/convs only; norms, softmax, GELU and adds are not counted (as DeiT/fvcore)"


def block_flops(n_keys, n_q, d, r):
    """One block whose n_q updated rows attend over n_keys rows (method.md P1 FLOPs): dict of MACs by part."""
    return {
        "kv": 2 * n_keys * d * d,     # K, V projections of every row the queries attend over
        "q": n_q * d * d,             # queries only for the updated rows
        "qk": n_q * n_keys * d,       # Q K^T
        "pv": n_q * n_keys * d,       # P V
        "proj": n_q * d * d,          # output projection W_o
        "mlp": int(2 * r * n_q * d * d),
    }


def kept_counts(cfg, keep=None):
    """Rows updated by each layer: [|m_1|, ..., |m_L|] (dense: N everywhere)."""
    if keep is None:
        return [cfg.num_tokens] * cfg.depth
    return [int(k.numel()) for k in check_keep(keep, cfg)]


def key_counts(cfg, counts, tokens="frozen"):
    """Rows each layer's queries attend over: N everywhere under "frozen" (P1); under "removed" (C1) the rows kept
    by the layer before, |m_{t-1}| (|m_0| = N)."""
    if check_tokens(tokens) == "frozen":
        return [cfg.num_tokens] * len(counts)
    return [cfg.num_tokens] + list(counts[:-1])


def layer_flops(cfg, counts, tokens="frozen"):
    """Per-layer MACs for kept-token counts |m_1|..|m_L| under the token semantics `tokens`."""
    return [sum(block_flops(n_keys, n, cfg.embed_dim, cfg.mlp_ratio).values())
            for n_keys, n in zip(key_counts(cfg, counts, tokens), counts)]


def count_flops(cfg, keep=None, counts=None, tokens="frozen", predictor_width=0):
    """Total MACs of the model: patch embedding + blocks + head. Give keep (indices) or counts (sizes).
    predictor_width > 0: a DPS-ViT with the kept counts `counts` per image, its predictors G included."""
    counts = kept_counts(cfg, keep) if counts is None else counts
    embed = (cfg.num_tokens - cfg.prefix_tokens) * 3 * cfg.patch_size ** 2 * cfg.embed_dim  # one conv step per patch
    head = cfg.prefix_tokens * cfg.embed_dim * cfg.num_classes   # the class head, and head_dist of a distilled DeiT
    g = sum(predictor_flops(cfg, counts, predictor_width)) if predictor_width else 0
    return embed + sum(layer_flops(cfg, counts, tokens)) + head + g


def predictor_flops(cfg, counts, width):
    """Per-layer MACs of DPS-ViT's predictors (slim.Predictor, method.md P6/C8), the same under both semantics. G_t runs
    where layer t has a choice, P < n_t < n_{t-1} (n_0 = N), on the n_{t-1} - P candidate patches: each through the
    linear d -> width and the readout width -> 1, and their pooled mean once through the context's d -> width."""
    P, d, prev, out = cfg.prefix_tokens, cfg.embed_dim, cfg.num_tokens, []
    for n in counts:
        out.append((prev - P) * (d * width + width) + d * width if P < n < prev else 0)
        prev = n
    return out


def scaled_counts(cfg, counts, target, tokens="frozen", predictor_width=0):
    """DPS-ViT's counts at other FLOPs: each layer's kept patches n_t - P scaled by one factor a <= 1 (rounded, so
    they stay non-increasing), a bisected so that the total MACs, predictors included, come closest to target."""
    P = cfg.prefix_tokens

    def at(a):
        return [P + round(a * (n - P)) for n in counts]

    def cost(a):
        return count_flops(cfg, counts=at(a), tokens=tokens, predictor_width=predictor_width)

    lo, hi = 0.0, 1.0
    for _ in range(40):  # FLOPs grow with a (but for the step where a layer starts to choose and its G comes in)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    return min((at(lo), at(hi)), key=lambda c: abs(count_flops(cfg, counts=c, tokens=tokens,
                                                                  predictor_width=predictor_width) - target))


def linear_pyramid(cfg, target, tokens="frozen"):
    """Kept-token counts falling linearly with depth, |m_t| = P + (N-P) * max(0, 1 - a*t/L), with |m_L| = P, the
    prefix tokens (m_L = e_0 for one class token, method.md P1); the slope a is bisected so that the total MACs come
    closest to target."""
    N, L, P = cfg.num_tokens, cfg.depth, cfg.prefix_tokens

    def counts(a):
        return [max(P, round(P + (N - P) * max(0.0, 1 - a * t / L))) for t in range(1, L)] + [P]

    def cost(a):
        return count_flops(cfg, counts=counts(a), tokens=tokens)

    lo, hi = 0.0, float(L)
    for _ in range(60):  # FLOPs fall monotonically as a grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) > target else (lo, mid)
    return min((counts(lo), counts(hi)), key=lambda c: abs(count_flops(cfg, counts=c, tokens=tokens) - target))


def get_args_parser():
    p = argparse.ArgumentParser("Analytic FLOPs of a dense or patch-slimmed DeiT", add_help=True)
    p.add_argument("--model", default=None, choices=list(PRESETS), help="architecture preset (default: the one the "
                   "--masks file records, else deit_small)")
    p.add_argument("--weights", default=None, help="a checkpoint to read the architecture (and masks) from instead")
    p.add_argument("--masks", default=None, help="masks.json written by slim.py (default: dense)")
    p.add_argument("--tokens", default=None, choices=["frozen", "removed"],
                   help="token semantics to count (default: the masks' own; 'frozen', the paper's, without masks)")
    return p


def main(args):
    model, info = read_checkpoint(args.weights) if args.weights else (None, None)
    if model is not None:
        cfg = model.cfg
    elif args.model or not args.masks:
        cfg = PRESETS[args.model or "deit_small"]
    else:  # the geometry the masks file records
        cfg = masks_config(args.masks)
    keep, found, source = None, "frozen", None
    if args.masks:
        (keep, found), source = load_masks(args.masks, cfg), args.masks
    elif model is not None and model.keep is not None:
        keep, found, source = model.keep, model.tokens, args.weights
    dynamic = info.dynamic if info is not None else None  # a DPS-ViT checkpoint: its counts, predictors included
    if dynamic and args.masks:
        raise UserError(f"{args.weights} is a DPS-ViT checkpoint, whose images choose their own masks: drop --masks")
    if dynamic:
        found, source = dynamic["tokens"], args.weights
    tokens, note = resolve_tokens(found, args.tokens, source)
    if note:
        print(note)
    counts = list(dynamic["counts"]) if dynamic else kept_counts(cfg, keep)
    per_layer = layer_flops(cfg, counts, tokens)
    dense = count_flops(cfg)
    print(f"tokens: {tokens} ({'pruned patches stay keys/values, method.md P1' if tokens == 'frozen' else 'pruned patches leave the sequence, method.md C1'})")
    print(f"{'layer':>5} {'keys':>5} {'updated':>7} {'GFLOPs':>8}")
    for t, (n_keys, n, f) in enumerate(zip(key_counts(cfg, counts, tokens), counts, per_layer), 1):
        print(f"{t:>5} {n_keys:>5} {n:>7} {f / 1e9:>8.4f}")
    width = dynamic["width"] if dynamic else 0
    if dynamic:
        print(f"DPS-ViT: each image keeps its own tokens, the counts above; predictors G (width {width}): "
              f"{sum(predictor_flops(cfg, counts, width)) / 1e9:.4f} GFLOPs, in the total")
    total = count_flops(cfg, counts=counts, tokens=tokens, predictor_width=width)
    print(f"total {total / 1e9:.3g} GFLOPs (dense {dense / 1e9:.3g} G, {100 * (1 - total / dense):.1f}% fewer)")
    print(NOT_COUNTED)
    return total


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
