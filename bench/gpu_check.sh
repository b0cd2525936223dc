#!/usr/bin/env bash
# The prepared GPU check of the patch-slimming implementation (arXiv 2106.02852; docs/speed.md): sized for under 8
# minutes on a machine with an NVIDIA GPU, torch, torchvision, timm and pytest, no dataset and no network. Each step is
# timed and logged to OUT/<step>.log, a failed one recorded while the others still run (exit 1); OUT/gpu_check.json
# holds it all. Steps: 1. the suite's CUDA tests (pytest -m cuda); 2. a tiny search and final fine-tune (slim.py
# --device cuda, bfloat16 autocast) on random images with a random DeiT-S; 3. the same under torchrun, 2 processes,
# NCCL, when 2 GPUs are present (it must reach step 2's masks); 4. bench/speed.py in bfloat16 at DeiT-S shapes.
#
#   bash bench/gpu_check.sh OUT               # on the GPU machine (COMPILE=1: also torch.compile in step 4)
#   bash bench/gpu_check.sh OUT --cpu-smoke   # the same steps on the CPU at tiny size (test_slim.py runs it)
set -uo pipefail
PY=${PYTHON:-python3}  # the interpreter: $PYTHON (the test suite passes its own), else python3 on PATH
if [ $# -lt 1 ] || [ "${1:0:2}" = "--" ]; then
  echo "usage: bash bench/gpu_check.sh OUT_DIR [--cpu-smoke]" >&2; exit 2
fi
OUT=$(realpath -m "$1"); MODE=${2:-gpu}
case "$MODE" in gpu|--cpu-smoke) ;; *) echo "unknown option $MODE: use --cpu-smoke or nothing" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
STEPS="$OUT/steps.tsv"; : > "$STEPS"
t0=$(date +%s)

step() {  # step NAME COMMAND...: run it, its output to OUT/NAME.log (and the terminal), its status and seconds recorded
  local name=$1; shift; local t1; t1=$(date +%s)
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$([ "$rc" = 0 ] && echo passed || echo "failed (exit $rc)")" \
    "$(( $(date +%s) - t1 ))" "$*" >> "$STEPS"
  echo "== $name: exit $rc after $(( $(date +%s) - t1 )) s"
}

if [ "$MODE" = gpu ]; then
  DEVICE=cuda; PRESET=deit_small; IMAGES="4 16 4 256"  # classes, train and val images per class, px
  SEARCH=(--fit-images 32 --held-images 16 --score-images 16 --ft-steps 5 --batch-size 16 --final-batch-size 16)
  SPEED=(--device cuda --dtype bfloat16 --batches 1 64 256 --repeats 10 --runtimes eager ${COMPILE:+compile})
  WORKERS=2
else
  DEVICE=cpu; PRESET=tiny; IMAGES="3 8 2 32"  # a 32-px model of width 64 and depth 4
  SEARCH=(--fit-images 8 --held-images 4 --score-images 4 --ft-steps 1 --batch-size 4 --final-batch-size 4 --r-step 4)
  SPEED=(--weights "$TMP/model.pth" --batches 1 4 --repeats 1 --runtimes eager); WORKERS=0
fi

# the synthetic ImageFolder and the random checkpoint (release format: {"model": state_dict}, timm names)
"$PY" - "$TMP" "$PRESET" $IMAGES <<'EOF' || { echo "could not write the synthetic data" >&2; exit 1; }
import dataclasses, os, sys
import numpy as np, torch
from PIL import Image
sys.path.insert(0, os.getcwd())
import vit
tmp, preset, classes, n_train, n_val, px = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
rng = np.random.default_rng(0)
for split, n in (("train", n_train), ("val", n_val)):
    for c in range(classes):
        os.makedirs(f"{tmp}/data/{split}/class{c}")
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(f"{tmp}/data/{split}/class{c}/{i}.png")
base = vit.PRESETS["deit_small"] if preset == "deit_small" else vit.ViTConfig(
    img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
torch.manual_seed(0)
torch.save({"model": vit.VisionTransformer(dataclasses.replace(base, num_classes=classes)).state_dict()}, f"{tmp}/model.pth")
EOF
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

step cuda-tests "$PY" -m pytest -q -m cuda test_slim.py -p no:cacheprovider --junitxml "$OUT/cuda-tests.xml"
RUN=(slim.py --data folder --data-path "$TMP/data" --weights "$TMP/model.pth" --eps 0.02 --final-epochs 1
     --workers $WORKERS "${SEARCH[@]}" --device "$DEVICE")
step search "$PY" "${RUN[@]}" --out "$OUT/search"
if [ "$MODE" = gpu ] && [ "$GPUS" -ge 2 ]; then
  step torchrun "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 "${RUN[@]}" --out "$OUT/torchrun"
else
  echo "== torchrun: skipped"; printf 'torchrun\tskipped: %s GPU(s) here; 2 are needed for a 2-process NCCL run\t0\t\n' "$GPUS" >> "$STEPS"
fi
step speed "$PY" bench/speed.py "${SPEED[@]}" --out "$OUT/speed.json"

# one JSON of everything
"$PY" - "$OUT" "$MODE" "$(( $(date +%s) - t0 ))" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
sys.path.insert(0, os.getcwd())
from pipeline.distributed import machine
out, mode, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])


def read(path):
    path = os.path.join(out, path)
    return json.load(open(path)) if os.path.exists(path) else None


steps = {}
for line in open(os.path.join(out, "steps.tsv")):
    name, status, secs, command = line.rstrip("\n").split("\t")
    steps[name] = {"status": status, "seconds": int(secs), "command": command}
if os.path.exists(os.path.join(out, "cuda-tests.xml")):  # how each test pytest -m cuda collected ended
    steps["cuda-tests"]["cases"] = {c.get("name"): "skipped" if c.find("skipped") is not None else "failed" if
                                    c.find("failure") is not None or c.find("error") is not None else "passed"
                                    for c in ET.parse(os.path.join(out, "cuda-tests.xml")).getroot().iter("testcase")}
for name in ("search", "torchrun"):
    rep = read(f"{name}/report.json")
    if rep:
        steps[name].update({k: rep.get(k) for k in ("dense_top1", "searched_top1", "slimmed_top1", "dense_gflops",
                                                    "slimmed_gflops", "kept_per_layer", "processes", "wall_seconds")})
masks = [read(f"{n}/masks.json") for n in ("search", "torchrun")]
if all(masks):
    steps["torchrun"]["same_masks_as_one_process"] = masks[0]["keep"] == masks[1]["keep"]
speed = read("speed.json")
if speed:  # the whole run is in OUT/speed.json; here each speed-up beside the FLOPs ratio
    steps["speed"]["speedup"] = {t: {rt: {b: round(v["speedup"], 3) for b, v in by_b.items()}
                                     for rt, by_b in s["speedup"].items()} | {"flops_ratio": round(s["flops_ratio"], 3)}
                                 for t, s in speed["semantics"].items()}
failed = [n for n, s in steps.items() if s["status"].startswith("failed")]
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump({"mode": "cpu smoke" if mode == "--cpu-smoke" else "gpu", "seconds": seconds, "machine": machine(),
               "failed": failed, "steps": steps}, f, indent=1)
print(f"wrote {out}/gpu_check.json: {len(steps)} steps, " + (f"failed: {', '.join(failed)}" if failed else "none failed")
      + f", {seconds} s; speed-ups {steps['speed'].get('speedup')} (the paper, V100: 1.41x for a FLOPs ratio of 1.77)")
sys.exit(1 if failed else 0)
EOF
