"""
A from-scratch DeiT (Touvron et al. 2021) with the patch-slimmed forward of
"Patch Slimming for Efficient Vision Transformers" (Tang et al., CVPR 2022, arXiv 2106.02852).

Descends from the DeiT/timm VisionTransformer (same parameter names, so a release checkpoint loads
with strict=True and no key map) and from nanoGPT's model.py (one config dataclass, a from_pretrained
that builds the model and checks every shape). The one addition is `keep`: per layer t, the sorted
indices of the tokens block t updates, m_t (method.md §2), and `tokens`, what becomes of the others:
- "frozen" (the paper's, method.md P1, default): the sequence keeps all N rows; a pruned patch keeps its
  last feature and stays a key/value of every later layer; queries, attention rows, W_o, the residual and
  the MLP run only on the gathered rows of m_t, which are written back (Eq. 2, Sec. 3).
- "removed" (the v1 variant, C1): pruned rows leave the sequence; keys/values come only from the rows alive.
Both gather the kept rows, so the FLOPs really fall (flops.py counts both); `keep=None` is the plain dense DeiT.
The DeiT family differs only in ViTConfig fields read from a checkpoint's keys: distilled DeiT (a distillation
token beside the class token, a second head; at evaluation the two heads' logits are averaged) and DeiT-III
(LayerScale, a position embedding over the patches only). Every prefix token plays the class token's part in
the method (kept at every layer; m_L is exactly the prefix tokens). The input normalisation is part of the config.
"""
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# Official DeiT release checkpoints (facebookresearch/deit README), ImageNet-1k, 224 px.
RELEASE_URLS = {
    "deit_tiny": "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
    "deit_small": "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
    "deit_base": "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
    "deit_tiny_distilled": "https://dl.fbaipublicfiles.com/deit/deit_tiny_distilled_patch16_224-b40b3cf7.pth",
    "deit_small_distilled": "https://dl.fbaipublicfiles.com/deit/deit_small_distilled_patch16_224-649709d9.pth",
    "deit_base_distilled": "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth",
    "deit3_small": "https://dl.fbaipublicfiles.com/deit/deit_3_small_224_1k.pth",   # DeiT-III (arXiv 2204.07118)
    "deit3_base": "https://dl.fbaipublicfiles.com/deit/deit_3_base_224_1k.pth",
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The CIFAR-10 proxy that ships with the project (models/README.md): DeiT-Tiny width and depth, patch 4, 32 px.
PROXY_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "deit_tiny_p4_cifar10.pth")


class UserError(Exception):
    """Bad input from the user: the CLIs print it as one line, never as a traceback."""


@dataclass
class ViTConfig:
    img_size: int = 224     # input resolution (square)
    patch_size: int = 16    # patch side; tokens N = 1 + (img_size / patch_size)^2
    num_classes: int = 1000
    embed_dim: int = 384    # width d
    depth: int = 12         # number of blocks L
    num_heads: int = 6      # heads; head dim = embed_dim / num_heads (64 in all DeiTs)
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * d
    qkv_bias: bool = True
    prefix_tokens: int = 1          # tokens before the patches: the class token, or class + distillation token (2)
    pos_embed_prefix: bool = True   # the position embedding covers the prefix tokens (DeiT) or only the patches
    #                                 (DeiT-III's timm layout: added to the patches, then the class token prepended)
    layer_scale: bool = False       # LayerScale after attention and MLP (DeiT-III: blocks.i.ls1.gamma, ls2.gamma)
    mean: tuple = IMAGENET_MEAN     # the input normalisation the weights were trained with (data.py reads it)
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if self.prefix_tokens not in (1, 2):
            raise UserError(f"prefix_tokens must be 1 (class token) or 2 (class + distillation), got {self.prefix_tokens}")

    @property
    def num_tokens(self):
        return self.prefix_tokens + (self.img_size // self.patch_size) ** 2


PRESETS = {  # method.md §1 reference sizes, and the DeiT family users hold (224 px, ImageNet mean/std)
    "deit_tiny": ViTConfig(embed_dim=192, num_heads=3),
    "deit_small": ViTConfig(embed_dim=384, num_heads=6),
    "deit_base": ViTConfig(embed_dim=768, num_heads=12),
    "deit_tiny_distilled": ViTConfig(embed_dim=192, num_heads=3, prefix_tokens=2),
    "deit_small_distilled": ViTConfig(embed_dim=384, num_heads=6, prefix_tokens=2),
    "deit_base_distilled": ViTConfig(embed_dim=768, num_heads=12, prefix_tokens=2),
    "deit3_small": ViTConfig(embed_dim=384, num_heads=6, pos_embed_prefix=False, layer_scale=True),
    "deit3_base": ViTConfig(embed_dim=768, num_heads=12, pos_embed_prefix=False, layer_scale=True),
}


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) that can compute only output rows [r0, r1) of its weight:
    the fused qkv projection gives q for the updated rows only and k, v for every row (method.md P1)."""

    def forward(self, x, rows=None):
        if rows is None:
            return super().forward(x)
        r0, r1 = rows
        return F.linear(x, self.weight[r0:r1], None if self.bias is None else self.bias[r0:r1])


@dataclass
class AttentionMap:
    """One block's attention, as attention_maps returns it for the scores of slim.py."""
    P: torch.Tensor           # (B, H, n_q, n_keys): per-head attention P^h of the query rows over the key rows
    query_rows: torch.Tensor  # (n_q,) or per image (B, n_q): global token indices of the rows the block updates (m_l)
    key_rows: torch.Tensor    # (n_keys,) or (B, n_keys): global token indices of the rows that give keys and values


def take_rows(x, idx):
    """Rows idx of x (B, n, d): idx (n_q,), the same rows for every image (the static masks), or (B, n_q), each image
    its own (DPS-ViT's per-image masks, method.md P6/C8). (B, n_q, d)."""
    if idx.dim() == 1:
        return x.index_select(1, idx)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def put_rows(x, idx, y):
    """x (B, n, d) with its rows idx (as take_rows) replaced by y (B, n_q, d): P1's write-back of the updated rows."""
    if idx.dim() == 1:
        return x.index_copy(1, idx, y)
    return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), y)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)  # timm layout: rows [q; k; v]
        self.proj = nn.Linear(dim, dim)

    def heads(self, h, idx=None):
        """q (B, H, n_q, dh) of the rows idx of h, and k, v (B, H, n_keys, dh) of every row. h: (B, n_keys, d) normed
        rows; idx: (n_q,) positions in h of the rows that get queries (None = all; or (B, n_q), each image its own,
        take_rows). The q and kv projections are split so no FLOP is spent on a query nobody reads (method.md P1:
        "only the effective patches ... calculate queries")."""
        B, n_keys, d = h.shape
        H, dh = self.num_heads, self.head_dim
        if idx is None:
            return self.qkv(h).view(B, n_keys, 3, H, dh).permute(2, 0, 3, 1, 4)
        q = self.qkv(take_rows(h, idx), rows=(0, d)).view(B, -1, H, dh).transpose(1, 2)
        k, v = self.qkv(h, rows=(d, 3 * d)).view(B, n_keys, 2, H, dh).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, o):
        """The heads' outputs o (B, H, n_q, dh) through W_o: (B, n_q, d)."""
        return self.proj(o.transpose(1, 2).flatten(2))

    def forward(self, h, idx=None):
        """The MSA output of the rows idx of h, (B, n_q, d) (see heads), by fused attention."""
        return self.merge(F.scaled_dot_product_attention(*self.heads(h, idx)))

    def forward_with_map(self, h, idx=None):
        """forward's output and the per-head attention P^h (B, H, n_q, n_keys), by an explicit softmax."""
        q, k, v = self.heads(h, idx)
        P = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.merge(P @ v), P


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """DeiT-III's per-channel scale of a residual branch (timm's name: gamma)."""

    def __init__(self, dim, init=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(d) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = LayerScale(d) if cfg.layer_scale else nn.Identity()

    def forward(self, x, idx=None, tokens="frozen"):
        """One pre-norm block, Y = X + MSA(LN1(X)), Z = Y + MLP(LN2(Y)), updating only the rows idx (the paper's
        diag(m_l) on the MSA and MLP outputs, Eq. 2). x: (B, n_in, d); idx: positions in x of the updated rows
        (None = all, the dense block; (n_q,), or (B, n_q) per image). Keys and values come from all n_in rows.
        tokens (method.md P1 / C1): "frozen" returns all n_in rows, the others unchanged; "removed" returns only the
        idx rows."""
        return self.residual(x, idx, tokens, self.ls1(self.attn(self.norm1(x), idx)))

    def forward_with_map(self, x, idx=None, tokens="frozen"):
        """(forward's output, the attention P^h of the updated rows (B, H, n_q, n_keys)) for the scores of slim.py."""
        a, P = self.attn.forward_with_map(self.norm1(x), idx)
        return self.residual(x, idx, tokens, self.ls1(a)), P

    def residual(self, x, idx, tokens, a):
        """The rest of the block once the MSA output a of the rows idx is known: Y = X + a on those rows, then the MLP."""
        if idx is None:
            y = x + a
            return y + self.ls2(self.mlp(self.norm2(y)))
        y = take_rows(x, idx) + a
        y = y + self.ls2(self.mlp(self.norm2(y)))
        return y if tokens == "removed" else put_rows(x, idx, y)  # P1: every other row passes on unchanged


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N-1, d)


class VisionTransformer(nn.Module):
    def __init__(self, cfg=None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg or ViTConfig(**kwargs)
        if cfg.img_size % cfg.patch_size or cfg.embed_dim % cfg.num_heads:
            raise UserError(f"bad config {cfg}: img_size must be a multiple of patch_size and embed_dim of num_heads")
        # the masks (and their token semantics) a slimmed checkpoint was saved with (read_checkpoint): forward runs
        # them when called without keep
        self.keep, self.tokens = None, None
        self.patch_embed = PatchEmbed(cfg)
        d, P = cfg.embed_dim, cfg.prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if P == 2 else None  # distilled DeiT
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens - (0 if cfg.pos_embed_prefix else P), d))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.num_classes)
        self.head_dist = nn.Linear(d, cfg.num_classes) if P == 2 else None  # reads the distillation token
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, img):
        """img: (B, 3, H, W) -> tokens (B, N, d): the prefix tokens (class token 0, distillation token 1 when the model
        has one), then the patches."""
        x = self.patch_embed(img)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if self.cfg.pos_embed_prefix:
            return torch.cat(prefix + [x], dim=1) + self.pos_embed
        return torch.cat(prefix + [x + self.pos_embed], dim=1)  # DeiT-III: the patches' positions only

    def run_blocks(self, x, keep=None, tokens="frozen", start=1, end=None):
        """Blocks start..end (1-based, inclusive; end = L by default) on tokens x, the input of block `start`:
        all N rows under "frozen", the rows alive after layer start-1 under "removed". keep: all L layers' masks
        (None = dense); an entry (B, n_t) gives each image its own m_t (DPS-ViT, method.md P6/C8: the counts n_t
        fixed per layer, the masks nested per image)."""
        keep, gather = self.gather_plan(x, keep, tokens)
        for t in range(start, (self.cfg.depth if end is None else end) + 1):
            x = self.blocks[t - 1](x, None if gather is None else gather[t - 1], tokens)
        return x

    def attention_maps(self, x, keep=None, tokens="frozen", start=1, end=None):
        """run_blocks, also returning each block's AttentionMap (the attention the scores of Eq. 6 read): (x, maps),
        maps[0] that of block `start`."""
        N = self.cfg.num_tokens
        keep, gather = self.gather_plan(x, keep, tokens)
        maps = []
        for t in range(start, (self.cfg.depth if end is None else end) + 1):
            x, P = self.blocks[t - 1].forward_with_map(x, None if gather is None else gather[t - 1], tokens)
            query_rows = torch.arange(N) if keep is None else keep[t - 1]
            key_rows = torch.arange(N) if keep is None or tokens == "frozen" or t == 1 else keep[t - 2]
            maps.append(AttentionMap(P, query_rows, key_rows))
        return x, maps

    def gather_plan(self, x, keep, tokens):
        """(kept indices, gather indices) of masks_plan for a batch x, on x's device; (None, None) for keep=None."""
        keep, gather = (None, None) if keep is None else masks_plan(keep, self.cfg, tokens)
        if keep is not None and keep[0].dim() == 2:  # per-image masks: one row of indices per image of x
            if keep[0].shape[0] != x.shape[0]:
                raise UserError(f"per-image masks for {keep[0].shape[0]} images but the batch has {x.shape[0]}: give "
                                "each layer's kept indices as (batch, n_t)")
            gather = [None if g is None else g.to(x.device) for g in gather]
        elif gather is not None and x.device.type != "cpu":  # CUDA's index_select/index_copy need the index on x's device
            gather = [None if g is None else g.to(x.device) for g in gather]
        return keep, gather

    def features(self, x):
        """The final features the heads read: the prefix tokens of the last block's output x, after the norm,
        (B, prefix_tokens, d)."""
        return self.norm(x[:, :self.cfg.prefix_tokens])

    def classify(self, f):
        """Logits from features(...): the class token's head, averaged with the distillation token's head for a
        distilled DeiT (as DeiT evaluates it)."""
        logits = self.head(f[:, 0])
        return logits if self.head_dist is None else (logits + self.head_dist(f[:, 1])) / 2

    def forward_features(self, img, keep=None, tokens=None):
        """The final prefix-token features after the last norm, (B, prefix_tokens, d); keep, tokens as in forward."""
        if keep is None and self.keep is not None:  # a slimmed checkpoint runs its own masks
            keep, tokens = self.keep, tokens or self.tokens
        return self.features(self.run_blocks(self.embed(img), keep, tokens or "frozen"))

    def forward(self, img, keep=None, tokens=None):
        """img: (B, 3, H, W) -> logits (B, classes). keep: per layer the token indices it updates (None: every token,
        or, for a model loaded from a slimmed checkpoint, the masks it was saved with); tokens: what happens to the
        others, "frozen" (the paper, method.md P1; the default) or "removed" (v1, C1)."""
        return self.classify(self.forward_features(img, keep, tokens))


# ----------------------------------------------------------------------------- masks (method.md §2)
#
# Layer numbers are the paper's: blocks t = 1..L, and keep[t-1] holds m_t, the sorted global indices (0..N-1, token
# 0 = class token, 1 = distillation token when there is one) of the rows block t updates. Masks are nested
# (m_{t+1} ⊆ m_t) and hold every prefix token (P1, generalised: the heads read all of them).

TOKENS = ("frozen", "removed")  # what a pruned patch becomes: method.md P1 (the paper's, default) or C1 (v1)


def check_tokens(tokens):
    if tokens not in TOKENS:
        raise UserError(f"unknown token semantics {tokens!r}: choose 'frozen' (the paper's, method.md P1) or "
                        "'removed' (the v1 variant, C1)")
    return tokens


def check_keep(keep, cfg):
    """Validate per-layer kept indices; returns them as a list of sorted 1-D LongTensors."""
    return _checked(keep, cfg)[0]


def masks_plan(keep, cfg, tokens):
    """(kept indices, gather) for the forward: gather[t-1] is the index block t selects its updated rows with:
    under "frozen" the global indices m_t themselves (the sequence keeps all N rows), under "removed" the positions
    of m_t among the rows alive before the layer; None for a layer that updates every row it receives (the dense
    block, exactly). Per-image masks (an entry (B, n_t)) give (B, n_t) indices, one row per image."""
    keep, positions = _checked(keep, cfg)
    if check_tokens(tokens) == "removed":
        return keep, positions
    return keep, [None if k.shape[-1] == cfg.num_tokens else k for k in keep]


def _checked(keep, cfg):
    """(kept indices, positions in the previous layer's, or None where a layer keeps every row of the one before)
    after validation. Static masks give 1-D indices; per-image masks (DPS-ViT, method.md P6/C8: an entry (B, n_t),
    row b image b's m_t, a 1-D entry shared by every image, the count n_t the same for every image of a layer) give
    (B, n_t) ones. Static masks are checked as the one-image case of per-image masks: each image's masks must hold
    the prefix tokens, be sorted, fit the model and be nested. Runs on every slimmed forward, so it is a few cheap
    tensor ops per layer: nestedness is read off the same searchsorted that gives the positions."""
    N, L, n_prefix = cfg.num_tokens, cfg.depth, cfg.prefix_tokens
    if len(keep) != L:
        raise UserError(f"masks have {len(keep)} layers but the model has depth {L}: use masks made for this model")
    rows = next((k for k in keep if isinstance(k, torch.Tensor) and k.dim() == 2), None)
    B, device = (1, None) if rows is None else (rows.shape[0], rows.device)

    def at(t, bad):  # the layer a check failed at and, for per-image masks, the first image that failed it
        return f"layer {t}" if rows is None else f"layer {t} of image {int(bad.nonzero()[0])}"
    out, pos, prev = [], [], torch.arange(N, device=device).expand(B, N)
    for t, k in enumerate(keep, 1):
        k = torch.as_tensor(k, dtype=torch.long, device=device)
        k = k.flatten()[None] if rows is None else k.expand(B, -1) if k.dim() == 1 else k
        if k.dim() != 2 or k.shape[0] != B:
            raise UserError(f"per-image masks layer {t} have shape {tuple(k.shape)}, not ({B}, n_t): every layer keeps "
                            "the same number of tokens in each image (method.md C8)")
        if k.numel() and int(k.min()) < 0:
            raise UserError(f"masks {at(t, (k < 0).any(1))} has token index {int(k.min())}: indices run from 0 to "
                            f"{N - 1}, the class token being 0")
        bad = (k[:, :n_prefix] != torch.arange(n_prefix, device=k.device)).any(1) if k.shape[1] >= n_prefix else \
            torch.ones(B, dtype=torch.bool)
        if bool(bad.any()):
            which = "the class token" if n_prefix == 1 else "the class and distillation tokens"
            raise UserError(f"masks {at(t, bad)} does not keep the prefix tokens {list(range(n_prefix))}: every layer "
                            f"must keep them ({which})")
        bad = (k[:, 1:] <= k[:, :-1]).any(1)
        if bool(bad.any()):
            raise UserError(f"masks {at(t, bad)} indices are not sorted and unique: give sorted token indices")
        bad = k[:, -1] >= N
        if bool(bad.any()):
            raise UserError(f"masks {at(t, bad)} has token index {int(k[:, -1].max())} but the model has {N} tokens: "
                            "use masks made for this model")
        p = torch.searchsorted(prev.contiguous(), k.contiguous())  # each kept token's place among the layer before's
        found = prev.gather(1, p.clamp(max=prev.shape[1] - 1)) == k
        bad = (~found).any(1)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise UserError(f"masks are not nested: {at(t, bad)} keeps tokens {k[b][~found[b]][:5].tolist()} that "
                            f"layer {t - 1} dropped (a patch pruned once is never updated again)")
        out.append(k if rows is not None else k[0])
        pos.append(None if k.shape[1] == prev.shape[1] else p if rows is not None else p[0])
        prev = k
    return out, pos


def prefix_mask(cfg):
    """m_L: the last layer keeps exactly the prefix tokens (e_0 for one class token; Sec. 4.2, P1 generalised)."""
    return torch.arange(cfg.prefix_tokens)


def masks_record(keep, cfg, tokens, name=None, **extra):
    """What a masks file holds: the model's name and config, the token count, the token semantics the masks were
    searched under, and the kept indices per layer."""
    keep = check_keep(keep, cfg)
    return {"model": name, "config": asdict(cfg), "num_tokens": cfg.num_tokens, "tokens": check_tokens(tokens),
            "kept_per_layer": [int(k.numel()) for k in keep], "keep": [k.tolist() for k in keep], **extra}


def save_masks(path, keep, cfg, tokens, name=None, **extra):
    """masks_record as a JSON file at path, written to a temporary file and renamed (never half a file)."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(masks_record(keep, cfg, tokens, name, **extra), f)
    os.replace(f"{path}.tmp", path)


def read_masks_file(path):
    """The JSON object of a masks file, or a one-line UserError saying what is wrong with it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise UserError(f"masks file {path} not found: pass the masks.json written by slim.py") from None
    except json.JSONDecodeError as e:
        raise UserError(f"masks file {path} is not valid JSON ({e}): pass the masks.json written by slim.py") from None
    if not isinstance(obj, dict) or "keep" not in obj:
        raise UserError(f"masks file {path} has no 'keep' entry: pass the masks.json written by slim.py")
    return obj


def masks_config(path):
    """The model geometry a masks file records (its "config" entry), as a ViTConfig."""
    obj = read_masks_file(path)
    if not isinstance(obj.get("config"), dict):
        raise UserError(f"masks file {path} does not record its model: pass --model or --weights as well")
    try:
        return ViTConfig(**obj["config"])
    except TypeError as e:
        raise UserError(f"masks file {path} has a config this code does not know ({e}): pass --model or --weights")


def load_masks(path, cfg):
    """Read a masks file and check it fits cfg (token count, depth, nesting). Returns (keep, tokens); a file
    without a "tokens" entry means "frozen", the paper's semantics (method.md P1)."""
    obj = read_masks_file(path)
    if obj.get("num_tokens", cfg.num_tokens) != cfg.num_tokens:
        raise UserError(f"masks file {path} is for {obj['num_tokens']} tokens but the model has {cfg.num_tokens}: "
                        "use masks made for this model")
    return check_keep(obj["keep"], cfg), check_tokens(obj.get("tokens", "frozen"))


def resolve_tokens(found, asked, source):
    """The token semantics to run masks from `source` under: the ones they were searched with (`found`), unless the
    user asked for others (`asked`, from a --tokens flag; None = not asked). Returns (tokens, note), note a
    sentence for the log when the two differ (then the choice was explicit, never an accident)."""
    if asked is None or asked == found:
        return found, None
    return check_tokens(asked), (f"note: {source} was searched with tokens={found!r}; running it with "
                                 f"tokens={asked!r} as --tokens asks (a different model from the searched one)")


# ----------------------------------------------------------------------------- checkpoints

def _read(path_or_url):
    if str(path_or_url).startswith(("http://", "https://")):
        try:
            return torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu", weights_only=False)
        except Exception as e:  # offline, DNS, HTTP errors: all surface as one line
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
            raise UserError(f"could not download {path_or_url} ({reason}): check the network, or download the file "
                            "elsewhere and pass its local path (slim.py --weights PATH; in Python "
                            "vit.deit(name, pretrained=PATH) or vit.load_checkpoint(PATH))") from None
    try:
        return torch.load(path_or_url, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path_or_url} not found: pass a .pth file or a URL") from None
    except Exception as e:
        raise UserError(f"checkpoint {path_or_url} could not be read as a torch file ({type(e).__name__}): "
                        "pass a DeiT .pth checkpoint") from None


def infer_config(sd):
    """Architecture from the keys and tensor shapes, which tell the family apart: a distillation token
    (`dist_token`, `head_dist`: distilled DeiT), LayerScale (`blocks.i.ls1.gamma`: DeiT-III), and whether the
    position embedding covers the prefix tokens (its length is prefix + grid² or grid²: DeiT-III's is grid²).
    The head count is not in the shapes: head dim 64, as in all DeiTs. Normalisation: ImageNet's (assumed)."""
    try:
        d = sd["cls_token"].shape[-1]
        p = sd["patch_embed.proj.weight"].shape[-1]
        prefix = 2 if "dist_token" in sd else 1
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        n_pos = sd["pos_embed"].shape[1]
        covers_prefix = math.isqrt(n_pos - prefix) ** 2 == n_pos - prefix
        grid = math.isqrt(n_pos - prefix if covers_prefix else n_pos)
        return ViTConfig(img_size=grid * p, patch_size=p, num_classes=sd["head.weight"].shape[0], embed_dim=d,
                         depth=depth, num_heads=max(1, d // 64), mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d,
                         qkv_bias="blocks.0.attn.qkv.bias" in sd, prefix_tokens=prefix, pos_embed_prefix=covers_prefix,
                         layer_scale="blocks.0.ls1.gamma" in sd)
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint is not a DeiT/timm ViT state dict (missing {e}): pass a DeiT checkpoint")


NORMALISATION = ("mean", "std")  # not architecture: never part of a shape check


def timm_names(sd):
    """The official DeiT-III release names its LayerScale blocks.i.gamma_1 / gamma_2; timm (and this file) call them
    blocks.i.ls1.gamma / ls2.gamma. The one renaming applied; every other key must already be timm's."""
    return {re.sub(r"^(blocks\.\d+\.)gamma_([12])$", r"\1ls\2.gamma", k): v for k, v in sd.items()}


@dataclass
class CheckpointInfo:
    """What a checkpoint carries besides the weights, returned beside the model by read_checkpoint."""
    normalisation: str              # a line for the log: the input mean/std and where they came from
    keep: list = None               # a slimmed checkpoint's masks m_1..m_L (also model.keep, which forward runs)
    tokens: str = None              # their semantics, "frozen" (P1) or "removed" (C1)
    classes: list = None            # the class folder names it was trained on (checked against the data's)
    dynamic: dict = None            # a DPS-ViT checkpoint's predictors G and counts (pipeline/dynamic.py)


def load_checkpoint(path_or_url, expect=None):
    """The model of read_checkpoint, alone: what a Python user wants (a slimmed checkpoint's model runs its masks)."""
    return read_checkpoint(path_or_url, expect)[0]


def read_checkpoint(path_or_url, expect=None):
    """(model, CheckpointInfo): a ready model (eval mode) from a release checkpoint ({"model": sd}), a bare state
    dict, or a checkpoint written by slim.py (a slimmed one: model.keep and model.tokens hold its masks and their
    semantics). The architecture comes from the checkpoint's "config" entry when present, else from its shapes.
    expect: a ViTConfig the checkpoint must match (e.g. the preset of --model); any difference is a one-line error
    naming the fields."""
    ck = _read(path_or_url)
    sd = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"checkpoint {path_or_url} holds no state dict: pass a DeiT checkpoint")
    sd = timm_names(sd)
    names = {f.name for f in fields(ViTConfig)}
    config = ck.get("config", {}) if isinstance(ck.get("config"), dict) else {}
    cfg = ViTConfig(**{k: v for k, v in config.items() if k in names}) if config else infer_config(sd)
    if all(k in config for k in NORMALISATION):
        normalisation = "from the checkpoint's config"
    elif expect is not None:  # a preset carries the statistics its release was trained with
        cfg = replace(cfg, mean=expect.mean, std=expect.std)
        normalisation = "the model preset's (the checkpoint does not say)"
    else:
        normalisation = "assumed ImageNet's: the checkpoint does not say (pass --mean/--std if it was trained with others)"
    if expect is not None:
        checked = [f for f in sorted(names - set(NORMALISATION)) if f != "num_heads" or config]  # heads: not in shapes
        diff = [f"{f}={getattr(cfg, f)} (expected {getattr(expect, f)})" for f in checked
                if getattr(cfg, f) != getattr(expect, f)]
        if diff:
            raise UserError(f"checkpoint {path_or_url} does not match the model: {', '.join(diff)}; "
                            "pick the matching --model or checkpoint")
    model = VisionTransformer(cfg)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UserError(f"checkpoint {path_or_url} keys differ from the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}): pass a DeiT checkpoint with timm key names")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise UserError(f"checkpoint {path_or_url}: {k} has shape {tuple(v.shape)}, model expects "
                            f"{tuple(own[k].shape)}: pass a checkpoint of this architecture")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"checkpoint {path_or_url} has NaN or inf values in {len(bad)} tensors (first: {bad[0]}): "
                        "it is broken; pass a checkpoint from before the training diverged")
    model.load_state_dict(sd, strict=True)
    if ck.get("keep") is not None:  # a slimmed checkpoint; without a "tokens" entry its masks are "frozen" (P1)
        model.keep, model.tokens = check_keep(ck["keep"], cfg), check_tokens(ck.get("tokens", "frozen"))
    info = CheckpointInfo(normalisation=f"input normalisation mean {cfg.mean}, std {cfg.std}: {normalisation}",
                          keep=model.keep, tokens=model.tokens,
                          classes=ck.get("classes") if isinstance(ck.get("classes"), list) else None,
                          dynamic=ck.get("dynamic") if isinstance(ck.get("dynamic"), dict) else None)
    return model.eval(), info


def deit(name, pretrained=None):
    """A DeiT preset (a key of PRESETS: DeiT-Ti/S/B, their distilled versions, DeiT-III-S/B); pretrained: a local
    path, a URL, or True for the official release weights. Without it, randomly initialised."""
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(PRESETS)}")
    if not pretrained:
        return VisionTransformer(PRESETS[name])
    return load_checkpoint(RELEASE_URLS[name] if pretrained is True else pretrained, expect=PRESETS[name])


def deit_tiny(pretrained=None):
    return deit("deit_tiny", pretrained)


def deit_small(pretrained=None):
    return deit("deit_small", pretrained)


def deit_base(pretrained=None):
    return deit("deit_base", pretrained)
