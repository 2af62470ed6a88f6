"""Seconds per training step of the small CNNs of jobs/fashion_mnist_cnn.yaml on the CPU, in the
default (NCHW) memory layout and channels-last, which the trainable uses for convolutional models.

    python benchmarks/cnn_layout.py [--steps 60] [--threads 1]

Random 28x28 one-channel batches (the timing does not depend on the pixels); Adam (fused), the
same model and batch for both layouts, measured alternately in the same process. Prints each time
and the ratio (default layout / channels-last; > 1 means channels-last is faster).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from hpsearch.models import cnn


def step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), fused=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}")
    for blocks, channels in ((2, 16), (2, 32), (3, 32)):
        for batch in (64, 128):
            torch.manual_seed(0)
            x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
            kw = dict(input_shape=(1, 28, 28), num_classes=10, conv_blocks=blocks, conv_channels=channels,
                      kernel_size=3, num_hidden_layers=1, neurons_per_layer=128, dropout_rate=0.3, batch_norm=True)
            nchw = step_time(cnn(**kw), x, y, args.steps)
            last = step_time(cnn(**kw).to(memory_format=torch.channels_last),
                             x.contiguous(memory_format=torch.channels_last), y, args.steps)
            print(f"cnn {blocks} blocks x {channels} ch, batch {batch:>3}: NCHW {1000 * nchw:6.1f} ms/step, "
                  f"channels-last {1000 * last:6.1f} ms/step, ratio {nchw / last:.2f}x")


if __name__ == "__main__":
    main()
