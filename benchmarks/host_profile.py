"""Where the host time of the Triton norm calls goes: cProfile of fused_norm forward + backward on a
tensor small enough that the GPU waits for the host (CUDA only).

    python3 -m benchmarks.host_profile
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from networks.triton_norm import _FusedNorm, fused_norm


def host_us(fn, reps: int = 300) -> float:
    """Microseconds a call of ``fn`` takes when the GPU waits for the host (after 50 warm-up calls)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


def main() -> None:
    a, b = (torch.randn(1, 8, 4, 4, 4, device="cuda").contiguous(memory_format=torch.channels_last_3d).requires_grad_() for _ in range(2))
    g = torch.randn_like(a)
    cases = {
        "two forward": lambda: fused_norm(a, b=b, slope=0.01),
        "two forward + backward": lambda: fused_norm(a, b=b, slope=0.01).backward(g),
        "act forward + backward": lambda: fused_norm(a, slope=0.01).backward(g),
        "two forward + autograd.grad": lambda: torch.autograd.grad(fused_norm(a, b=b, slope=0.01), (a, b), g),
        "F.instance_norm forward": lambda: F.instance_norm(a),
        "F.leaky_relu forward": lambda: F.leaky_relu(a, 0.01),
    }
    for label, fn in cases.items():
        print(f"{label}: {host_us(fn):.0f} us a call", flush=True)
    # forward and backward called directly on this thread (the autograd engine runs backward on its own,
    # where cProfile does not look), with a stand-in for the autograd context
    class Ctx:
        needs_input_grad = (True, False, False, True, False, False, False, False, False)

        def save_for_backward(self, *t):
            self.saved_tensors = t

    def direct():
        ctx = Ctx()
        with torch.no_grad():
            _FusedNorm.forward(ctx, a, None, None, b, None, None, None, 1e-5, 0.01)
            _FusedNorm.backward(ctx, g)

    print(f"direct forward + backward (no autograd): {host_us(direct):.0f} us a call", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        direct()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
