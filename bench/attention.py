"""Attention speed: our fused kernel against PyTorch's SDPA backends, forward and forward+backward.

    python bench/attention.py                                  # bf16, N = 1k to 16k, head dims 64 and 128
    python bench/attention.py --seqlens 2048 8192 --head-dims 128 --modes fwd

Compared, on the same inputs: ours (the emu::flash_attention op of emu/models/fused_attention.py, which
builds the CUDA extension on first use), and PyTorch's scaled_dot_product_attention held to one backend
at a time with torch.nn.attention.sdpa_kernel: flash, memory-efficient and math. Each is printed in
TFLOP/s, and ours also as a ratio to SDPA-flash. A backend that cannot run a shape (not supported, out
of memory) shows "-". No mask, no causal masking.

The shapes follow flash-attention's benchmark: for sequence length N and head dim D, a batch of
B = --tokens / N sequences of H = --width / D heads, so every row does about the same work per token.

FLOPs follow flash-attention's convention: the forward is two matmuls per head, Q K^T and P V, of
2 N^2 D each, so 4 B H N^2 D; the backward is five such matmuls (recomputing S, then dV, dP, dQ,
dK), 2.5 times the forward; so forward+backward counts 3.5 x 4 B H N^2 D. The softmax's
exponentials and the backward's recomputation beyond those five are not counted.

Timing: --warmup untimed calls (the extension's build, cuDNN and allocator warm-up), then --reps
calls between two CUDA events; the rate is the FLOPs of one call over the mean time of one call.
On a machine without a CUDA GPU the script prints one line saying so and exits 0.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emu.models import fused_attention  # noqa: E402

SDPA_BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                 ("math", SDPBackend.MATH)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="sequence lengths N")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], choices=[64, 128], help="head dims D")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--tokens", type=int, default=16384, help="batch size times N")
    p.add_argument("--width", type=int, default=2048, help="heads times D")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--reps", type=int, default=10, help="timed calls")
    return p.parse_args(argv)


def attention_flops(B, H, N, D, mode):
    """flash-attention's count: 4 B H N^2 D for the forward, 3.5 times that for forward+backward."""
    forward = 4 * B * H * N * N * D
    return forward if mode == "fwd" else 3.5 * forward


def ours(q, k, v):
    return fused_attention.fused_attention(q, k, v)


def sdpa_with(backend):
    """SDPA held to one backend (the backward follows the forward's choice)."""
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return attend


def milliseconds(fn, warmup, reps):
    """Mean milliseconds of one fn() call, between CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def tflops(attend, q, k, v, mode, args):
    """attend's TFLOP/s on q, k, v in `mode`, or None where it cannot run this shape."""
    B, H, N, D = q.shape
    if mode == "fwd":
        def call():
            with torch.no_grad():
                attend(q, k, v)
    else:
        grad = torch.randn_like(q)
        def call():
            torch.autograd.grad(attend(q, k, v), (q, k, v), grad)
    try:
        ms = milliseconds(call, args.warmup, args.reps)
    except RuntimeError:  # "no available kernel", out of memory
        torch.cuda.empty_cache()
        return None
    return attention_flops(B, H, N, D, mode) / (ms * 1e-3) / 1e12


def main(args):
    if not torch.cuda.is_available():
        print("bench/attention.py measures CUDA kernels and needs a CUDA GPU; there is none here.")
        return
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    contenders = [("ours", ours)] + [(name, sdpa_with(backend)) for name, backend in SDPA_BACKENDS]
    if fused_attention.load_extension() is None:
        print(f"ours: {fused_attention.build_error()}")
        contenders = contenders[1:]
    names = [name for name, _ in contenders]

    print(f"{torch.cuda.get_device_name()}, {args.dtype}, B = {args.tokens} / N, H = {args.width} / D; TFLOP/s "
          f"(4 B H N^2 D forward, 3.5x that forward+backward); {args.warmup} warm-up and {args.reps} timed calls")
    print(f"{'mode':8} {'N':>6} {'D':>4} {'B':>3} {'H':>3} " + " ".join(f"{n:>9}" for n in names) + f" {'ours/flash':>10}")
    for mode in args.modes:
        for D in args.head_dims:
            for N in args.seqlens:
                B, H = max(1, args.tokens // N), max(1, args.width // D)
                g = torch.Generator("cuda").manual_seed(0)
                q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
                           for _ in range(3))
                rates = {name: tflops(attend, q, k, v, mode, args) for name, attend in contenders}
                cells = " ".join(f"{rates[n]:9.1f}" if rates[n] is not None else f"{'-':>9}" for n in names)
                ratio = rates.get("ours") / rates["flash"] if rates.get("ours") and rates["flash"] else None
                print(f"{mode:8} {N:6d} {D:4d} {B:3d} {H:3d} {cells} " + (f"{ratio:10.3f}" if ratio else f"{'-':>10}"))
                del q, k, v
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main(parse_args())
