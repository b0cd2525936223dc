#!/usr/bin/env bash
# A prepared GPU check of the patch-slimming reference implementation (Tang et al., CVPR 2022, arXiv 2106.02852):
# what a machine with an NVIDIA GPU runs from a checkout (sized for under 8 minutes; not yet run on one), with only
# torch, torchvision, timm and pytest installed (onnxruntime optional), with no dataset and no network. One
# JSON, OUT/gpu_check.json, and each step's log beside it (OUT/<step>.log).
#
#   bash bench/gpu_check.sh OUT               # on the GPU machine
#   bash bench/gpu_check.sh OUT --cpu-smoke   # the same steps on the CPU at tiny size (test_slim.py runs it)
#   COMPILE=1 bash bench/gpu_check.sh OUT     # also torch.compile in step 4 (9 graphs to compile: likely over 8 minutes)
#
# Steps (each timed; a failed step is recorded and the others still run; the exit status is 1 when one failed):
# 1. cuda-tests: the suite's CUDA tests (pytest -m cuda: the slimmed forward on CUDA equals the CPU's, fp32 and bf16;
#    the search's block fine-tune on CUDA);
# 2. search: a tiny search and final fine-tune, bfloat16 autocast, `python slim.py ... --device cuda`, on an
#    ImageFolder of random images written to a temp folder, with a random DeiT-S-shaped checkpoint (224 px);
# 3. torchrun: step 2 under torchrun, 2 processes, NCCL, when 2 GPUs are present (it must reach step 2's masks);
#    else skipped with a line saying so;
# 4. speed: bench/speed.py in bfloat16 at DeiT-S shapes, dense vs slimmed under both token semantics at batch 1, 64
#    and 256, each speed-up beside the paper's V100 figure (940 -> 1321 img/s, 1.41x).
# --cpu-smoke runs the same four steps on the CPU: a 32-px model of width 64 and depth 4, float32, a few images, batch
# 1 and 4, so that the script cannot rot unseen; step 1's tests skip there (no CUDA) and step 3 is skipped (no GPUs).
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
skip() {  # skip NAME REASON
  echo "== $1: skipped: $2"; printf '%s\tskipped: %s\t0\t\n' "$1" "$2" >> "$STEPS"
}

if [ "$MODE" = gpu ]; then
  DEVICE=cuda; DTYPE=bfloat16; PRESET=deit_small; IMG=224; IMAGES="4 16 4 256"  # classes, train and val per class, px
  SEARCH=(--fit-images 32 --held-images 16 --score-images 16 --ft-steps 5 --batch-size 16 --final-batch-size 16)
  SPEED=(--batches 1 64 256 --repeats 10 --runtimes eager ${COMPILE:+compile}); WORKERS=2
else
  DEVICE=cpu; DTYPE=float32; PRESET=tiny; IMG=32; IMAGES="3 8 2 32"
  SEARCH=(--fit-images 8 --held-images 4 --score-images 4 --ft-steps 1 --batch-size 4 --final-batch-size 4 --r-step 4)
  SPEED=(--batches 1 4 --repeats 1 --threads 1 --runtimes eager --no-timm --profile-calls 0); WORKERS=0
fi

# the synthetic ImageFolder and the random checkpoint (release format: {"model": state_dict}, timm names)
"$PY" - "$TMP" "$PRESET" $IMAGES <<'EOF' || { echo "could not write the synthetic data" >&2; exit 1; }
import os, sys
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
cfg = vit.ViTConfig(**{**vit.asdict(base), "num_classes": classes})
torch.manual_seed(0)
torch.save({"model": vit.VisionTransformer(cfg).state_dict()}, f"{tmp}/model.pth")
EOF
INFO=$("$PY" -c 'import torch; n = torch.cuda.device_count(); print(n, "GPU(s)", *(torch.cuda.get_device_name(i) for i in range(n)), "torch", torch.__version__, "CUDA", torch.version.cuda)')
GPUS=${INFO%% *}; echo "== $INFO"

# 1. the suite's CUDA tests (they skip without CUDA)
step cuda-tests "$PY" -m pytest -q -m cuda test_slim.py -p no:cacheprovider --junitxml "$OUT/cuda-tests.xml"

# 2. a tiny search and final fine-tune, bfloat16 autocast on CUDA (slim.py's --device cuda)
RUN=(slim.py --data folder --data-path "$TMP/data" --weights "$TMP/model.pth" --eps 0.02 --final-epochs 1
     --workers $WORKERS "${SEARCH[@]}" --device "$DEVICE")
step search "$PY" "${RUN[@]}" --out "$OUT/search"

# 3. the same under torchrun with 2 processes and NCCL
if [ "$MODE" = gpu ] && [ "$GPUS" -ge 2 ]; then
  step torchrun "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 "${RUN[@]}" --out "$OUT/torchrun"
else
  skip torchrun "$GPUS GPU(s) here; 2 are needed for a 2-process NCCL run"
fi

# 4. the speed bench: dense vs slimmed, both semantics, beside the paper's V100 figure
if [ "$MODE" = gpu ]; then
  step speed "$PY" bench/speed.py --device cuda --dtype bfloat16 "${SPEED[@]}" --out "$OUT/speed.json"
else
  step speed "$PY" bench/speed.py --weights "$TMP/model.pth" "${SPEED[@]}" --out "$OUT/speed.json"
fi

# one JSON of everything
"$PY" - "$OUT" "$MODE" "$(( $(date +%s) - t0 ))" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
sys.path.insert(0, os.getcwd())
from pipeline.distributed import machine
out, mode, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def read(path):
    try:
        with open(os.path.join(out, path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
steps = {}
for line in open(os.path.join(out, "steps.tsv")):
    name, status, secs, command = line.rstrip("\n").split("\t")
    steps[name] = {"status": status, "seconds": int(secs), "command": command}
if os.path.exists(os.path.join(out, "cuda-tests.xml")):
    suite = ET.parse(os.path.join(out, "cuda-tests.xml")).getroot().find("testsuite")
    steps["cuda-tests"]["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    steps["cuda-tests"]["cases"] = {c.get("name"): ("skipped" if c.find("skipped") is not None else "failed" if
                                    c.find("failure") is not None or c.find("error") is not None else "passed")
                                    for c in suite.iter("testcase")}
for name in ("search", "torchrun"):
    rep = read(f"{name}/report.json")
    if rep and name in steps:
        steps[name].update({k: rep.get(k) for k in ("dense_top1", "searched_top1", "slimmed_top1", "dense_gflops",
                                                    "slimmed_gflops", "kept_per_layer", "processes", "wall_seconds")})
masks = [read(f"{n}/masks.json") for n in ("search", "torchrun")]
if all(masks):
    steps["torchrun"]["same_masks_as_one_process"] = masks[0]["keep"] == masks[1]["keep"]
speed = read("speed.json")
if speed:
    steps["speed"]["file"] = os.path.join(out, "speed.json")
    steps["speed"]["speedup"] = {t: {rt: {b: round(v["speedup"], 3) for b, v in by_b.items()}
                                     for rt, by_b in s["speedup"].items()} | {"flops_ratio": round(s["flops_ratio"], 3)}
                                 for t, s in speed["semantics"].items()}
    steps["speed"]["rows"] = speed["rows"]
    steps["speed"]["paper_v100"] = speed["paper_v100"]
failed = [n for n, s in steps.items() if s["status"].startswith("failed")]
result = {"mode": "cpu smoke" if mode == "--cpu-smoke" else "gpu", "seconds": seconds, "machine": machine(),
          "failed": failed, "steps": steps}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=1)
print(f"wrote {os.path.join(out, 'gpu_check.json')}: {len(steps)} steps, "
      + (f"failed: {', '.join(failed)}" if failed else "none failed") + f", {seconds} s")
if "speed" in steps and speed:
    for t, s in steps["speed"]["speedup"].items():
        print(f"speed {t}: {s} (paper, V100: 940 -> 1321 img/s, 1.41x for a FLOPs ratio of 1.77)")
sys.exit(1 if failed else 0)
EOF
