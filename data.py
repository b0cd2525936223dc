"""
Data for patch slimming (Tang et al., CVPR 2022, arXiv 2106.02852): ImageNet or any ImageFolder tree
(DIR/train/<class>/*, DIR/val/<class>/*), with torchvision transforms v2 derived from the model's image size, and
CIFAR-10 written once as such a tree (cifar10_tree), the data of the shipped proxy model.

- 224 px (ImageNet): DeiT's recipe (facebookresearch/deit datasets.py). Eval: Resize(int(224/0.875),
  bicubic) -> CenterCrop(224) -> Normalize(ImageNet mean/std). Train: RandomResizedCrop(224, bicubic) +
  horizontal flip (the short block fine-tunes of method.md C5), plus, for the final fine-tune (C7), optional
  RandAugment (DeiT's rand-m9: 2 ops at 9 of 10 magnitude steps) and random erasing (DeiT's reprob, random pixels);
  MixUp/CutMix act on whole batches (mixup_cutmix).
- small images (<= 64 px, e.g. the CIFAR-10 proxy at 32 px): eval is the image as it is (a CenterCrop
  to the model size is the identity there); train is a random crop of the 4-px reflect-padded image +
  flip, the recipe the proxy checkpoint was trained with (models/README.md).
Grayscale, CMYK and palette images become RGB (PIL convert("RGB")). A file that cannot be read as an image
(truncated, not an image) never ends a run with a DataLoader traceback: it is a one-line UserError naming it,
or, when the dataset's registry says so (BadFiles(skip=True): slim.py --skip-bad-images), dropped from its batch and
counted there.

Every random augmentation of image i is drawn from a generator seeded by (seed, epoch, i) (SeededView): the
views do not depend on the number of DataLoader workers or processes, so a run under torchrun sees the images
a one-process run sees, and a resumed run sees those of an uninterrupted one.
"""
import os
import shutil

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import datasets
from torchvision.transforms import v2

from vit import IMAGENET_MEAN, IMAGENET_STD, UserError

REPO = os.path.dirname(os.path.abspath(__file__))
CIFAR10_DIR = os.path.join(REPO, "data", "cifar10")  # --data cifar10's default --data-path
CIFAR10_VAL_PER_CLASS = 500  # val/: the first 500 images of each class of CIFAR-10's official test split
SMALL = 64  # image sizes up to this use the small-image recipe
BICUBIC = v2.InterpolationMode.BICUBIC


def build_transform(img_size, train, randaugment=False, erase=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The per-image transform. train: the training augmentation (C5); randaugment and erase (a probability)
    add DeiT's RandAugment and random erasing on top (the final fine-tune's recipe, C7). mean, std: the
    normalisation the model was trained with (its ViTConfig's)."""
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if not train:
        resize = [] if img_size <= SMALL else [v2.Resize(int(img_size / 0.875), interpolation=BICUBIC)]
        return v2.Compose([*resize, v2.CenterCrop(img_size), *to_tensor])
    if img_size <= SMALL:
        crop = v2.RandomCrop(img_size, padding=4, padding_mode="reflect")
    else:
        crop = v2.RandomResizedCrop(img_size, interpolation=BICUBIC)
    # timm's m9 is 9 of 10 magnitude steps; torchvision's default has 31 bins, so 11 bins give the same strength
    # (timm's mstd0.5, a random jitter of the magnitude, has no torchvision counterpart)
    extra = [v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11, interpolation=BICUBIC)] if randaugment else []
    erasing = [v2.RandomErasing(p=erase, value="random")] if erase > 0 else []
    return v2.Compose([crop, v2.RandomHorizontalFlip(), *extra, *to_tensor, *erasing])


class BadFile:
    """What a dataset returns for a file it cannot use (the loaders raise or skip it): problem, e.g. "is not a
    readable image (OSError: ...)"."""

    def __init__(self, path, problem):
        self.path, self.problem = path, problem


class BadFiles:
    """A dataset's registry of unusable files, which its loaders hand them to: skip=False, a one-line UserError naming
    the first one; skip=True, drop it from its batch and remember it here (paths, for the log and report.json)."""

    def __init__(self, skip=False):
        self.skip, self.paths = skip, {}

    def handle(self, bad):
        for b in bad:
            if not self.skip:
                raise UserError(f"{b.path} {b.problem}: remove or replace it, or pass "
                                "--skip-bad-images to skip such files")
            self.paths[b.path] = b.problem


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose unusable files come back as BadFile items instead of exceptions inside a worker: unreadable
    ones, and, with size (the small-image recipe, which neither resizes nor crops), images of another size, which
    would be centre-cropped or zero-padded into something else than the model was trained on. bad: the BadFiles
    registry the loaders hand them to (data.bad_files), by default an error on the first; the datasets of one run
    share the run's (pipeline/run.py, Run.dataset), so that its log and report count every file skipped."""

    def __init__(self, root, transform, size=None):
        super().__init__(root, transform=transform)
        self.size, self.bad = size, BadFiles(skip=False)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")  # convert decodes the whole file: truncation shows here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}" if str(e) else type(e).__name__
            return BadFile(path, f"is not a readable image ({reason})")
        if self.size is not None and img.size != (self.size, self.size):
            return BadFile(path, f"is {img.size[0]}x{img.size[1]} px but the model takes {self.size}x{self.size} and "
                           "small images are used as they are (resize them to the model's size)")
        return self.transform(img), target


def build_dataset(root, split, img_size, train_transform=None, randaugment=False, erase=0.0, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD):
    """ImageFolder over root/split. train_transform: None -> the training augmentation for the train split
    and the eval transform otherwise; False -> always the eval transform (deterministic scoring). mean, std: the
    model's normalisation (ViTConfig.mean/std)."""
    path = os.path.join(root, split)
    if not os.path.isdir(root):
        raise UserError(f"dataset folder {root} does not exist: pass --data-path DIR with DIR/train and DIR/val")
    if not os.path.isdir(path):
        raise UserError(f"dataset folder {root} has no {split}/ subfolder: expected {path}/<class>/<images>")
    train = split == "train" if train_transform is None else bool(train_transform)
    try:
        ds = CheckedImageFolder(path, build_transform(img_size, train, randaugment, erase, mean, std),
                                size=img_size if img_size <= SMALL else None)
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise UserError(f"{path} holds no images in class subfolders ({str(e).splitlines()[0][:100]}): "
                        f"expected {path}/<class>/<images>")
    return ds


def cifar10_tree(root):
    """root as an ImageFolder tree of CIFAR-10, the data the shipped proxy (models/README.md) was trained and
    measured on: root/train/<class>/%04d.jpg, all 50,000 training images, and root/val/<class>/%04d.jpg, the first
    500 images of each class of the official test split in test-set order; %04d is the index within the class,
    each image a JPEG at PIL's default quality (75). A root that holds train/ and val/ is used as it is. Otherwise
    torchvision downloads CIFAR-10 into root (once), and each split is written to a temporary folder renamed into
    place when complete, so an interrupted conversion leaves no half tree."""
    if all(os.path.isdir(os.path.join(root, split)) for split in ("train", "val")):
        return root
    try:
        sources = {split: datasets.CIFAR10(root, train=split == "train", download=True) for split in ("train", "val")}
    except (OSError, RuntimeError) as e:  # no network: urllib's URLError, a socket error; a bad archive
        raise UserError(f"{root} holds no CIFAR-10 tree (train/<class>/, val/<class>/) and CIFAR-10 could not be "
                        f"downloaded ({type(e).__name__}): connect to the network, or pass --data-path DIR where DIR "
                        "holds that tree") from None
    for split, source in sources.items():
        final, partial = os.path.join(root, split), os.path.join(root, f".{split}.partial")
        if os.path.isdir(final):
            continue
        shutil.rmtree(partial, ignore_errors=True)
        written = [0] * len(source.classes)
        for pixels, label in zip(source.data, source.targets):  # (32, 32, 3) uint8, in the split's own order
            if split == "val" and written[label] >= CIFAR10_VAL_PER_CLASS:
                continue
            folder = os.path.join(partial, source.classes[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(folder, f"{written[label]:04d}.jpg"))  # PIL's default quality
            written[label] += 1
        os.replace(partial, final)
    return root


def check_classes(ds, num_classes, model_classes=None):
    """The class index is the sorted folder name, so a wrong folder shifts every label silently. The head must have
    one output per class folder of ds; ds's class folders must be those of the sibling train/ (when there is one)
    and those the checkpoint names (model_classes: a slimmed checkpoint's, else None)."""
    if len(ds.classes) != num_classes:
        raise UserError(f"{ds.root} has {len(ds.classes)} classes but the model's head has {num_classes}: "
                        "use a checkpoint trained on this dataset")
    train = os.path.join(os.path.dirname(os.path.normpath(ds.root)), "train")
    for name, classes in (("train/", datasets.folder.find_classes(train)[0] if os.path.isdir(train) else None),
                          ("the checkpoint", model_classes)):
        if classes is not None and list(classes) != list(ds.classes):
            extra, missing = sorted(set(ds.classes) - set(classes)), sorted(set(classes) - set(ds.classes))
            raise UserError(f"{ds.root} has other class folders than {name} (only here: {extra[:3]}, only in {name}: "
                            f"{missing[:3]}): the labels would be shifted; give it the same class folders")


class SeededView(torch.utils.data.Dataset):
    """dataset with the random augmentations of item i drawn from torch's generator seeded by (seed, epoch, i),
    restored afterwards. Set .epoch for a new draw of every image (the final fine-tune does so each epoch)."""

    def __init__(self, dataset, seed, epoch=0):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % 2**63)
            return self.dataset[i]


def subset(ds, per_class=None, total=None, seed=None):
    """A deterministic subset: per_class images of each class (or total images overall), the first ones
    in folder order when seed is None, else a seeded random choice. Returns a torch Subset."""
    targets = torch.as_tensor(ds.targets)
    if seed is None:
        order = torch.arange(len(targets))
    else:
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    if per_class is not None:  # rank of each image within its class, in `order`
        t = targets[order].numpy()
        by_class = np.argsort(t, kind="stable")
        rank = np.empty(len(t), dtype=np.int64)
        rank[by_class] = np.arange(len(t)) - np.searchsorted(t[by_class], t[by_class], side="left")
        order = order[torch.from_numpy(rank < per_class)]
    if total is not None:
        order = order[:total]
    return torch.utils.data.Subset(ds, sorted(order.tolist()) if seed is None else order.tolist())


def default_workers(processes=1):
    """DataLoader workers per process: the CPUs this process may use, shared among the processes of this machine
    (torchrun's LOCAL_WORLD_SIZE), at most 8 each."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, processes)))


def bad_files(ds):
    """The BadFiles registry of dataset ds, or of the dataset it wraps (a chain of .dataset: torch's Subset,
    SeededView, pipeline/evaluate.py's PositionTagged); a dataset without one gets an error on its first BadFile."""
    while not hasattr(ds, "bad") and hasattr(ds, "dataset"):
        ds = ds.dataset
    return getattr(ds, "bad", None) or BadFiles(skip=False)


class Loader:
    """A DataLoader of (images, labels) batches that hands unreadable files (BadFile items) to the dataset's BadFiles
    registry (bad_files): an error naming the file, or a batch without it. A batch whose every file was skipped is
    dropped, or, with keep_empty, yielded as None (a data-parallel step must still be taken on every process)."""

    def __init__(self, ds, batch_size, shuffle=False, workers=2, seed=0, drop_last=False, sampler=None,
                 keep_empty=False):
        self.bad, self.keep_empty = bad_files(ds), keep_empty
        g = torch.Generator().manual_seed(seed)
        self.dataloader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
            num_workers=workers, generator=g, drop_last=drop_last, collate_fn=collate_checked,
            persistent_workers=False, pin_memory=torch.cuda.is_available())

    def __len__(self):
        return len(self.dataloader)

    def __iter__(self):
        for batch, bad in self.dataloader:
            self.bad.handle(bad)
            if batch is not None or self.keep_empty:
                yield batch


def collate_checked(items):
    """default_collate over the readable items; the BadFile items travel beside them."""
    good = [it for it in items if not isinstance(it, BadFile)]
    return (default_collate(good) if good else None), [it for it in items if isinstance(it, BadFile)]


loader = Loader  # data.loader(ds, batch_size, ...): the name every caller uses


def mixup_cutmix(num_classes, mixup, cutmix):
    """DeiT's batch mixing (mixup alpha 0.8, cutmix alpha 1.0, one of the two per batch) from transforms v2, or None
    when both alphas are 0. Called on (images, labels); returns mixed images and soft labels (B, classes)."""
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
