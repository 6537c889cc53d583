"""Model FLOPs utilisation (MFU) of the U-Net's training step.

    python bench/train_mfu.py                      # toy U-Net, 32x32 images, on the CPU: under a minute
    python bench/train_mfu.py --preset emu --image-size 256 --bs 32 --precision bf16 --device cuda
                                                   # the paper's 2.8B U-Net on an H100: the goal is MFU >= 45%

MFU is the rate at which the training step does the model's FLOPs divided by the device's peak dense
rate for the precision. The FLOPs are analytic (emu/models/flops.py): the matmul work of one forward, from
the config and the input sizes, times 3 for the forward and the backward (the convention of the PaLM
paper and of nanoGPT). Work the hardware does on top, such as recomputation under activation
checkpointing, does not count: MFU says how much of the device the model gets.

What is timed is the real step, emu.training.loop.train_step: caption dropout, noise and timesteps,
the (autocast) forward, the loss, the backward, gradient clipping and the fused AdamW update, on a
fixed batch of random latents and random text embeddings. Loading and encoding data is not timed.

The peak comes from --peak-tflops or, on a known GPU, from PEAK_TFLOPS below. A CPU has no peak to
look up, so the script also times a dense square matmul in the same dtype, the same way, and prints
the step's rate as a fraction of that measured rate: a ratio that holds on any machine, even a busy one.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emu.models.autoencoder import PRESETS as AE_PRESETS  # noqa: E402
from emu.diffusion import GaussianDiffusion  # noqa: E402
from emu.models.flops import train_step_flops, unet_flops  # noqa: E402
from emu.text.encoder import TextEmbedding  # noqa: E402
from emu.training.loop import make_optimizer, train_step, warmup_schedule  # noqa: E402
from emu.models.unet import PRESETS, UNet  # noqa: E402

# Dense (no sparsity) peak TFLOP/s from the vendor datasheets, matched by a substring of the CUDA
# device name, first match wins. fp32 is the plain CUDA-core rate: PyTorch runs fp32 matmuls in full
# fp32 by default but lets cuDNN run convolutions in TF32, so an fp32 MFU can read high; quote bf16.
PEAK_TFLOPS = [  # (name contains, bf16, fp32)
    ("H100 NVL", 835, 60),
    ("H100 PCIe", 756, 51),
    ("H100", 989, 67),  # SXM
    ("H200", 989, 67),
    ("A100", 312, 19.5),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS), help="U-Net shape (emu.models.unet.PRESETS)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    p.add_argument("--downsample", type=int, default=None,
                   help="autoencoder downsampling factor (default: the autoencoder preset of the same name: toy 4, emu 8)")
    p.add_argument("--latent-channels", type=int, default=None, help="latent channels (default: the preset's in_channels)")
    p.add_argument("--bs", type=int, default=16, help="batch size")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (allocator, autotuning, compilation)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="as in pretrain.py: bf16 autocasts the forward")
    p.add_argument("--clip-tokens", type=int, default=77, help="CLIP text tokens per caption")
    p.add_argument("--t5-tokens", type=int, default=77, help="T5 text tokens per caption")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak dense TFLOP/s at --precision (default: PEAK_TFLOPS for known GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing, as in pretrain.py (the recomputation is not counted)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step, as in pretrain.py")
    p.add_argument("--matmul-size", type=int, default=None, help="side of the reference square matmul (default: cpu 1024, cuda 8192)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def lookup_peak_tflops(device, precision):
    """The table's peak for this CUDA device and precision, or None (a CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def random_text(cfg, batch, clip_tokens, t5_tokens, device):
    """A TextEmbedding of random features with every token real (all-True masks), so the U-Net's
    without_padding() keeps all clip_tokens + t5_tokens of them."""
    return TextEmbedding(clip=torch.randn(batch, clip_tokens, cfg.clip_dim, device=device),
                         clip_mask=torch.ones(batch, clip_tokens, dtype=torch.bool, device=device),
                         t5=torch.randn(batch, t5_tokens, cfg.t5_dim, device=device),
                         t5_mask=torch.ones(batch, t5_tokens, dtype=torch.bool, device=device),
                         pooled=torch.randn(batch, cfg.pooled_dim, device=device))


def timed(fn, calls, device):
    """Seconds that `calls` calls of fn() take; on CUDA the queue is drained before and after, so
    the time is that of the work and not of queueing it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def matmul_tflops(n, dtype, device):
    """TFLOP/s of an (n, n) @ (n, n) matmul in `dtype`, timed for about a second."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    one = timed(lambda: a @ b, 2, device) / 2  # the first calls also warm up
    calls = max(3, min(1000, int(1.0 / one)))
    return 2 * n ** 3 * calls / timed(lambda: a @ b, calls, device) / 1e12


def main(args):
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = replace(PRESETS[args.preset], in_channels=args.latent_channels or PRESETS[args.preset].in_channels)
    factor = args.downsample or AE_PRESETS[args.preset].downsample_factor
    assert args.image_size % factor == 0, f"--image-size {args.image_size} is not a multiple of the downsampling {factor}"
    side = args.image_size // factor

    # the model, its optimiser and the diffusion, set up as pretrain.py sets them up
    unet = UNet(cfg).to(device)
    unet.grad_checkpoint = args.grad_checkpoint
    model = torch.compile(unet) if args.compile else unet
    train_args = argparse.Namespace(lr=1e-4, weight_decay=0.01, caption_dropout=0.1, noise_offset=0.02, grad_clip=1.0,
                                    grad_accum=args.grad_accum, precision=args.precision)  # the fields train_step and make_optimizer read
    opt = make_optimizer(unet, train_args)
    sched = warmup_schedule(opt, 100)
    diffusion = GaussianDiffusion("scaled_linear")
    gen = torch.Generator(device).manual_seed(args.seed)

    # one fixed batch: random latents and text embeddings; `empty` is what caption dropout swaps in
    latents = torch.randn(args.bs, cfg.in_channels, side, side, device=device)  # (B, C, H, W)
    text = random_text(cfg, args.bs, args.clip_tokens, args.t5_tokens, device)
    empty = random_text(cfg, 1, args.clip_tokens, args.t5_tokens, device)

    def step():
        train_step(model, diffusion, latents, text, empty, opt, sched, gen, train_args)

    timed(step, args.warmup_steps, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, args.steps, device)

    forward = unet_flops(cfg, side, args.clip_tokens, args.t5_tokens)
    per_image = train_step_flops(cfg, side, args.clip_tokens, args.t5_tokens)
    images_per_s = args.bs * args.steps / seconds
    achieved = per_image * images_per_s / 1e12  # TFLOP/s
    peak = args.peak_tflops or lookup_peak_tflops(device, args.precision)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    reference = matmul_tflops(n, dtype, device)

    params = sum(p.numel() for p in unet.parameters())
    threads = f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})"
    print(f"U-Net {args.preset!r}: {params / 1e6:.2f}M parameters; latents {cfg.in_channels}x{side}x{side} "
          f"({args.image_size}px images / {factor}); text {args.clip_tokens} CLIP + {args.t5_tokens} T5 tokens")
    print(f"device {device}{threads}, {args.precision}, batch {args.bs}, {args.steps} timed steps after "
          f"{args.warmup_steps} warm-up steps, torch.compile {'on' if args.compile else 'off'}, "
          f"activation checkpointing {'on' if args.grad_checkpoint else 'off'}, {args.grad_accum} micro-batch(es)")
    print(f"analytic FLOPs per image: forward {forward / 1e9:.4g} GFLOP; training step (3x forward) {per_image / 1e9:.4g} GFLOP")
    print(f"{seconds / args.steps * 1e3:.1f} ms per step, {images_per_s:.1f} images/s, achieved {achieved:.4g} TFLOP/s")
    if peak:
        print(f"MFU {achieved / peak:.1%} of a {peak:g} TFLOP/s peak")
    else:
        print(f"MFU n/a: no known peak for {device.type} at {args.precision} (pass --peak-tflops)")
    print(f"reference: a {n}x{n} {args.precision} matmul runs at {reference:.4g} TFLOP/s here; "
          f"the training step reaches {achieved / reference:.1%} of the measured matmul rate")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main(parse_args())
