"""Our U-Net's training step against diffusers' UNet2DConditionModel of the same shape, in one process.

    python bench/unet_vs_diffusers.py              # the small configuration below, one CPU thread: about a minute
    python bench/unet_vs_diffusers.py --threads 2 --bs 16 --rounds 20

diffusers is only the reference here, never a requirement: `.venv/bin/pip install diffusers==0.42.1` (the
version measured in the README); without it the script says so and stops.

The shape is diffusers' small test U-Net grown to a useful size: block widths 64 / 128 / 256, two
ResBlocks per level, cross-attention on the first two levels (and in the middle block), 32-wide heads,
a 256-wide text context of 77 tokens, 32x32 latents of 16 channels, batch 8, one thread. Ours gets the same text as 38 CLIP
and 39 T5 tokens of width 256 (it projects each tower to the context) and a pooled vector; diffusers gets
the 77 tokens directly. Both steps are the same: forward, MSE against a fixed target, backward, AdamW.

The two models' steps alternate (ours, theirs, ours, ...) for --rounds rounds after a warm-up, so a
machine that slows down or speeds up slows both alike; the script prints each one's median time and
the ratio of the medians (>1: ours is faster). Ours runs as pretrain.py runs it (emu.models.unet.UNet
as configured; no torch.compile unless --compile).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emu.models.unet import UNet, UNetConfig  # noqa: E402
from emu.text.encoder import TextEmbedding  # noqa: E402

WIDTHS, CONTEXT, HEAD_DIM, CLIP_TOKENS, T5_TOKENS = (64, 128, 256), 256, 32, 38, 39


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bs", type=int, default=8, help="batch size")
    p.add_argument("--side", type=int, default=32, help="latent side")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=10, help="timed steps of each model, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: both forwards under CPU autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile our U-Net (and diffusers' alike)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ours_config():
    """emu's UNetConfig of the benchmark's shape."""
    return UNetConfig(in_channels=16, model_channels=WIDTHS[0], channel_mult=tuple(w // WIDTHS[0] for w in WIDTHS),
                      num_res_blocks=2, attention_levels=(0, 1), transformer_depth=1, head_dim=HEAD_DIM,
                      context_dim=CONTEXT, clip_dim=CONTEXT, t5_dim=CONTEXT, pooled_dim=CONTEXT)


def diffusers_unet():
    """diffusers' UNet2DConditionModel of the same shape (attention_head_dim there counts heads per level)."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=32, in_channels=16, out_channels=16, layers_per_block=2, block_out_channels=WIDTHS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT, attention_head_dim=tuple(w // HEAD_DIM for w in WIDTHS))


def make_step(model, forward, x, target, bf16=False):
    """One training step of `model`: forward(model, x) (under bf16 autocast if `bf16`), MSE to target,
    backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(forward(model, x).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(args):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise SystemExit("diffusers is not installed (the reference of this benchmark only): pip install diffusers==0.42.1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    B, side = args.bs, args.side
    x, target, t = torch.randn(B, 16, side, side), torch.randn(B, 16, side, side), torch.randint(0, 1000, (B,))
    text = TextEmbedding(clip=torch.randn(B, CLIP_TOKENS, CONTEXT), clip_mask=torch.ones(B, CLIP_TOKENS, dtype=torch.bool),
                         t5=torch.randn(B, T5_TOKENS, CONTEXT), t5_mask=torch.ones(B, T5_TOKENS, dtype=torch.bool),
                         pooled=torch.randn(B, CONTEXT))
    states = torch.cat([text.clip, text.t5], dim=1)  # (B, 77, 256): diffusers' encoder_hidden_states

    ours, theirs = UNet(ours_config()), diffusers_unet()
    if args.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    bf16 = args.precision == "bf16"
    steps = {"emu": make_step(ours, lambda m, x: m(x, t, text), x, target, bf16),
             "diffusers": make_step(theirs, lambda m, x: m(x, t, encoder_hidden_states=states).sample, x, target, bf16)}
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"training step, batch {B}, latents 16x{side}x{side}, widths {'/'.join(map(str, WIDTHS))}, context {CONTEXT} x 77 "
          f"tokens, {args.precision}, {args.threads} CPU thread(s), torch.compile {'on' if args.compile else 'off'}, {args.rounds} interleaved rounds")
    print(f"parameters: emu {count(ours):.2f}M, diffusers {count(theirs):.2f}M")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, m in med.items():
        print(f"  {name:10s} median {m * 1e3:7.1f} ms  (min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f})")
    print(f"speed ratio (diffusers time / emu time): {med['diffusers'] / med['emu']:.3f}x")


if __name__ == "__main__":
    main(parse_args())
