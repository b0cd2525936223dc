"""
Data for patch slimming (Tang et al., CVPR 2022, arXiv 2106.02852): ImageNet or any ImageFolder tree
(DIR/train/<class>/*, DIR/val/<class>/*), with transforms derived from the model's image size.

- 224 px (ImageNet): DeiT's recipe (facebookresearch/deit datasets.py). Eval: Resize(int(224/0.875),
  bicubic) -> CenterCrop(224) -> Normalize(ImageNet mean/std). Train (for the short fine-tunes of
  METHOD.md C5): RandomResizedCrop(224, bicubic) + horizontal flip.
- small images (<= 64 px, e.g. the CIFAR-10 proxy at 32 px): eval is the image as it is (a CenterCrop
  to the model size is the identity there); train is a random crop of the 4-px reflect-padded image +
  flip, the recipe the proxy checkpoint was trained with (../shared/README.md).
Grayscale, CMYK and palette images become RGB through torchvision's default loader (PIL convert("RGB")).
"""
import os

import numpy as np
import torch
from torchvision import datasets, transforms

from vit import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL = 64  # image sizes up to this use the small-image recipe


def build_transform(img_size, train):
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if img_size <= SMALL:
        if train:
            return transforms.Compose([transforms.RandomCrop(img_size, padding=4, padding_mode="reflect"),
                                       transforms.RandomHorizontalFlip(), *norm])
        return transforms.Compose([transforms.CenterCrop(img_size), *norm])
    bicubic = transforms.InterpolationMode.BICUBIC
    if train:
        return transforms.Compose([transforms.RandomResizedCrop(img_size, interpolation=bicubic),
                                   transforms.RandomHorizontalFlip(), *norm])
    return transforms.Compose([transforms.Resize(int(img_size / 0.875), interpolation=bicubic),
                               transforms.CenterCrop(img_size), *norm])


def build_dataset(root, split, img_size, train_transform=None):
    """ImageFolder over root/split. train_transform: None -> the training augmentation for the train split
    and the eval transform otherwise; False -> always the eval transform (deterministic scoring)."""
    path = os.path.join(root, split)
    if not os.path.isdir(root):
        raise UserError(f"dataset folder {root} does not exist: pass --data-path DIR with DIR/train and DIR/val")
    if not os.path.isdir(path):
        raise UserError(f"dataset folder {root} has no {split}/ subfolder: expected {path}/<class>/<images>")
    train = split == "train" if train_transform is None else bool(train_transform)
    try:
        ds = datasets.ImageFolder(path, transform=build_transform(img_size, train))
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise UserError(f"{path} holds no images in class subfolders ({str(e).splitlines()[0][:100]}): "
                        f"expected {path}/<class>/<images>")
    return ds


def check_classes(ds, num_classes):
    """The head must have one output per class folder (class index = sorted folder name)."""
    if len(ds.classes) != num_classes:
        raise UserError(f"{ds.root} has {len(ds.classes)} classes but the model's head has {num_classes}: "
                        "use a checkpoint trained on this dataset")


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


def loader(ds, batch_size, shuffle=False, workers=2, seed=0, drop_last=False):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       generator=g, drop_last=drop_last, persistent_workers=False)
