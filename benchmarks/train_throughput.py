"""Training throughput of every registered SAE architecture, beside what the machine's matmuls could do.

One training step = what `saeflow.sae.training.trainer.SAETrainer.step` does for one SAE, minus its logging: loss
forward, backward, parallel-gradient removal, gradient clipping, Adam, decoder renormalisation. For each
architecture we print tokens/s next to
(a) the machine's dense matmul rate, measured in the same run on a [B, d_in] × [d_in, d_sae] torch.mm (fp32, or
    bf16 where the step runs under bf16 autocast, as SAETrainer does on CUDA);
(b) the FLOP floor of a dense SAE step, ≈ 12·d_in·d_sae per token (encoder and decoder matmuls forward, twice that
    backward), and the implied MFU = 12·d_in·d_sae·tokens/s ÷ the measured matmul rate. A sparse TopK decoder does
    fewer FLOPs than that floor (its decoder costs O(k·d_in)), so its "MFU" is a speed relative to the dense floor
    and may pass 100%;
(c) TopK with the dense and the sparse decoder (sae/architectures/kernels.py), and the speed-up.

    .venv/bin/python benchmarks/train_throughput.py                      # CPU defaults, ~2 minutes on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --d-in 2304 --d-sae 65536 --batch 4096 --k 64   # a GPU
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from saeflow.sae import ARCHITECTURES, SAE, TrainState, build_sae
from saeflow.sae.device import pick_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=512, help="input width d_in")
    p.add_argument("--d-sae", type=int, default=8192, help="number of latents d_sae")
    p.add_argument("--batch", type=int, default=1024, help="rows (tokens) per training step")
    p.add_argument("--k", type=int, default=32, help="k for topk / batchtopk / matryoshka")
    p.add_argument("--archs", nargs="*", default=None, help="architectures to time (default: all registered)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (allocator, BLAS, autotune)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per architecture; the fastest is reported")
    p.add_argument(
        "--dead-fraction",
        type=float,
        default=0.0,
        help="fraction of latents marked dead, so AuxK runs (0 = no AuxK cost)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda > mps > cpu)")
    p.add_argument(
        "--autocast",
        choices=["auto", "off", "bf16"],
        default="auto",
        help="mixed precision for the loss, as SAETrainer: auto = bf16 on CUDA, off elsewhere",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, reps: int):
    """Best seconds per call of each function, timed in turn (a, b, c, a, b, c, ...) after `warmup` calls each.

    Round-robin so every function sees the same background load, and the minimum rather than the mean or median:
    on a shared machine other processes only ever add time, so the fastest call is the closest to the real cost
    (on a dedicated GPU the two agree). The GPU is synchronised around each timed call.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def matmul_fn(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
    """One dense [B, d_in] × [d_in, d_sae] matmul, the step's dominant shape, in the dtype its matmuls use."""
    a = torch.randn(args.batch, args.d_in, device=device, dtype=dtype)
    b = torch.randn(args.d_in, args.d_sae, device=device, dtype=dtype)
    out = torch.empty(args.batch, args.d_sae, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def make_sae(arch: str, args: argparse.Namespace, device: torch.device) -> SAE:
    cfg: dict = {"architecture": arch, "d_sae": args.d_sae}
    if "k" in ARCHITECTURES[arch].config_class.model_fields:
        cfg["k"] = args.k
    return build_sae(cfg, args.d_in).to(device).train()


def train_step_fn(sae: SAE, x: torch.Tensor, dead: torch.Tensor, amp: torch.dtype | None) -> Callable[[], object]:
    """A closure running one optimizer step (as SAETrainer.step does); returns the batch L0 as a device tensor."""
    opt = torch.optim.Adam(sae.parameters(), lr=sae.cfg.learning_rate(sae.d_sae), betas=sae.cfg.adam_betas)
    state = TrainState(0.5, dead)  # mid-training: sparsity warm-ups are over

    def step() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            out = sae.loss(x, state)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grads()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder()
        return (out.f > 0).sum(-1).float().mean()  # stays on the device: no host sync inside the timed step

    return step


def step_for(arch: str, args, device, x, dead, amp, decode_impl: str | None = None) -> Callable[[], torch.Tensor]:
    torch.manual_seed(0)
    sae = make_sae(arch, args, device)
    if decode_impl is not None:
        sae.decode_impl = decode_impl  # TopKSAE's training decoder switch (sae/architectures/kernels.py)
    return train_step_fn(sae, x, dead, amp)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    archs = args.archs or sorted(ARCHITECTURES)
    unknown = set(archs) - set(ARCHITECTURES)
    if unknown:
        raise SystemExit(f"unknown architectures {sorted(unknown)}; registered: {sorted(ARCHITECTURES)}")
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(
        f"# torch {torch.__version__} on {device} ({hw}); d_in={args.d_in} d_sae={args.d_sae} "
        f"batch={args.batch} k={args.k} dead_fraction={args.dead_fraction} warmup={args.warmup} reps={args.reps}"
    )

    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if device.type == "cpu" and torch.get_num_threads() > 1 and load > cores:
        # Measured here: with other processes on the cores, OpenMP threads wait on each other and single steps
        # take 2–4× longer at random; one thread gives stable, comparable rows.
        print(f"# note: load average {load:.1f} on {cores} cores; for stable numbers use --threads 1")
    use_bf16 = args.autocast == "bf16" or (args.autocast == "auto" and device.type == "cuda")
    amp = torch.bfloat16 if use_bf16 else None
    mm = matmul_fn(args, device, amp or torch.float32)
    floor = 12 * args.d_in * args.d_sae  # FLOP per token of a dense step

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, args.d_in, generator=g)).to(device)
    dead = (torch.rand(args.d_sae, generator=g) < args.dead_fraction).to(device)

    steps = {arch: step_for(arch, args, device, x, dead, amp) for arch in archs}
    if "topk" in archs:  # the same TopK twice more, forcing each decoder (sae/architectures/kernels.py)
        steps["topk, dense decoder"] = step_for("topk", args, device, x, dead, amp, "dense")
        steps["topk, sparse decoder"] = step_for("topk", args, device, x, dead, amp, "sparse")
    print(f"# timing {len(steps)} training steps and one matmul, {args.reps} rounds ...", file=sys.stderr, flush=True)
    best = time_round_robin({"matmul": mm, **steps}, device, args.warmup, args.reps)
    peak = 2 * args.batch * args.d_in * args.d_sae / best.pop("matmul")
    shape = f"[{args.batch}x{args.d_in}]@[{args.d_in}x{args.d_sae}]"
    print(
        f"# dense {'bf16' if amp else 'fp32'} matmul {shape}: {peak / 1e9:.1f} GFLOP/s; "
        f"FLOP floor {floor / 1e6:.1f} MFLOP/token -> at most {peak / floor:,.0f} tokens/s\n"
    )

    header = f"| {'architecture':<20} | {'tokens/s':>10} | {'ms/step':>8} | {'L0':>7} | {'MFU vs floor':>12} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    tps = {name: args.batch / seconds for name, seconds in best.items()}
    for name, step in steps.items():
        l0 = float(step())  # one more step, untimed, for the L0 it trains at
        print(
            f"| {name:<20} | {tps[name]:>10,.0f} | {1e3 * best[name]:>8.1f} | {l0:>7.1f} | "
            f"{floor * tps[name] / peak:>11.1%} |"
        )
    if "topk" in archs:
        dense, sparse = tps["topk, dense decoder"], tps["topk, sparse decoder"]
        print(
            f"\nTopK decoder (k={args.k}, d_sae={args.d_sae}): dense {dense:,.0f} tokens/s, "
            f"sparse {sparse:,.0f} tokens/s, speed-up x{sparse / dense:.2f}"
        )


if __name__ == "__main__":
    main()
