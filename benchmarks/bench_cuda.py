"""The engine benchmarks on a CUDA GPU, plus the out-of-memory retry path. One prepared script:

    python benchmarks/bench_cuda.py            # exits 0 with a message when no CUDA GPU is at hand
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def oom_retry_check() -> None:
    """A full Jacobian whose first chunk is sized to overflow the free GPU memory: the chunk must halve."""
    from jacaudit.engine.core import full_jacobian, prepare

    free, total = torch.cuda.mem_get_info()
    n = 16384                                   # J is 1 GiB in float32
    # cap this process at ~3 GiB so that one chunk of all rows (basis + gradients, ~3 GiB more) cannot fit
    torch.cuda.set_per_process_memory_fraction(min(1.0, 3.2e9 / total))
    W = torch.randn(n, n, device="cuda") / n ** 0.5   # 1 GiB
    f = lambda z: torch.tanh(z @ W.T)  # noqa: E731
    x = torch.randn(1, n, device="cuda")
    t = prepare(f, x)
    t0 = time.perf_counter()
    J, info = full_jacobian(t, mode="reverse", max_memory="64GiB", limit_bytes=int(2 * 2 ** 30))
    torch.cuda.synchronize()
    y = torch.tanh(x @ W.T)                    # closed form: J = diag(1 - y^2) W
    err = float((J.reshape(n, n) - (1 - y.reshape(n, 1) ** 2) * W).abs().max())
    torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"[oom retry] J {tuple(J.shape)}: chunk {info.chunk_size}, {info.chunks} chunks, "
          f"{info.oom_retries} out-of-memory retries, {time.perf_counter() - t0:.2f} s, max err vs the closed form {err:.1e}")
    assert info.oom_retries >= 1, "the out-of-memory path did not run"


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to run")
        return 0
    print(torch.cuda.get_device_name(0))
    from benchmarks import bench_engine

    bench_engine.main(["--device", "cuda", "--reps", "5", "--threads", "4"])
    oom_retry_check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
