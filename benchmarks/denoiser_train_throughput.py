"""Training-step throughput of the tiny diffusion UNet (the cpu-scale denoiser) under fp32 and bf16 autocast.

The steps ``train-denoiser`` takes, reduced to the model: a batch of 64 CIFAR-sized images, random timesteps,
MSE loss, AdamW. The two precisions alternate twice in one process so that a drifting clock shows up as
disagreement between the repeats. Eager only (``--compile`` on the real trainer adds ≈ 1.2×, measured on AMX).
Compare the ratio, not the figures across machines.

Usage::

    PYTHONPATH=src python benchmarks/denoiser_train_throughput.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train_throughput import machine_line  # noqa: E402  (this script's folder is on sys.path)

from smoothtransfer.models.denoisers import create_diffusion_unet  # noqa: E402


def rate(amp: str, batch: int, steps: int) -> float:
    """Images/s of ``steps`` UNet training steps after 2 warm-up steps."""
    torch.manual_seed(0)
    unet = create_diffusion_unet(32, 3, "tiny")
    opt = torch.optim.AdamW(unet.parameters(), 2e-4)
    x, t = torch.rand(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
            out = unet(x, t).sample
        loss = F.mse_loss(out.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    rows = [(amp, rate(amp, args.batch_size, args.steps)) for amp in ("none", "bf16", "none", "bf16")]
    fp32 = sum(r for a, r in rows if a == "none") / 2
    print(f"tiny diffusion UNet training steps, batch {args.batch_size}, eager")
    print(f"{'amp':6s} {'images/s':>9s} {'ratio':>6s}")
    for amp, r in rows:
        print(f"{amp:6s} {r:9.1f} {r / fp32:6.2f}")


if __name__ == "__main__":
    main()
