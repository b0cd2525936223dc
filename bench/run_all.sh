#!/usr/bin/env bash
# Every result the documents cite, from scratch (docs/reproducing.md), then: python bench/report.py
#   bash bench/run_all.sh                      # everything; EPS="0.002 0.02" for fewer eps values in Fig. 4
#   RESUME=1 bash bench/run_all.sh             # continue an interrupted run (else each step first deletes its files)
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
failed=()
step() {
  local t1; t1=$(date +%s); echo; echo "== $* ($(( (t1 - t0) / 60 )) min in)"
  if "$@"; then echo "== took $(( $(date +%s) - t1 )) s: $*"; else echo "== FAILED: $*"; failed+=("$*"); fi
}
fresh() { if [ -z "${RESUME:-}" ]; then rm -rf "$@"; fi; }
PY=${PYTHON:-python3}  # the interpreter: $PYTHON, else python3 on PATH
R=results
RUN=("$PY" slim.py --data cifar10 --final-epochs 1 --final-lr 3e-4)  # the README's first command

# the headline (the README's first command) on two seeds, and the same with the fast path
fresh $R/cifar10-proxy $R/cifar10-proxy-seed1 $R/cifar10-proxy-fast
step "${RUN[@]}" --out $R/cifar10-proxy
step "${RUN[@]}" --out $R/cifar10-proxy-seed1 --seed 1
step "${RUN[@]}" --out $R/cifar10-proxy-fast --search fast
# Fig. 4, Fig. 5, Figs. 6 and 7, Table 3 (docs/results.md)
fresh $R/fig4 $R/fig4.json $R/fig4.png $R/fig4_predictions.npz $R/table3_headline.json $R/table3_headline_predictions.npz
step "$PY" bench/eps_sweep.py --eps ${EPS:-0.001 0.002 0.005 0.02} --final-epochs 0.25
step "$PY" bench/picture.py --masks $R/cifar10-proxy/masks.json --out $R/fig5_picture
step "$PY" bench/single_layer.py --figure 6
step "$PY" bench/single_layer.py --figure 7
step "$PY" bench/table3.py --reference $R/cifar10-proxy $R/cifar10-proxy-seed1 --seeds 0 1 --out $R/table3_headline
# real speed in every runtime (docs/speed.md) and the ImageNet estimate (docs/imagenet.md)
step "$PY" bench/speed.py
step "$PY" bench/imagenet_estimate.py
# ToMe, EViT, PPT and PiToMe (docs/peers.md): settings selected on held-out training images, then the old protocol's rows
fresh $R/peers_selection.json $R/peers.json $R/peers_predictions.npz $R/peers_speed_deit_small_cpu_float32.json
step "$PY" bench/peers_select.py
step "$PY" bench/peers_compare.py
step "$PY" bench/peers_select.py --finetune --seeds 0 1
step "$PY" bench/peers_speed.py
# DPS-ViT against PS-ViT (docs/dynamic.md)
fresh $R/dynamic $R/dynamic.json $R/dynamic_predictions.npz $R/dynamic_picture.png
step "$PY" bench/dynamic.py --static $R/cifar10-proxy $R/cifar10-proxy-seed1 --seeds 0 1
echo; echo "== done in $(( ($(date +%s) - t0) / 60 )) min"
if [ ${#failed[@]} -gt 0 ]; then printf '== FAILED: %s\n' "${failed[@]}"; exit 1; fi
