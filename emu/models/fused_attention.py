"""The fused CUDA attention kernel as a PyTorch op with autograd.

The kernels live in emu/models/csrc/flash_attention.cu (forward, backward, and a standalone build checked
against a CPU reference); emu/models/csrc/flash_attention.cpp binds them to tensors. This file builds that
extension and registers two torch.library ops around it:

    emu::flash_attention(q, k, v, key_padding_mask, scale) -> (out, lse)
    emu::flash_attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, scale) -> (dq, dk, dv)

Each op has three implementations: CUDA (the extension); CPU, a plain-PyTorch reference of exactly the
same math (float32 accumulation, the same out and lse, the same zeros for a row whose keys are all
masked), so that the op, its autograd formula and its fake implementation can be tested on any
machine; and fake (shapes and dtypes only), so that torch.compile can trace through it. The first
op's autograd formula calls the second. emu/models/attention.py decides when the op is used (EMU_ATTENTION).

Building. Nothing is compiled when this module is imported, and nothing at all on a machine without
CUDA. The first call of load_extension() on a machine with a CUDA GPU, a CUDA build of PyTorch and
nvcc compiles the two sources with torch.utils.cpp_extension.load (about a minute), into
$EMU_ATTENTION_BUILD_DIR or by default ~/.cache/emu/flash_attention; later processes reuse the build.
To build ahead of time instead (a container image, a cluster without compilers on the nodes), a
setup.py with

    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    setup(name="emu_flash_attention", cmdclass={"build_ext": BuildExtension},
          ext_modules=[CUDAExtension("emu_flash_attention",
                                     ["emu/models/csrc/flash_attention.cpp", "emu/models/csrc/flash_attention.cu"],
                                     extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]})])

and `TORCH_CUDA_ARCH_LIST=9.0 pip install .` installs a module that load_extension() imports before
it tries to compile anything.
"""
import math
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
EXTENSION = "emu_flash_attention"  # the compiled module's name, built here or installed ahead of time
HEAD_DIMS = (64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BATCH_HEADS = 65535  # the kernels index (batch, head) pairs by gridDim.y

# -----------------------------------------------------------------------------
# building the extension

_extension = None     # the compiled module, once loaded
_build_error = None   # why it could not be loaded, once that was tried and failed


def _import_or_build():
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    try:
        import emu_flash_attention  # built ahead of time (see the module docstring)
        return emu_flash_attention
    except ImportError:
        pass
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc was not found (install the CUDA toolkit or set CUDA_HOME)")
    build_dir = os.environ.get("EMU_ATTENTION_BUILD_DIR") or os.path.join(Path.home(), ".cache", "emu", "flash_attention")
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load(name=EXTENSION, sources=[str(CSRC / "flash_attention.cpp"), str(CSRC / "flash_attention.cu")],
                              extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-std=c++17"], build_directory=build_dir)


def load_extension():
    """The compiled extension, built on first use; None where it cannot be had (build_error() says why)."""
    global _extension, _build_error
    if _extension is None and _build_error is None:
        try:
            _extension = _import_or_build()
        except Exception as e:  # no CUDA, no nvcc, a compiler error: say so once and let callers fall back
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _build_error = f"the CUDA extension is not available: {first_line}"
            if torch.cuda.is_available():
                warnings.warn(f"fused attention: {_build_error}; using PyTorch's attention", stacklevel=2)
    return _extension


def build_error():
    """Why load_extension() returned None, or None."""
    return _build_error


# -----------------------------------------------------------------------------
# the reference: the kernels' math in plain PyTorch (the ops' CPU implementations)

def _scores(q, k, key_padding_mask, scale):
    """S = q k^T * scale in float32, -inf at masked keys. (B, H, Nq, Nk)"""
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return s


def _probabilities(s, lse):
    """P = exp(S - lse): the softmax, normalised by the saved log-sum-exp. A row whose keys are all
    masked (lse = -inf) gets P = 0, where softmax would give NaN."""
    return torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])


def reference_forward(q, k, v, key_padding_mask, scale):
    """softmax(q k^T * scale) v and each row's log-sum-exp, computed as the kernel computes them.

    :param q: (B, H, Nq, D); k, v: (B, H, Nk, D); key_padding_mask: None or (B, Nk) bool, True at real keys.
    :return: out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) float32.
    """
    s = _scores(q, k, key_padding_mask, scale)           # (B, H, Nq, Nk)
    lse = torch.logsumexp(s, dim=-1)                     # (B, H, Nq); -inf for a row of masked keys
    out = _probabilities(s, lse) @ v.float()             # (B, H, Nq, D)
    return out.to(q.dtype), lse


def reference_backward(grad_out, q, k, v, out, lse, key_padding_mask, scale):
    """The gradients of reference_forward's out, as the kernel computes them (FlashAttention-2):

        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D) with D = rowsum(dO * O),
        dQ = dS K * scale,  dK = dS^T Q * scale

    with P recomputed from q, k and the saved lse. Masked keys get zero gradient.
    :return: dq, dk, dv in the dtypes of q, k, v.
    """
    p = _probabilities(_scores(q, k, key_padding_mask, scale), lse)  # (B, H, Nq, Nk)
    do = grad_out.float()                                            # (B, H, Nq, D)
    dv = p.transpose(-2, -1) @ do                                    # (B, H, Nk, D)
    dp = do @ v.float().transpose(-2, -1)                            # (B, H, Nq, Nk)
    delta = (do * out.float()).sum(-1, keepdim=True)                 # (B, H, Nq, 1)
    ds = p * (dp - delta)                                            # (B, H, Nq, Nk)
    dq = (ds @ k.float()) * scale                                    # (B, H, Nq, D)
    dk = (ds.transpose(-2, -1) @ q.float()) * scale                  # (B, H, Nk, D)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# -----------------------------------------------------------------------------
# the ops

def _require_extension():
    extension = load_extension()
    if extension is None:
        raise RuntimeError(f"emu::flash_attention on CUDA: {_build_error}")
    return extension


@torch.library.custom_op("emu::flash_attention", mutates_args=(), device_types="cpu")
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale, masked) v. q (B, H, Nq, D); k, v (B, H, Nk, D); key_padding_mask None or
    (B, Nk) bool, True at real keys. Returns out (B, H, Nq, D) and lse (B, H, Nq) float32, the
    log-sum-exp of each row's scores (-inf, with out = 0, for a row whose keys are all masked).
    This body is the CPU implementation; CUDA tensors go to the compiled kernel."""
    return reference_forward(q, k, v, key_padding_mask, scale)


@flash_attention.register_kernel("cuda")
def _(q, k, v, key_padding_mask, scale):
    out, lse = _require_extension().forward(q, k, v, key_padding_mask, scale)
    return out, lse


@flash_attention.register_fake
def _(q, k, v, key_padding_mask, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("emu::flash_attention_backward", mutates_args=(), device_types="cpu")
def flash_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (dq, dk, dv) of emu::flash_attention's out for the upstream gradient grad_out, from
    its inputs, its out and its lse. This body is the CPU implementation."""
    return reference_backward(grad_out, q, k, v, out, lse, key_padding_mask, scale)


@flash_attention_backward.register_kernel("cuda")
def _(grad_out, q, k, v, out, lse, key_padding_mask, scale):
    dq, dk, dv = _require_extension().backward(grad_out, q, k, v, out, lse, key_padding_mask, scale)
    return dq, dk, dv


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)  # a statistic saved for the backward, not an output to train through


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, ctx.scale)
    return dq, dk, dv, None, None  # no gradient for the mask or the scale


flash_attention.register_autograd(_backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# when the op applies

def unsupported_reason(q, k, v, key_padding_mask=None, bias=None, causal=False):
    """None when the fused kernel computes this attention(); otherwise why not, in a few words.
    The tensors are checked first; the extension is built (once) only for tensors it would take."""
    if bias is not None:
        return "it takes no additive attention bias"
    if causal:
        return "it has no causal mask"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k and v must be (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} need one batch, head count and head dim"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {HEAD_DIMS}"
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} are not one of float32, float16, bfloat16"
    if q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        return f"batch * heads = {q.shape[0] * q.shape[1]} is over {MAX_BATCH_HEADS}"
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2])):
        return f"key_padding_mask must be (B, Nk) bool, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return f"the tensors are on {q.device.type}, and the kernel runs on CUDA tensors only"
    if key_padding_mask is not None and key_padding_mask.device != q.device:
        return "key_padding_mask is not on q's device"
    if load_extension() is None:
        return _build_error
    return None


def supported(q, k, v, key_padding_mask=None, bias=None, causal=False):
    """Whether the fused kernel computes this attention (CUDA tensors of one float dtype, head dim 64 or
    128, no bias, not causal, the extension built)."""
    return unsupported_reason(q, k, v, key_padding_mask, bias, causal) is None


def fused_attention(q, k, v, key_padding_mask=None, scale=None):
    """attention() through the fused op: (B, H, Nq, D) out; scale defaults to 1/sqrt(D) as in SDPA."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = flash_attention(q, k, v, key_padding_mask, scale)
    return out
