"""
Does a rerun of the README's first command reproduce a committed run (arXiv 2106.02852; docs/reproducing.md)? Per
pair of slim.py --out folders: the masks and the per-image predictions of the dense, searched and slimmed models,
every one, and the rerun's wall time, search time and machine.

    python bench/rerun_check.py /tmp/rerun0 results/cifar10-proxy /tmp/rerun1 results/cifar10-proxy-seed1
Writes results/rerun_check.json (--out).
"""
import argparse
import os
import shlex
import sys

import numpy as np

from common import ROOT, machine, read_json, write_json


def compare(rerun, committed):
    """The pair's entry: masks and predictions equal or not, and the rerun's times."""
    with np.load(os.path.join(rerun, "predictions.npz")) as a, np.load(os.path.join(committed, "predictions.npz")) as b:
        keys = sorted(set(a.files) | set(b.files))
        differing = {k: int((a[k] != b[k]).sum()) if k in a.files and k in b.files else "missing" for k in keys}
    report, masks = read_json(os.path.join(rerun, "report.json")), "masks.json"
    same_masks = read_json(os.path.join(rerun, masks))["keep"] == read_json(os.path.join(committed, masks))["keep"]
    return {"committed": os.path.relpath(os.path.abspath(committed), ROOT), "same_masks": same_masks,
            "predictions_differing": differing, "images": int(report["val_images"]),
            "slimmed_top1": report["slimmed_top1"], "wall_minutes": round(report["wall_seconds"] / 60, 1),
            "search_minutes": round(sum(lay["seconds"] for lay in report["layers"]) / 60, 1),
            "machine": report["machine"]}


def main():
    p = argparse.ArgumentParser("compare reruns of slim.py with committed runs")
    p.add_argument("pairs", nargs="+", help="RERUN COMMITTED [RERUN COMMITTED ...]: slim.py --out folders")
    p.add_argument("--note", default="", help="how the machine was shared during the reruns")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "rerun_check.json"))
    args = p.parse_args()
    if len(args.pairs) % 2:
        sys.exit("error: give the folders in pairs: RERUN COMMITTED")
    runs = [compare(r, c) for r, c in zip(args.pairs[::2], args.pairs[1::2])]
    for r in runs:
        print(f"{r['committed']}: masks {'equal' if r['same_masks'] else 'DIFFER'}, predictions differing "
              f"{r['predictions_differing']}; {r['wall_minutes']} min ({r['search_minutes']} of search)")
    write_json(args.out, {"runs": runs, "note": args.note, "machine": machine(),
                          "command": f"python bench/rerun_check.py {shlex.join(sys.argv[1:])}"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
