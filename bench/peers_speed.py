"""
Real speed of ToMe, EViT, PPT and PiToMe beside patch slimming (arXiv 2106.02852; method.md §8) at DeiT-S shapes, each at the
paper's budget under its own exact count: images/s at batch 32 and batch-1 latency, timed interleaved in one run
(bench/speed.py's `interleaved`: one call of each model per round, so the machine's drift hits all alike), and the
ratio to dense. Random weights (timing does not depend on them; the peers' choices of tokens do not change their
counts). Patch slimming runs the paper's Fig. 5 pyramid, 2.66 G as the paper counts (it reports 2.6 G), frozen
patches (P1), patches scattered at random like real masks; ToMe (constant r), EViT (keep rate at layers 4, 7,
10), PPT (r at layers 4, 7, 10, its released DeiT-S threshold 7e-5; bench/ppt.py) and PiToMe (keep ratio, margin
0.75; bench/pitome.py) the setting closest at or below --gflops (bench/peers.py). PPT's cost per image depends on
whether it pools or prunes (the matching is skipped when it prunes); random weights decide it here.

Each method runs in PyTorch eager and under torch.compile (bench/speed.py's `compiled`: inductor, weights frozen
on the CPU), every model of both runtimes in the same rounds; each runtime's ratios are to its own dense model.

    python bench/peers_speed.py                  # DeiT-S, CPU, float32, 12 rounds: run it on a quiet machine
    python bench/peers_speed.py --repeats 3 --runtimes eager      # a quick check
Writes results/peers_speed_<model>_<device>_<dtype>.json (--out).
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flops  # noqa: E402
from pipeline.distributed import machine  # noqa: E402
import vit  # noqa: E402
import peers  # noqa: E402
import pitome  # noqa: E402
import ppt  # noqa: E402
from pipeline.export import StaticSlimmed  # noqa: E402
from speed import compiled, default_masks, interleaved  # noqa: E402
from common import write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser("Speed of ToMe, EViT, PPT and PiToMe beside patch slimming at the same GFLOPs")
    p.add_argument("--model", default="deit_small", choices=list(vit.PRESETS))
    p.add_argument("--gflops", type=float, default=2.6, help="the budget (the paper's PS-ViT DeiT-S: 2.6 of 4.6)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=12, help="rounds at --batch; batch 1 runs 5 times as many")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--runtimes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--out", default=None)
    peers.add_arguments(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = vit.deit(args.model).to(device, dtype).eval()
    cfg = model.cfg
    keep, masks = default_masks(cfg, "frozen", args.gflops)
    flags = peers.settings_from_args(args)
    peers.check_peer(peers.ToMe(**flags["tome"]), cfg), peers.check_peer(peers.EViT(**flags["evit"]), cfg)
    tome, evit = (peers.at_gflops(cfg, kind, args.gflops, **flags[kind]) for kind in ("tome", "evit"))
    rows = {  # name: (eager module, GFLOPs, setting, tokens per layer)
        "dense": (StaticSlimmed(model), flops.count_flops(cfg), "", flops.kept_counts(cfg)),
        "patch slimming": (StaticSlimmed(model, keep, "frozen"), flops.count_flops(cfg, keep),
                           masks + ", frozen (P1)", flops.kept_counts(cfg, keep)),
    }
    extra = (ppt.at_gflops(cfg, args.gflops, threshold=7e-5), pitome.at_gflops(cfg, args.gflops))
    for peer in (tome, evit) + extra:
        rows[type(peer).__name__] = (peers.PeerModel(model, peer), peers.peer_flops(cfg, peer), peer.describe(),
                                     [n for n, _ in peers.tokens_per_layer(cfg, peer)])
    fns = {(rt, name): row[0] if rt == "eager" else compiled(row[0], device)
           for rt in args.runtimes for name, row in rows.items()}
    with torch.inference_mode():  # every model of every runtime in the same rounds
        xb = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
        x1 = torch.randn(1, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
        tb, t1 = interleaved(fns, xb, args.repeats, device), interleaved(fns, x1, args.repeats * 5, device)
    res = {"command": " ".join(["python bench/peers_speed.py"] + sys.argv[1:]), "model": args.model,
           "device": args.device, "dtype": args.dtype, "batch": args.batch, "repeats": args.repeats,
           "machine": machine(), "target_gflops": args.gflops, "runtimes": {}}
    for rt in args.runtimes:
        dense_b, dense_1 = statistics.median(tb[rt, "dense"]), statistics.median(t1[rt, "dense"])
        for name, (_, macs, setting, tokens) in rows.items():
            b, one = statistics.median(tb[rt, name]), statistics.median(t1[rt, name])
            r = res["runtimes"].setdefault(rt, {})[name] = {
                "setting": setting, "tokens_per_layer": tokens, "gflops": macs / 1e9, "images_per_s": args.batch / b,
                "latency_ms_b1": 1000 * one, "speedup_batch": dense_b / b, "speedup_b1": dense_1 / one,
                "speedup_b1_paired": statistics.median(d / s for d, s in zip(t1[rt, "dense"], t1[rt, name])),
                "flops_ratio": flops.count_flops(cfg) / macs}
            print(f"{rt:8s} {name:15s} {r['gflops']:5.2f} G  {r['images_per_s']:8.1f} img/s (batch {args.batch}, "
                  f"{r['speedup_batch']:.2f}x)  {r['latency_ms_b1']:7.2f} ms batch 1 ({r['speedup_b1']:.2f}x, paired "
                  f"{r['speedup_b1_paired']:.2f}x)  {setting}", flush=True)
    out = args.out or os.path.join(ROOT, "results", f"peers_speed_{args.model}_{args.device}_{args.dtype}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    write_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except vit.UserError as e:
        sys.exit(f"error: {e}")
