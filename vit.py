"""
A from-scratch DeiT (Touvron et al. 2021) with the patch-slimmed forward of
"Patch Slimming for Efficient Vision Transformers" (Tang et al., CVPR 2022, arXiv 2106.02852).

Descends from the DeiT/timm VisionTransformer (same parameter names, so a release checkpoint loads
with strict=True and no key map) and from nanoGPT's model.py (one config dataclass, a from_pretrained
that builds the model and checks every shape). The one addition is `keep`: per layer, the sorted
indices of the tokens that layer keeps (METHOD.md §2). With `keep` the forward *gathers* the kept rows,
so pruned patches cost no FLOPs at all (METHOD.md I2); `keep=None` is the plain dense DeiT.
"""
import copy
import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# Official DeiT release checkpoints (facebookresearch/deit README), ImageNet-1k, 224 px.
RELEASE_URLS = {
    "deit_tiny": "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
    "deit_small": "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
    "deit_base": "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
}


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

    @property
    def num_tokens(self):
        return 1 + (self.img_size // self.patch_size) ** 2


PRESETS = {  # METHOD.md §1 reference sizes
    "deit_tiny": ViTConfig(embed_dim=192, num_heads=3),
    "deit_small": ViTConfig(embed_dim=384, num_heads=6),
    "deit_base": ViTConfig(embed_dim=768, num_heads=12),
}


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) that can compute only output rows [r0, r1) of its weight:
    the fused qkv projection gives q for the kept tokens and k, v for all alive ones (METHOD.md I2)."""

    def forward(self, x, rows=None):
        if rows is None:
            return super().forward(x)
        r0, r1 = rows
        return F.linear(x, self.weight[r0:r1], None if self.bias is None else self.bias[r0:r1])


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)  # timm layout: rows [q; k; v]
        self.proj = nn.Linear(dim, dim)

    def forward(self, h, idx=None, record=None):
        """h: (B, n_in, d) normed tokens alive before this layer; idx: (n_out,) positions in h of the
        tokens this layer keeps (None = all). Returns (B, n_out, d).
        METHOD.md I2: keys/values from all n_in tokens, queries only for the n_out kept ones; the
        q and kv projections are split so no FLOP is spent on a dropped query."""
        B, n_in, d = h.shape
        H, dh = self.num_heads, self.head_dim
        if idx is None:
            q, k, v = self.qkv(h).view(B, n_in, 3, H, dh).permute(2, 0, 3, 1, 4)
        else:
            q = self.qkv(h.index_select(1, idx), rows=(0, d)).view(B, -1, H, dh).transpose(1, 2)
            k, v = self.qkv(h, rows=(d, 3 * d)).view(B, n_in, 2, H, dh).permute(2, 0, 3, 1, 4)
        if record is None:  # the fast path: fused attention, nothing stored
            o = F.scaled_dot_product_attention(q, k, v)                     # (B, H, n_out, dh)
            return self.proj(o.transpose(1, 2).reshape(B, -1, d))
        # the recording path (for significance scores, METHOD.md §4): explicit softmax
        attn = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)       # P_h: (B, H, n_out, n_in)
        o = attn @ v                                                        # (B, H, n_out, dh)
        # U_h = (P_h V_h) W_o[:, h]: head h's contribution to each token after the projection
        w = self.proj.weight.view(d, H, dh).permute(1, 2, 0)                # (H, dh, d)
        record["attn"], record["head_out"] = attn, o @ w                    # (B, H, n_out, d)
        return self.proj(o.transpose(1, 2).reshape(B, -1, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))

    def forward(self, x, idx=None, record=None):
        """x: (B, n_in, d) -> (B, n_out, d). Y = X + Attn(LN1(X)), Z = Y + MLP(LN2(Y)) (METHOD.md §1),
        with the residual and the MLP only on the kept rows idx (the paper's diag(m_l), Sec. 3)."""
        a = self.attn(self.norm1(x), idx, record)
        x = (x if idx is None else x.index_select(1, idx)) + a
        return x + self.mlp(self.norm2(x))


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
        self.keep = None  # the masks a slimmed checkpoint was saved with (see load_checkpoint); forward never reads it
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, img):
        """img: (B, 3, H, W) -> tokens (B, N, d), class token first."""
        x = self.patch_embed(img)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def run_blocks(self, x, pos=None, start=0, end=None, records=None):
        """Blocks start..end-1 on tokens x. pos: from keep_positions(keep) (None = dense).
        records: a list to which each block appends {"attn", "head_out"} (METHOD.md §4)."""
        for l in range(start, self.cfg.depth if end is None else end):
            rec = None if records is None else {}
            x = self.blocks[l](x, None if pos is None else pos[l], rec)
            if rec is not None:
                records.append(rec)
        return x

    def forward_features(self, img, keep=None, records=None):
        """The final class-token feature after the last norm, (B, d): what METHOD.md I4 compares."""
        pos = None if keep is None else keep_positions(keep, self.cfg)
        return self.norm(self.run_blocks(self.embed(img), pos, records=records)[:, 0])

    def forward(self, img, keep=None):
        """img: (B, 3, H, W) -> logits (B, classes). keep: per-layer kept token indices (None = dense)."""
        return self.head(self.forward_features(img, keep))


# ----------------------------------------------------------------------------- CPU inference: prepacked weights

class PackedLinear(nn.Module):
    """Inference-only stand-in for a Linear on CPU: each weight (or row block [r0, r1) of it, for the split
    q / kv projections) is reordered once into oneDNN's blocked layout, as torch.compile's CPU freezing does.
    On our 2-core AMD EPYC this runs DeiT-S's GEMMs 11-32% faster than MKL's sgemm at every token count a
    slimmed layer keeps (bench/gemm.py; README "Real speed")."""

    def __init__(self, lin):
        super().__init__()
        self.weight, self.bias = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
        self.packed = {}  # rows -> (packed weight, bias rows), filled on first use

    def forward(self, x, rows=None):
        if torch.is_grad_enabled():
            raise UserError("a packed model is for inference only: run it under torch.no_grad() or "
                            "torch.inference_mode(), and train the original model")
        if rows not in self.packed:
            r0, r1 = rows or (0, self.weight.shape[0])
            w = torch.ops.mkldnn._reorder_linear_weight(self.weight[r0:r1].contiguous(), None)
            self.packed[rows] = w, None if self.bias is None else self.bias[r0:r1].contiguous()
        w, b = self.packed[rows]
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def pack_for_cpu(model):
    """A frozen copy of model for fast CPU inference (same forward, same `keep`; outputs equal to float
    rounding): every Linear becomes a PackedLinear. Later changes to model do not reach the copy."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        raise UserError("this torch build has no oneDNN (mkldnn) linear: run the model unpacked")
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise UserError("pack_for_cpu needs a float32 model on the CPU: call it before .to(device, dtype)")
    packed = copy.deepcopy(model).eval().requires_grad_(False)
    for parent in list(packed.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
    return packed


# ----------------------------------------------------------------------------- masks (METHOD.md §2)

def check_keep(keep, cfg):
    """Validate per-layer kept indices; returns them as a list of sorted 1-D LongTensors.
    keep[l] is S_{l+1}, the tokens block l+1 outputs; nested, each holding the class token 0."""
    return _checked(keep, cfg)[0]


def keep_positions(keep, cfg):
    """Per layer, the positions of S_l inside S_{l-1} (what the gathered forward indexes with);
    None for a layer that keeps every token alive before it (the dense path, exactly)."""
    return _checked(keep, cfg)[1]


def _checked(keep, cfg):
    """(kept indices, positions) after validation. Runs on every slimmed forward, so it is a few cheap tensor
    ops per layer: nestedness is read off the same searchsorted that gives the positions."""
    N, L = cfg.num_tokens, cfg.depth
    if len(keep) != L:
        raise UserError(f"masks have {len(keep)} layers but the model has depth {L}: use masks made for this model")
    out, pos, prev = [], [], torch.arange(N)
    for l, k in enumerate(keep):
        k = torch.as_tensor(k, dtype=torch.long).flatten()
        if k.numel() == 0 or k[0] != 0:
            raise UserError(f"masks layer {l + 1} does not keep the class token 0: every layer must keep index 0")
        if k.numel() > 1 and not bool((k[1:] > k[:-1]).all()):
            raise UserError(f"masks layer {l + 1} indices are not sorted and unique: give sorted token indices")
        if k[-1] >= N:
            raise UserError(f"masks layer {l + 1} has token index {int(k[-1])} but the model has {N} tokens: "
                            "use masks made for this model")
        p = torch.searchsorted(prev, k)  # where each kept token sits among those alive before the layer
        found = prev[p.clamp(max=prev.numel() - 1)] == k
        if not bool(found.all()):
            raise UserError(f"masks are not nested: layer {l + 1} keeps tokens {k[~found][:5].tolist()} that "
                            f"layer {l} dropped (a patch dropped once is never used again)")
        out.append(k)
        pos.append(None if k.numel() == prev.numel() else p)
        prev = k
    return out, pos


def save_masks(path, keep, cfg, name=None, **extra):
    """Masks file: JSON with the model's name and config, the token count and the kept indices per layer."""
    keep = check_keep(keep, cfg)
    obj = {"model": name, "config": asdict(cfg), "num_tokens": cfg.num_tokens,
           "kept_per_layer": [int(k.numel()) for k in keep], "keep": [k.tolist() for k in keep], **extra}
    with open(path, "w") as f:
        json.dump(obj, f)


def load_masks(path, cfg):
    """Read a masks file and check it fits cfg (token count, depth, nesting)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise UserError(f"masks file {path} not found: pass the masks.json written by slim.py")
    except json.JSONDecodeError as e:
        raise UserError(f"masks file {path} is not valid JSON ({e}): pass the masks.json written by slim.py")
    if "keep" not in obj:
        raise UserError(f"masks file {path} has no 'keep' entry: pass the masks.json written by slim.py")
    if obj.get("num_tokens", cfg.num_tokens) != cfg.num_tokens:
        raise UserError(f"masks file {path} is for {obj['num_tokens']} tokens but the model has {cfg.num_tokens}: "
                        "use masks made for this model")
    return check_keep(obj["keep"], cfg)


# ----------------------------------------------------------------------------- checkpoints

def _read(path_or_url):
    if str(path_or_url).startswith(("http://", "https://")):
        try:
            return torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu", weights_only=False)
        except Exception as e:  # offline, DNS, HTTP errors: all surface as one line
            raise UserError(f"could not download {path_or_url} ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                            "check the network, or download it elsewhere and pass the local file with --weights")
    try:
        return torch.load(path_or_url, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path_or_url} not found: pass a .pth file or a URL")
    except Exception as e:
        raise UserError(f"checkpoint {path_or_url} could not be read as a torch file ({type(e).__name__}): "
                        "pass a DeiT .pth checkpoint")


def infer_config(sd):
    """Architecture from tensor shapes. The head count is not in the shapes: head dim 64, as in all DeiTs."""
    try:
        d = sd["cls_token"].shape[-1]
        p = sd["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        return ViTConfig(img_size=grid * p, patch_size=p, num_classes=sd["head.weight"].shape[0], embed_dim=d,
                         depth=depth, num_heads=max(1, d // 64), mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d,
                         qkv_bias="blocks.0.attn.qkv.bias" in sd)
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint is not a DeiT/timm ViT state dict (missing {e}): pass a DeiT checkpoint")


def load_checkpoint(path_or_url, expect=None):
    """A ready model (eval mode) from a release checkpoint ({"model": sd}), a bare state dict, or a slimmed
    checkpoint written by slim.py (then model.keep holds its masks). The architecture comes from the
    checkpoint's "config" entry when present, else from its shapes. expect: a ViTConfig the checkpoint
    must match (e.g. the preset of --model); any difference is a one-line error naming the fields."""
    ck = _read(path_or_url)
    sd = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"checkpoint {path_or_url} holds no state dict: pass a DeiT checkpoint")
    names = {f.name for f in fields(ViTConfig)}
    cfg = ViTConfig(**{k: v for k, v in ck["config"].items() if k in names}) if "config" in ck else infer_config(sd)
    if expect is not None:
        checked = [f for f in sorted(names) if f != "num_heads" or "config" in ck]  # heads: not in the shapes
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
    model.load_state_dict(sd, strict=True)
    if ck.get("keep") is not None:
        model.keep = check_keep(ck["keep"], cfg)
    return model.eval()


def deit(name, pretrained=None):
    """A DeiT preset ("deit_tiny", "deit_small", "deit_base"); pretrained: a local path, a URL, or True
    for the official release weights. Without it, randomly initialised."""
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
