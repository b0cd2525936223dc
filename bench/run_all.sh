#!/usr/bin/env bash
# Every benchmark behind the README's report, from scratch, on the ../shared CIFAR-10 proxy and random-weight
# DeiT-S; each writes its files under results/ and prints the numbers. Set-up: pip install -r requirements-bench.txt
#
#   bash bench/run_all.sh            # the paper's configuration (METHOD.md v3): every number of the report's main part
#   bash bench/run_all.sh fast-path  # the results made when the fast path was the default (results/fast-path/)
#   bash bench/run_all.sh v1         # the v1 variant's results (tokens removed, head-mean score, final-feature error)
#   EPS="0.001 0.003 0.005 0.02" bash bench/run_all.sh   # fewer eps values in Fig. 4: shorter, no baseline lost
#   RESUME=1 bash bench/run_all.sh   # continue an interrupted run: each step resumes from the files it has written
#
# Without RESUME each step first deletes the files it writes (the committed results included), so that nothing is
# read back from an earlier run or an earlier version of the code: the bench scripts skip points whose files exist.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
failed=()
step() {  # one step, timed; a failed step is reported at the end and the others still run
  local t1; t1=$(date +%s); echo; echo "== $* ($(( (t1 - t0) / 60 )) min in)"
  if "$@"; then echo "== took $(( $(date +%s) - t1 )) s: $*"; else echo "== FAILED: $*"; failed+=("$*"); fi
}
fresh() { if [ -z "${RESUME:-}" ]; then rm -rf "$@"; fi; }
W=../shared/models/deit_tiny_p4_cifar10.pth
D=../shared/data/cifar10
R=results

if [ "${1:-}" = "" ]; then
  # 1. the headline run (the README's first command: Alg. 1 as written, eps 0.002) and its second seed
  fresh $R/cifar10-proxy $R/cifar10-proxy-seed1
  step python slim.py --data folder --data-path $D --weights $W --out $R/cifar10-proxy --final-epochs 1 --final-lr 3e-4
  step python slim.py --data folder --data-path $D --weights $W --out $R/cifar10-proxy-seed1 --final-epochs 1 --final-lr 3e-4 --seed 1
  # 2. the fast path beside it: the same command with --search fast
  fresh $R/cifar10-proxy-fast
  step python slim.py --data folder --data-path $D --weights $W --out $R/cifar10-proxy-fast --final-epochs 1 --final-lr 3e-4 --search fast
  # 3. Fig. 4: eps against FLOPs saved and top-1, each point with the same (short) final fine-tune
  fresh $R/fig4 $R/fig4.json $R/fig4.md $R/fig4.png $R/fig4_predictions.npz
  step python bench/eps_sweep.py --eps ${EPS:-0.001 0.002 0.005 0.02} --final-epochs 0.25
  # 4. Fig. 5: the headline's kept patches over val images
  step python bench/picture.py --masks $R/cifar10-proxy/masks.json --out $R/fig5_picture
  # 5. Fig. 6 and Fig. 7: one layer pruned alone, no fine-tuning (no search: the same under either loop)
  step python bench/single_layer.py --figure 6
  step python bench/single_layer.py --figure 7
  # 6. Table 3: the learned pyramid against uniform and linear pruning at its FLOPs, the same one-epoch fine-tune,
  #    on the headline's two seeds
  fresh $R/table3_headline.json $R/table3_headline_predictions.npz
  step python bench/table3.py --reference $R/cifar10-proxy $R/cifar10-proxy-seed1 --seeds 0 1 --out $R/table3_headline
  # 7. real speed, both token semantics at the paper's budget (DeiT-S, random weights), in every runtime
  step python bench/speed.py
  # 8. each stage's time at DeiT-S shapes on this machine, and the labelled ImageNet estimate
  step python bench/imagenet_estimate.py
  # 9. ToMe and EViT beside patch slimming at three budgets: off the shelf, after the headline's fine-tune on its two
  #    seeds, and real speed at DeiT-S shapes (docs/peers.md)
  fresh $R/peers.json $R/peers_predictions.npz $R/peers_speed_deit_small_cpu_float32.json
  step python bench/peers_compare.py
  step python bench/peers_compare.py --finetune --seeds 0 1
  step python bench/peers_speed.py
  # 10. DPS-ViT from the two headline runs, against PS-ViT after the same total fine-tuning (docs/dynamic.md)
  fresh $R/dynamic $R/dynamic.json $R/dynamic_predictions.npz $R/dynamic_picture.png
  step python bench/dynamic.py --static $R/cifar10-proxy $R/cifar10-proxy-seed1 --seeds 0 1
elif [ "$1" = "fast-path" ]; then
  # the results made when the fast path was the default (eps 0.003, --search fast): results/fast-path/
  F=$R/fast-path
  fresh $F/cifar10-proxy $F/cifar10-proxy-seed1 $F/pyramid-attempts $F/literal-eps0.003
  step python slim.py --data folder --data-path $D --weights $W --out $F/cifar10-proxy --eps 0.003 --search fast --final-epochs 1 --final-lr 3e-4
  step python slim.py --data folder --data-path $D --weights $W --out $F/cifar10-proxy-seed1 --eps 0.003 --search fast --final-epochs 1 --final-lr 3e-4 --seed 1
  step bash bench/pyramid_attempts.sh
  step python slim.py --data folder --data-path $D --weights $W --out $F/literal-eps0.003 --eps 0.003 --search alg1
  fresh $F/fig4 $F/fig4.json $F/fig4.md $F/fig4.png $F/fig4_predictions.npz \
      $F/table3_headline.json $F/table3_headline_predictions.npz
  step python bench/eps_sweep.py --eps ${EPS:-0.001 0.002 0.003 0.005 0.02} --final-epochs 0.25 --search fast --out $F/fig4
  step python bench/picture.py --masks $F/cifar10-proxy/masks.json --out $F/fig5_picture
  step python bench/table3.py --reference $F/cifar10-proxy $F/cifar10-proxy-seed1 --seeds 0 1 --out $F/table3_headline
elif [ "$1" = "v1" ]; then
  # the v1 variant (tokens removed, head-mean score, final-feature error): the results/ files marked so
  fresh $R/cifar10-proxy-v1 $R/curve $R/curve.json $R/curve.md $R/curve.png
  step python slim.py --data folder --data-path $D --weights $W --out $R/cifar10-proxy-v1 --final-epochs 2 \
      --final-lr 3e-4 --quality-images 128 --tokens removed --score head-mean --error final
  step python bench/curve.py --eps ${EPS:-0.1 0.15 0.2 0.3 0.4}
  # the v1 speed files docs/speed.md cites were made by bench/speed.py before it timed every runtime; these two
  # remeasure them with today's bench (eager and packed, its format) beside them
  step python bench/speed.py --repeats 10 --threads 1 --no-timm --tokens removed --runtimes eager packed --out $R/speed_runtimes_deit_small_cpu_float32_1thread.json
  step python bench/speed.py --weights $W --masks $R/cifar10-proxy-v1/masks.json --batches 1 256 --repeats 20 --runtimes eager packed
  step python bench/gemm.py
  step python bench/picture.py --masks $R/cifar10-proxy-v1/masks.json
  step python bench/pyramid.py --gflops-of $R/cifar10-proxy-v1/report.json --reduction 0.4 0.5
  step python bench/pyramid.py --gflops-of $R/cifar10-proxy-v1/report.json --final-epochs 2 --final-lr 3e-4
  step python bench/quality.py
else
  echo "usage: bash bench/run_all.sh [fast-path|v1]   (RESUME=1 to continue an interrupted run; EPS=\"...\" for Fig. 4)" >&2
  exit 2
fi
echo; echo "== done in $(( ($(date +%s) - t0) / 60 )) min"
if [ ${#failed[@]} -gt 0 ]; then printf '== FAILED: %s\n' "${failed[@]}"; exit 1; fi
