"""
The files a slim.py run (patch slimming, arXiv 2106.02852) writes and resumes from. Every file is written
atomically (write_atomically), and an OSError on one becomes one line naming the path and the fix (output_error). The
search state (OUT/state.pt, after every layer) and the final fine-tune (OUT/finetune.pt) are read back only when
they were made with the same settings and every process of a torchrun launch sees the same version.
"""
import contextlib
import errno
import io
import json
import os

import numpy as np
import torch

from pipeline import distributed
from vit import UserError


def serialise(path, obj):
    """The bytes of obj as the file path holds it: JSON for .json, a compressed NumPy archive for .npz (obj: name ->
    array), bytes as they are, else torch.save's format."""
    if isinstance(obj, bytes):
        return obj
    if path.endswith(".json"):
        return json.dumps(obj, indent=1).encode()
    buffer = io.BytesIO()
    if path.endswith(".npz"):
        np.savez_compressed(buffer, **obj)
    else:
        torch.save(obj, buffer)  # into memory first: a full disk then fails in write() with ENOSPC, a plain OSError
    return buffer.getvalue()


def write_atomically(path, obj):
    """Every file a run writes goes through here: obj (see serialise) to a temporary file, then renamed to path. A run
    killed or failing while writing (a full disk, a read-only folder) leaves the previous file or none, never half of
    one; the OSError names path and reaches the CLI, which prints it as one line (output_error)."""
    path, tmp = str(path), f"{path}.tmp"
    payload = serialise(path, obj)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        e.filename = e.filename or path
        raise


FIXES = {  # what to do about an OSError on the files of a run, by errno
    errno.ENOSPC: "no space left there: free some, or pass --out on another disk (the same command resumes)",
    errno.EDQUOT: "disk quota exceeded: free some space, or pass --out on another disk (the same command resumes)",
    errno.EACCES: "permission denied: pass --out a folder you can write to",
    errno.EPERM: "permission denied: pass --out a folder you can write to",
    errno.EROFS: "a read-only file system: pass --out a folder on a writable disk",
    errno.EEXIST: "a file is in the way: pass --out a folder path, not a file",
    errno.ENOTDIR: "a file is in the way where a folder should be: pass --out a folder path",
    errno.EISDIR: "a folder is in the way where a file should be: remove it or pass another --out",
}


def output_error(e):
    """The one line the CLI prints for an OSError e on a file: the path, the system's reason and the fix."""
    fix = FIXES.get(e.errno, e.strerror or type(e).__name__)
    return f"cannot write {e.filename}: {fix}" if e.errno in FIXES else f"{e.filename}: {fix}"


def same_everywhere(value, what):
    """value, checked to be equal on every rank (e.g. what a rank read from --out): ranks that disagree would take
    different branches and wait for each other forever, so that is a one-line error instead."""
    values = distributed.all_gather(value)
    if any(v != values[0] for v in values):
        raise UserError(f"the processes see different {what} ({values[:4]}): put --out on a file system every "
                        "machine shares")
    return value


RESUMABLE = {  # what a saved file holds (as errors name it): how to start it over, and its entry saying how far it got
    "a search": ("start over", "next"),                     # OUT/state.pt, slim.search
    "a predictor fit": ("start over", "next"),              # OUT/dynamic_state.pt, pipeline/dynamic.py
    "a final fine-tune": ("start the fine-tune over", "step"),  # OUT/finetune.pt, dynamic_finetune.pt; finetune.py
}


def load_if_made_with(path, made_with, what):
    """The saved run at path, or None when there is none (or no path). what: a key of RESUMABLE. Its "settings" entry
    must equal made_with (else a one-line error: resuming would return a result made with other settings under the
    new ones' name), and every rank must see the file and the same entry of how far it got."""
    restart, position = RESUMABLE[what]
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
