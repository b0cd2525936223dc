#!/usr/bin/env bash
# Every benchmark behind the README's report, from scratch, on the ../shared CIFAR-10 proxy and random-weight
# DeiT-S; each writes its files under results/ and prints the numbers. Set-up: pip install -r requirements-bench.txt
#
#   bash bench/run_all.sh            # the paper's configuration (METHOD.md v2), speed, the ImageNet estimate
#   bash bench/run_all.sh extra      # Table 3 on the headline's two seeds, the pyramid attempts, the literal loop
#   bash bench/run_all.sh v1         # the v1 variant's committed results (tokens removed): about 97 min
#   EPS="0.002 0.003 0.02" bash bench/run_all.sh   # fewer eps values in Fig. 4: shorter
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { echo; echo "== $* ($(( ($(date +%s) - t0) / 60 )) min in)"; "$@"; }
W=../shared/models/deit_tiny_p4_cifar10.pth
D=../shared/data/cifar10

if [ "${1:-}" = "extra" ]; then
  # Table 3 with the headline's two seeds (1-epoch fine-tunes; needs the headline folders of the default tier)
  step python bench/table3.py --reference results/cifar10-proxy results/cifar10-proxy-seed1 --seeds 0 1 --out results/table3_headline
  # the pyramid criterion: what the search gives with finer r', longer or faster block fine-tunes, more reach
  step bash bench/pyramid_attempts.sh
  # Alg. 1's loop as written, for comparison with the fast path (no final fine-tune)
  step python slim.py --data folder --data-path $D --weights $W --out results/cifar10-proxy-literal --eps 0.003 --literal
elif [ "${1:-}" != "v1" ]; then
  # 1. the headline run (the README's first command) and its second seed
  step python slim.py --data folder --data-path $D --weights $W --out results/cifar10-proxy --eps 0.003 --final-epochs 1 --final-lr 3e-4
  step python slim.py --data folder --data-path $D --weights $W --out results/cifar10-proxy-seed1 --eps 0.003 --final-epochs 1 --final-lr 3e-4 --seed 1
  # 2. Fig. 4: eps against FLOPs saved and top-1, each point with the same (short) final fine-tune
  step python bench/eps_sweep.py --eps ${EPS:-0.001 0.002 0.003 0.005 0.02} --final-epochs 0.25
  # 3. Fig. 5: the headline's kept patches over val images
  step python bench/picture.py --masks results/cifar10-proxy/masks.json --out results/fig5_picture
  # 4. Fig. 6 and Fig. 7: one layer pruned alone, no fine-tuning
  step python bench/single_layer.py --figure 6
  step python bench/single_layer.py --figure 7
  # 5. Table 3: the learned pyramid against uniform and linear pruning at its FLOPs, the same fine-tune: Fig. 4's
  #    eps = 0.003 point (0.25-epoch fine-tune, seed 0)
  #    (the headline's two seeds: bash bench/run_all.sh extra)
  step python bench/table3.py --fig4-eps 0.003 --seeds 0
  # 6. real speed, both token semantics at the paper's budget (DeiT-S, random weights)
  step python bench/speed.py --repeats 12
  # 7. each stage's time at DeiT-S shapes on this machine, and the labelled ImageNet estimate
  step python bench/imagenet_estimate.py
else
  # the v1 variant (tokens removed, head-mean score, final-feature error): the committed results/ files marked so
  step python slim.py --data folder --data-path $D --weights $W --out results/cifar10-proxy-v1 --final-epochs 2 \
      --final-lr 3e-4 --quality-images 128 --tokens removed --score head-mean --error final
  step python bench/curve.py --eps ${EPS:-0.1 0.15 0.2 0.3 0.4}
  step python bench/speed.py --repeats 10 --threads 1 --no-timm --tokens removed --out results/speed_deit_small_cpu_float32_1thread.json
  step python bench/speed.py --weights $W --masks results/cifar10-proxy-v1/masks.json --batch 256 --repeats 20
  step python bench/gemm.py
  step python bench/picture.py --masks results/cifar10-proxy-v1/masks.json
  step python bench/pyramid.py --gflops-of results/cifar10-proxy-v1/report.json --reduction 0.4 0.5
  step python bench/pyramid.py --gflops-of results/cifar10-proxy-v1/report.json --final-epochs 2 --final-lr 3e-4
  step python bench/quality.py
fi
echo; echo "== done in $(( ($(date +%s) - t0) / 60 )) min"
