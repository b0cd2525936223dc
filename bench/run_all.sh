#!/usr/bin/env bash
# Every benchmark behind the README's report, from scratch, on the ../shared CIFAR-10 proxy and random-weight
# DeiT-S; each writes its files under results/ and prints the numbers. About 100 min on a 2-core CPU
# (the accuracy-vs-FLOPs curve is most of it, then the linear pyramid's final fine-tune). Set-up: pip install -r requirements-bench.txt
#
#   bash bench/run_all.sh            # everything
#   EPS="0.2 0.4" bash bench/run_all.sh   # fewer eps values: a shorter curve
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { echo; echo "== $* ($(( ($(date +%s) - t0) / 60 )) min in)"; "$@"; }

# 1. accuracy vs FLOPs: patch slimming at several eps against random / class-attention masks with the same
#    kept counts and fine-tuning budget, and all three without fine-tuning -> results/curve.{json,md,png}
step python bench/curve.py --eps ${EPS:-0.1 0.15 0.2 0.3 0.4}
# 2. real speed: DeiT-S 224 px with a 2.6-GFLOPs pyramid (the paper's PS-ViT budget), and the proxy's masks
step python bench/speed.py --repeats 20
step python bench/speed.py --repeats 10 --threads 1 --no-timm --out results/speed_deit_small_cpu_float32_1thread.json
step python bench/speed.py --weights ../shared/models/deit_tiny_p4_cifar10.pth \
    --masks results/cifar10-proxy/masks.json --batch 256 --repeats 20
step python bench/gemm.py   # why batch-1 gains less: GEMM rates, per-block excess over FLOPs, thread scaling
# 3. the kept-patch pyramid over images, from the proxy run's masks -> results/pyramid_picture.{png,json}
step python bench/picture.py
# 4. the linear pyramid chosen by the score, no fine-tuning, at the proxy run's FLOPs and at 40% / 50% fewer
step python bench/pyramid.py --gflops-of results/cifar10-proxy/report.json --reduction 0.4 0.5
#    and at the proxy run's FLOPs with the same 2-epoch final fine-tune as the headline run (about 28 min)
step python bench/pyramid.py --gflops-of results/cifar10-proxy/report.json --final-epochs 2 --final-lr 3e-4
# 5. score quality: Spearman of each score against the true impact, per layer -> results/score_quality.json
step python bench/quality.py
echo; echo "== done in $(( ($(date +%s) - t0) / 60 )) min"
