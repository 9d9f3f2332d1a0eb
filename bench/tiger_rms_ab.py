"""Interleaved A/B of Tiger's CPU step on the GPT-2 list (fp32, cpu backend, 2 threads).

    python -m bench.tiger_rms_ab [rounds]

Four optimizers on their own copies of the same params and grads take one step each per round,
in a rotated order: Tiger with the sums of squares cached by the previous write pass (the
steady step), the same with the kernel's windows switched off (one pre-pass over the whole
list, then one update pass: NOTE: [Tiger windows] in csrc/cpu/sign_cpu.cpp), Tiger told to
forget its sums before every step (θ read again for the RMS: the step before issue 15, and
every step after θ was changed outside the optimizer), and Lion; then Tiger and Lion as
GradScaler drives them (grad_scale 1 and found_inf 0 given: g is divided by the scale in the
kernels, and Tiger takes found_inf as its NaN count instead of reading g for the guard: NOTE:
[GradScaler's flag as the NaN guard] in sign_kernels/optim/tiger.py). Prints the median step
times and the medians of the per-round ratios.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

import sign_kernels

from .paramsets import gpt2_small


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in gpt2_small().tensors:
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g)
        out.append((name, p))
    return out


def main(rounds: int = 15) -> None:
    torch.set_num_threads(2)
    cached = sign_kernels.Tiger(_params(), backend="cpu")
    reread = sign_kernels.Tiger(_params(), backend="cpu")
    lion = sign_kernels.Lion([p for _, p in _params()], backend="cpu")
    unwindowed = sign_kernels.Tiger(_params(), backend="cpu")
    tiger_scaler = sign_kernels.Tiger(_params(), backend="cpu")
    lion_scaler = sign_kernels.Lion([p for _, p in _params()], backend="cpu")
    for opt in (tiger_scaler, lion_scaler):  # as GradScaler.step sets them (found_inf 0: a step it takes)
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    from sign_kernels import _C

    window = _C.cpu_tiger_window()

    def no_windows():
        _C.cpu_tiger_window(1 << 62)

    def windows():
        _C.cpu_tiger_window(window)

    steps = {"tiger-cached": (cached, None, None), "tiger-unwindowed": (unwindowed, no_windows, windows),
             "tiger-reread": (reread, reread.forget_rms, None), "lion": (lion, None, None),
             "tiger-scaler": (tiger_scaler, None, None), "lion-scaler": (lion_scaler, None, None)}
    for opt, before, after in steps.values():
        for _ in range(2):
            if before:
                before()
            opt.step()
            if after:
                after()
    ms = {k: [] for k in steps}
    keys = list(steps)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            opt, before, after = steps[k]
            if before:
                before()
            t0 = time.perf_counter()
            opt.step()
            ms[k].append((time.perf_counter() - t0) * 1e3)
            if after:
                after()

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(ms[a], ms[b]))

    print("median ms:", {k: round(statistics.median(v), 1) for k, v in ms.items()})
    print(f"per-round medians: cached/reread {ratio('tiger-cached', 'tiger-reread'):.3f}, "
          f"cached/lion {ratio('tiger-cached', 'lion'):.3f}, unwindowed/lion {ratio('tiger-unwindowed', 'lion'):.3f}, "
          f"reread/lion {ratio('tiger-reread', 'lion'):.3f}; under GradScaler: "
          f"tiger/lion {ratio('tiger-scaler', 'lion-scaler'):.3f}")
    print("load average at the end:", [round(x, 2) for x in os.getloadavg()])


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
