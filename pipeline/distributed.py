"""
Data parallelism for slim.py (patch slimming, arXiv 2106.02852) with torch.distributed, launched by torchrun:

    torchrun --nproc_per_node 8 slim.py --data imagenet --data-path DIR      # K = 8 processes, one GPU each
    python slim.py ...                                                        # K = 1: no process group at all

gloo on the CPU, NCCL on CUDA. How each stage splits its work over the K processes (ranks):
- caching, scores and the error E (slim.py): image i of the fit or held sample belongs to rank i mod K. Each rank
  caches only its own images (the cache memory per rank falls K-fold, which is what makes DeiT-S/B caches fit),
  and score and error sums are all-reduced. Every rank then holds the same numbers and takes the same decision.
- the block fine-tunes of the search and DPS-ViT's predictor fit (data_parallel_steps): every rank draws the same
  global batch of image numbers (one generator, seeded alike), computes the loss of the images it owns (summed and
  divided by the global batch size) and the gradients are all-reduced (summed). The step is the one-process step up
  to float rounding, so K processes choose the masks one process chooses. Splitting rather than "rank 0 decides and broadcasts": rank 0 alone would
  need the whole cache (8.5 GB for DeiT-S in bfloat16) and do all the work while the others wait.
- the final fine-tune: DistributedDataParallel with a DistributedSampler (finetune.py).
- evaluation: rank r predicts val images r, r+K, ...; the predictions are gathered back into val order, so every
  image counts exactly once (no padding) (evaluate.py).
Only rank 0 writes files and logs.
"""
import os
import platform
import re
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

from vit import UserError


def setup(device_arg):
    """Join the process group when torchrun started this process (WORLD_SIZE > 1). Returns the device of this rank:
    cuda:LOCAL_RANK for a CUDA run, else the CPU."""
    check_device(device_arg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device_arg.startswith("cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else
                              torch.device(device_arg).index or 0)
        torch.cuda.set_device(device)
        return device
    return torch.device(device_arg)


def check_device(device_arg):
    """A one-line error for a --device this machine does not have (before torch.cuda raises deep inside)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device_arg):
        raise UserError(f"--device {device_arg} is not a device slim.py runs on: use cpu, cuda or cuda:N")
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device_arg} but CUDA is not available here: use --device cpu")
    if ":" in device_arg and int(device_arg.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"--device {device_arg} but this machine has {torch.cuda.device_count()} GPU(s): use "
                        f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def progress(*args, **kwargs):
    """A tqdm bar on a terminal, drawn by rank 0 only; none in log files or CI."""
    return tqdm(*args, leave=False, disable=None if is_main() else True, **kwargs)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size():
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main():
    return rank() == 0


def all_reduce_sum(t):
    """t summed over ranks, in place (t itself when there is one process). NCCL reduces only CUDA tensors: a CPU
    tensor (the error and score sums) travels through the GPU."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            on_gpu = t.cuda()
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t)
    return t


def all_gather(obj):
    """The list of obj of every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_state(module):
    """Every rank takes rank 0's parameters and buffers (a guard: they are equal already when all went well)."""
    if dist.is_initialized():
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shard(n):
    """The positions 0..n-1 this rank owns: r, r+K, r+2K, ..."""
    return list(range(rank(), n, world_size()))


def data_parallel_steps(loss_of, opt, sched, steps, positions, batch_size, seed, desc=""):
    """`steps` steps of optimiser opt (then of its scheduler sched) on a sample of images split over the ranks
    (positions: the sorted numbers of this rank's images in the sample), each the step one process takes, up to float
    rounding. Every rank draws the same min(batch_size, sample size) image numbers (with repeats) from one generator
    seeded with seed; loss_of(mine), mine the indices into this rank's share of the drawn images it holds (repeats
    included; every drawn image with one process), returns their summed loss (called only when mine is not empty).
    It is divided by the batch size and backpropagated, and the gradients are summed over the ranks before the step.
    A loss that is not finite on any rank raises FloatingPointError on every rank, before that step. Returns each
    step's loss, summed over the ranks (the batch mean)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    g = torch.Generator().manual_seed(seed)
    everyone = torch.cat(all_gather(positions)).sort().values  # the whole sample's image numbers
    losses = []
    for _ in progress(range(steps), desc=desc):
        size = min(batch_size, len(everyone))
        chosen = everyone[torch.randint(0, len(everyone), (size,), generator=g)]
        where = torch.searchsorted(positions, chosen).clamp_max(max(0, len(positions) - 1))
        mine = where[positions[where] == chosen] if len(positions) else where[:0]  # the drawn images this rank holds
        opt.zero_grad(set_to_none=False)
        loss = loss_of(mine) / size if len(mine) else torch.zeros(())
        finite = bool(torch.isfinite(loss))
        if finite and len(mine):
            loss.backward()
        total = all_reduce_sum(torch.tensor([loss.item() if finite else 0.0, float(not finite)]))
        if total[1] > 0:  # every rank stops, not one
            raise FloatingPointError(f"a non-finite loss at step {len(losses)}")
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad)
        opt.step()
        sched.step()
        losses.append(total[0].item())
    return losses


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def cpu_model():
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """What results files record of the machine they were made on."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
            "arch": platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
