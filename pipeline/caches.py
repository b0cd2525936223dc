"""
The dense caches of patch slimming's search (arXiv 2106.02852; method.md C6): Z_0 .. Z_L of the unpruned network
for a fixed sample of training images, computed once, so that searching layer t reads its input Z_{t-1} and the
target Z_{t+1} of P4 instead of running layers 1..t-1 again. Under torchrun each rank caches its share of the
sample (image i belongs to rank i mod K; pipeline/distributed.py), and a memory plan printed at start places the
caches on the GPU when they fit, else in pinned CPU memory.
"""
import time
from collections import namedtuple

import torch

import data
from pipeline import distributed
from pipeline.evaluate import PositionTagged, autocast
from vit import UserError


DenseCache = namedtuple("DenseCache", "z feat logits positions")  # z[t]: (M, N, d), Z_t, the dense output of block t
#   (z[0]: the embedded tokens, so z[t-1] enters block t); feat, logits: the dense final prefix-token features (after the norm)
#   and logits; positions (M,): each image's number in the whole sample (under torchrun a rank caches its share)

@torch.no_grad()
def cache_dense(model, loader, desc, cache_device="cpu"):
    """Z_0 .. Z_L and the final feature/logits of the dense model, for every image of loader (a DenseCache), stored
    on cache_device (pinned, when that is the CPU of a CUDA run). The loader's labels may be (label, position) pairs
    (PositionTagged); otherwise the images are numbered in loader order."""
    L, device = model.cfg.depth, next(model.parameters()).device
    zs, fs, positions = [[] for _ in range(L + 1)], [], []
    store = torch.bfloat16 if device.type == "cuda" else torch.float32
    for img, y in distributed.progress(loader, desc=desc):
        positions.append(y[1] if isinstance(y, (list, tuple)) else torch.arange(len(img)) + sum(map(len, positions)))
        with autocast(device):
            x = model.embed(img.to(device))
            for t in range(1, L + 1):
                zs[t - 1].append(x.to(cache_device, store))
                x = model.blocks[t - 1](x)
            zs[L].append(x.to(cache_device, store))
            fs.append(model.features(x).float())
    if not fs:  # no image here (a share emptied by skipped files): empty tensors, so that collectives still line up
        cfg = model.cfg
        zs = [[torch.zeros(0, cfg.num_tokens, cfg.embed_dim, dtype=store, device=cache_device)]] * (L + 1)
        fs, positions = [torch.zeros(0, cfg.prefix_tokens, cfg.embed_dim, device=device)], [torch.zeros(0, dtype=torch.long)]
    pin = device.type == "cuda" and torch.device(cache_device).type == "cpu"
    z = [torch.cat(z).pin_memory() if pin else torch.cat(z) for z in zs]
    feat = torch.cat(fs)
    return DenseCache(z, feat, model.classify(feat), torch.cat(positions))


def search_set_sizes(s, n_train):
    """Images in the fit and held samples: the settings' counts, at most half the training set each."""
    return min(s.fit_images, n_train // 2), min(s.held_images, n_train // 2)


def cache_plan(cfg, n_images, device, asked="auto"):
    """Where the dense caches go (method.md C6), and the line that says why. They hold Z_0 .. Z_L of n_images images,
    this rank's share: bfloat16 on CUDA, float32 on the CPU. On CUDA they stay on the GPU when they take at most
    half its free memory (the rest is for the fine-tunes), else pinned CPU memory, moved per batch; asked ("cpu",
    "cuda") overrides. CPU memory is shared by the processes of a machine, so their shares count together there.
    Every rank takes rank 0's plan (each reads free memory at its own moment)."""
    per_value = 2 if device.type == "cuda" else 4
    size = n_images * (cfg.depth + 1) * cfg.num_tokens * cfg.embed_dim * per_value
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        place = device if asked == "cuda" or (asked == "auto" and size <= free / 2) else torch.device("cpu")
    else:
        place = torch.device("cpu")
    sharing = 1 if place.type == "cuda" else distributed.local_world_size()  # processes whose caches share it
    room = free if place.type == "cuda" else available_cpu_memory()
    line = (f"memory plan: dense caches of {n_images} images x {cfg.depth + 1} layers x {cfg.num_tokens} tokens x "
            f"{cfg.embed_dim} in {'bfloat16' if per_value == 2 else 'float32'} = {size / 2**30:.2f} GiB per process "
            f"({distributed.world_size()} processes) on {place}{' (pinned)' if device.type == 'cuda' and place.type == 'cpu' else ''}"
            f", {room / 2**30:.1f} GiB free there for {sharing} process{'es' if sharing > 1 else ''}")
    fits = size * sharing <= room
    place, line, fits = distributed.all_gather((place if place.type == "cpu" else "cuda", line, fits))[0]
    if not fits:
        raise UserError(f"{line}: they do not fit; pass smaller --fit-images/--held-images, run more processes "
                        "(torchrun), or --cache-device cpu")
    return (device if place == "cuda" else place), line


def available_cpu_memory():
    """Bytes of memory the machine can still give (MemAvailable), or a large number where it cannot be read."""
    try:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 2**50


def cache_search_sets(model, train_aug, data_path, s, workers, log, cache_device="cpu"):
    """The fit set (one augmented view of each image, seeded by image) and the held set (evaluation transform):
    disjoint random training images chosen by s.seed; returns their dense caches (fit, held), each a DenseCache of
    this rank's share (image i of a sample belongs to rank i mod K). Unusable files go to train_aug's registry
    (data.bad_files)."""
    cfg, t0 = model.cfg, time.time()
    train_eval = data.build_dataset(data_path, "train", cfg.img_size, train_transform=False, mean=cfg.mean, std=cfg.std)
    train_eval.bad = data.bad_files(train_aug)  # the same images as train_aug, so the same registry
    perm = torch.randperm(len(train_aug), generator=torch.Generator().manual_seed(s.seed)).tolist()
    n_fit, n_held = search_set_sizes(s, len(perm))
    caches = []
    for name, ds in (("fit", data.SeededView(torch.utils.data.Subset(train_aug, perm[:n_fit]), s.seed)),
                     ("held", torch.utils.data.Subset(train_eval, perm[n_fit:n_fit + n_held]))):
        mine = distributed.shard(len(ds))
        share = PositionTagged(torch.utils.data.Subset(ds, mine), mine)
        loader = data.loader(share, max(1, s.batch_size // distributed.world_size()), workers=workers)
        caches.append(cache_dense(model, loader, f"cache {name}", cache_device))
    log(f"cached dense activations of {n_fit} fit + {n_held} held images in {time.time() - t0:.0f}s")
    return caches
