#!/usr/bin/env bash
# Issue 10's pyramid criterion (no step between layers 1..11 drops more than 35% of the tokens): the search alone
# (no final fine-tune) at the headline eps = 0.003 with the knobs the issue names: finer r' (r0 = 1), more
# fine-tuning steps, a larger fine-tuning learning rate, and more reach (--ft-reach 3). Made with the fast path
# (--search fast), the default when they ran; each run writes results/fast-path/pyramid-attempts/<name>/
# (report.json, masks.json, log.txt, predictions.npz). Its defaults' search is results/fast-path/cifar10-proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
A="--data folder --data-path ../shared/data/cifar10 --weights ../shared/models/deit_tiny_p4_cifar10.pth --eps 0.003 --search fast"
for run in "r0-1:--r0 1" "ft-steps-300:--ft-steps 300" "ft-lr-3e-3:--ft-lr 3e-3" "ft-reach-3:--ft-reach 3"; do
  name=${run%%:*}; flags=${run#*:}
  python slim.py $A $flags --out results/fast-path/pyramid-attempts/$name | tail -1
done
