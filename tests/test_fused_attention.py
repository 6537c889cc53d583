"""The fused attention op (emu/models/fused_attention.py) and the backend choice in emu/models/attention.py.

On any machine: the op's CPU implementation, a plain-PyTorch copy of the kernel's math, agrees with
PyTorch's attention in values and gradients; torch.library.opcheck accepts the op's schema, fake
implementation and autograd formula; the backends choose as documented, and on a CPU "auto" is SDPA
bit for bit. With a CUDA GPU: the kernel's outputs and gradients are within twice PyTorch's own error
of a float32 reference (the flash-attention rule), and the toy U-Net trains the same with it."""
import os
import subprocess
import sys
from dataclasses import replace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from emu.models import attention as attention_module
from emu.models import fused_attention as fa
from emu.models.attention import attention
from emu.text.encoder import TextEmbedding
from emu.models.unet import PRESETS, UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPES = [(77, 77, 64), (33, 77, 128), (77, 33, 64), (45, 129, 128)]  # (Nq, Nk, D): lengths off the tiles


def qkv(Nq, Nk, D, B=2, H=3, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device).manual_seed(seed)
    rand = lambda n: torch.randn(B, H, n, D, generator=g, device=device).to(dtype)
    return rand(Nq), rand(Nk), rand(Nk)


def padding_mask(B, Nk, device="cpu"):
    """(B, Nk) bool: batch i keeps its first Nk - 13 i keys (at least one)."""
    lengths = torch.tensor([max(1, Nk - 13 * i) for i in range(B)], device=device)
    return torch.arange(Nk, device=device)[None] < lengths[:, None]


def sdpa(q, k, v, mask, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :], scale=scale)


def out_and_grads(fn, q, k, v, grad):
    """fn(q, k, v)'s output and the gradients of q, k, v for the upstream gradient `grad`."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.fixture
def backend():
    """set_backend for one test; the previous choice comes back afterwards."""
    before = attention_module.get_backend()
    yield attention_module.set_backend
    attention_module.set_backend(before)


# -----------------------------------------------------------------------------
# the op's reference implementation (CPU)

@pytest.mark.parametrize("Nq,Nk,D", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_reference_op_matches_sdpa(Nq, Nk, D, masked):
    q, k, v = qkv(Nq, Nk, D)
    mask = padding_mask(2, Nk) if masked else None
    out, lse = torch.ops.emu.flash_attention(q, k, v, mask, D ** -0.5)
    torch.testing.assert_close(out, sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)
    scores = q @ k.transpose(-2, -1) * D ** -0.5  # (B, H, Nq, Nk)
    if masked:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
    assert lse.shape == (2, 3, Nq) and lse.dtype == torch.float32


@pytest.mark.parametrize("Nq,Nk,D", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_reference_op_gradients_match_sdpa(Nq, Nk, D, masked):
    q, k, v = qkv(Nq, Nk, D)
    mask = padding_mask(2, Nk) if masked else None
    grad = torch.randn(2, 3, Nq, D, generator=torch.Generator().manual_seed(1))
    ours = out_and_grads(lambda q, k, v: fa.fused_attention(q, k, v, mask), q, k, v, grad)
    theirs = out_and_grads(lambda q, k, v: sdpa(q, k, v, mask), q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=name)
    if masked:  # padding keys learn nothing
        padding = ~mask[:, None, :, None]  # (B, 1, Nk, 1)
        assert (ours[2] * padding == 0).all() and (ours[3] * padding == 0).all()


def test_a_row_whose_keys_are_all_masked_gives_zeros_not_nans():
    q, k, v = qkv(5, 9, 64)
    mask = padding_mask(2, 9)
    mask[1] = False
    out, lse = torch.ops.emu.flash_attention(q, k, v, mask, 0.125)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all() and out[0].abs().sum() > 0
    grads = out_and_grads(lambda q, k, v: fa.fused_attention(q, k, v, mask), q, k, v, torch.ones(2, 3, 5, 64))
    assert all(torch.isfinite(g).all() and (g[1] == 0).all() for g in grads[1:])


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_accepts_the_ops_schema_fake_and_autograd(masked):
    q, k, v = (t.requires_grad_() for t in qkv(11, 9, 64, B=2, H=2))
    mask = padding_mask(2, 9) if masked else None
    torch.library.opcheck(torch.ops.emu.flash_attention.default, (q, k, v, mask, 0.125))
    out, lse = torch.ops.emu.flash_attention(q, k, v, mask, 0.125)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.emu.flash_attention_backward.default,
                          (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, 0.125))


def test_the_op_composes_with_torch_compile():
    q, k, v = (t.requires_grad_() for t in qkv(11, 9, 64, B=2, H=2))
    mask = padding_mask(2, 9)
    loss = lambda q, k, v: fa.fused_attention(q, k, v, mask).square().sum()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v)), expected):
        torch.testing.assert_close(a, b)


# -----------------------------------------------------------------------------
# choosing the backend

def sdpa_as_before(q, k, v, mask):
    """emu.models.attention's SDPA path, as it was before there was a choice: an additive float mask."""
    pad = torch.zeros(mask[:, None, None, :].shape, dtype=q.dtype).masked_fill(~mask[:, None, None, :], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pad)


@pytest.mark.parametrize("name", ["sdpa", "auto"])
def test_sdpa_and_auto_backends_are_sdpa_bitwise_on_cpu(name, backend):
    backend(name)
    q, k, v = qkv(77, 33, 64)
    mask = padding_mask(2, 33)
    with mock.patch.object(attention_module, "_fused", side_effect=AssertionError("the fused path was consulted")):
        assert torch.equal(attention(q, k, v, key_padding_mask=mask), sdpa_as_before(q, k, v, mask))
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_fused_backend_on_cpu_raises_a_one_line_error_naming_the_reason(backend):
    backend("fused")
    q, k, v = qkv(77, 33, 64)
    cases = [((q, k, v), {}, "cpu"), ((q, k, v), {"bias": torch.zeros(77, 33)}, "bias"),
             ((q, k, v), {"causal": True}, "causal"), (qkv(8, 8, 32), {}, "head dim 32")]
    for args, kwargs, reason in cases:
        with pytest.raises(RuntimeError) as error:
            attention(*args, **kwargs)
        message = str(error.value)
        assert "\n" not in message and "fused" in message and reason in message, message


def test_an_unknown_backend_is_refused(backend):
    with pytest.raises(ValueError, match="sdpa, auto, fused"):
        backend("flash")


PROBE = ("import sys, torch; import emu.models.attention as a; q = torch.randn(1, 2, 5, 64); a.attention(q, q, q); "
         "print(a.get_backend(), 'emu.models.fused_attention' in sys.modules, 'torch.utils.cpp_extension' in sys.modules)")


@pytest.mark.parametrize("env,expected", [(None, "sdpa"), ("sdpa", "sdpa"), ("auto", "auto")])
def test_emu_attention_env_var_chooses_and_cpu_imports_nothing_fused(env, expected):
    environ = {k: v for k, v in os.environ.items() if k != "EMU_ATTENTION"}
    if env is not None:
        environ["EMU_ATTENTION"] = env
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [expected, "False", "False"]


def test_a_bad_emu_attention_env_var_is_a_one_line_error():
    environ = dict(os.environ, EMU_ATTENTION="flash")
    proc = subprocess.run([sys.executable, "-c", "import emu.models.attention"], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: EMU_ATTENTION must be one of sdpa, auto, fused, got 'flash'"


# -----------------------------------------------------------------------------
# the CUDA kernel (GPU only)

@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Nq,Nk,D", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_kernel_is_within_twice_sdpa_error_of_fp32(dtype, Nq, Nk, D, masked):
    q, k, v = qkv(Nq, Nk, D, dtype=dtype, device="cuda")
    mask = padding_mask(2, Nk, "cuda") if masked else None
    grad = torch.randn(2, 3, Nq, D, device="cuda").to(dtype)
    ours = out_and_grads(lambda q, k, v: fa.fused_attention(q, k, v, mask), q, k, v, grad)
    theirs = out_and_grads(lambda q, k, v: sdpa(q, k, v, mask), q, k, v, grad)
    with sdpa_kernel(SDPBackend.MATH):  # float32 throughout, from the same (rounded) inputs
        reference = out_and_grads(lambda q, k, v: sdpa(q, k, v, mask), q.float(), k.float(), v.float(), grad.float())
    for name, a, b, ref in zip(("out", "dq", "dk", "dv"), ours, theirs, reference):
        assert a.dtype == dtype
        error, bar = (a.float() - ref).abs().max().item(), (b.float() - ref).abs().max().item()
        assert error <= 2 * bar + 1e-5, f"{name}: error {error:.3g}, PyTorch's {bar:.3g}"


@cuda
@pytest.mark.parametrize("Nq,Nk,D", SHAPES)
def test_cuda_kernel_in_float32_matches_the_reference(Nq, Nk, D):
    q, k, v = qkv(Nq, Nk, D, device="cuda")
    mask = padding_mask(2, Nk, "cuda")
    grad = torch.randn(2, 3, Nq, D, device="cuda")
    ours = out_and_grads(lambda q, k, v: fa.fused_attention(q, k, v, mask), q, k, v, grad)
    with sdpa_kernel(SDPBackend.MATH):
        reference = out_and_grads(lambda q, k, v: sdpa(q, k, v, mask), q, k, v, grad)
    for name, a, ref in zip(("out", "dq", "dk", "dv"), ours, reference):
        torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-4, msg=name)


@cuda
def test_cuda_op_passes_opcheck():
    q, k, v = (t.requires_grad_() for t in qkv(45, 77, 64, dtype=torch.bfloat16, device="cuda"))
    mask = padding_mask(2, 77, "cuda")
    torch.library.opcheck(torch.ops.emu.flash_attention.default, (q, k, v, mask, 0.125))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_toy_unet_trains_with_the_fused_kernel_like_with_sdpa(dtype, backend):
    cfg = replace(PRESETS["toy"], model_channels=64, head_dim=64)  # heads of 64 channels, which the kernel takes
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 9])
    text = TextEmbedding(clip=torch.randn(2, 10, cfg.clip_dim, generator=g),
                         clip_mask=torch.arange(10)[None] < lengths[:, None],
                         t5=torch.randn(2, 9, cfg.t5_dim, generator=g), t5_mask=torch.arange(9)[None] < lengths[:, None],
                         pooled=torch.randn(2, cfg.pooled_dim, generator=g)).to("cuda")
    batches = [(torch.randn(2, 16, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g),
                torch.randn(2, 16, 8, 8, generator=g)) for _ in range(3)]

    def train(name, autocast):
        """The weights after three SGD steps with attention backend `name`."""
        backend(name)
        torch.manual_seed(0)
        unet = UNet(cfg)
        for module in unet.modules():  # the zero-initialised output layers made random, so every layer learns
            if hasattr(module, "proj_out"):
                torch.nn.init.normal_(module.proj_out.weight, std=0.1)
        torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
        unet = unet.cuda()
        opt = torch.optim.SGD(unet.parameters(), lr=0.05)
        for x, t, target in batches:
            with torch.autocast("cuda", dtype=dtype, enabled=autocast):
                loss = F.mse_loss(unet(x.cuda(), t.cuda(), text).float(), target.cuda())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in unet.parameters()])

    reference = train("sdpa", autocast=False)  # float32
    with_sdpa = train("sdpa", autocast=True)
    with mock.patch.object(fa, "fused_attention", wraps=fa.fused_attention) as spy:
        with_fused = train("fused", autocast=True)  # "fused" raises if any attention call cannot take it
    assert spy.call_count > 0
    error, bar = (with_fused - reference).abs().max().item(), (with_sdpa - reference).abs().max().item()
    assert error <= 2 * bar + 1e-6, f"fused {error:.3g}, SDPA {bar:.3g}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_the_benchmark_says_in_one_line_that_it_needs_a_gpu():
    proc = subprocess.run([sys.executable, "bench/attention.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1 and "GPU" in proc.stdout, proc.stdout
