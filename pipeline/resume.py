"""
The files a long slim.py run (patch slimming, arXiv 2106.02852) resumes from: the search state (OUT/state.pt, after
every layer) and the final fine-tune (OUT/finetune.pt). They are written atomically, and read back only when they
were made with the same settings and every process of a torchrun launch sees the same version.
"""
import json
import os

import torch

from pipeline import distributed
from vit import UserError


def write_atomically(path, obj):
    """obj to path (JSON for a .json path, else torch.save) through a temporary file and a rename: a run killed
    while writing leaves the previous file, never half of one."""
    if path.endswith(".json"):
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
    else:
        torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def same_everywhere(value, what):
    """value, checked to be equal on every rank (e.g. what a rank read from --out): ranks that disagree would take
    different branches and wait for each other forever, so that is a one-line error instead."""
    values = distributed.all_gather(value)
    if any(v != values[0] for v in values):
        raise UserError(f"the processes see different {what} ({values[:4]}): put --out on a file system every "
                        "machine shares")
    return value


def load_if_made_with(path, made_with, what, restart, position):
    """The saved run at path, or None when there is none. Its "settings" entry must equal made_with (else a one-line
    error: resuming would return a result made with other settings under the new ones' name), and every rank must
    see the file and the same saved[position] (how far it got). what: "a search", ...; restart: how to start over."""
    if not path or not same_everywhere(os.path.exists(path), f"versions of {path}"):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    old = saved.get("settings", {})
    diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in made_with.items() if old.get(k) != v]
    if diff:
        raise UserError(f"{path} holds {what} made with other settings ({', '.join(diff[:4])[:300]}): pass another "
                        f"--out, or delete that file to {restart}")
    same_everywhere(saved[position], f"versions of {path}")
    return saved
