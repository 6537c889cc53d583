"""Our U-Net's training step at Stable Diffusion v1.5's real shapes against diffusers' UNet2DConditionModel,
in one process on this machine's CPU.

    python bench/train_sd_unet.py                       # v1.5: 860M parameters, 64x64 latents, batch 1, bf16 autocast
    python bench/train_sd_unet.py --preset toy --rounds 3   # the same at toy scale, in seconds

diffusers is only the reference here, never a requirement (`.venv/bin/pip install -r requirements-test.txt`);
without it the script says so and stops.

The shapes are v1.5's unet/config.json (bench/load_sd_unet.py's SD15): block widths 320 / 640 / 1280 / 1280,
cross-attention on the first three levels, 8 heads, CLIP ViT-L's 77 x 768 context, 4 x 64 x 64 latents
(512-pixel images). Ours is emu.models.unet.UNet built from that config by the loader's own
unet_config_from_diffusers, as `qtune.py --base` builds it; it reads the 77 tokens as its CLIP tokens
with no pooled vector, as Stable Diffusion's U-Net does. Both steps are the same: forward (under bf16
autocast with --precision bf16, as `qtune.py --precision bf16`), MSE against a fixed target, backward,
fused AdamW; with --grad-checkpoint both recompute their blocks in the backward pass.

Two such models with AdamW's state (16 bytes a parameter: 14 GB each) do not fit in this machine's 24 GB
together, so they take turns: each round builds one model, takes --warmup untimed steps and --steps timed
ones, frees it, then does the same for the other; the next round starts with the other one. A machine
that slows down or speeds up slows both alike over the rounds. The script prints each one's median step
time, the peak resident memory of its turns, and the ratio of the medians (>1: ours is faster).
"""
import argparse
import gc
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emu.models.unet import UNet  # noqa: E402
from emu.text.encoder import TextEmbedding  # noqa: E402
from emu.variants.stable_diffusion import unet_config_from_diffusers  # noqa: E402
from load_sd_unet import PRESETS  # noqa: E402  (bench/load_sd_unet.py: v1.5's config entries)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd-v1-5", choices=sorted(PRESETS), help="the U-Net's shapes")
    p.add_argument("--bs", type=int, default=1, help="batch size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--rounds", type=int, default=2, help="turns of each model")
    p.add_argument("--steps", type=int, default=2, help="timed steps per turn")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per turn, first (AdamW allocates its state there)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="bf16: both forwards under CPU autocast")
    p.add_argument("--grad-checkpoint", action="store_true", help="both recompute their blocks in the backward pass")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(name, raw, grad_checkpoint):
    """(model, forward(model, x, t, context)) for "emu" or "diffusers", randomly initialised."""
    if name == "emu":
        model = UNet(unet_config_from_diffusers(raw, "config.json"))
        model.grad_checkpoint = grad_checkpoint

        def forward(m, x, t, context):
            B, L = context.shape[:2]
            text = TextEmbedding(clip=context, clip_mask=torch.ones(B, L, dtype=torch.bool), t5=context.new_zeros(B, 0, 1),
                                 t5_mask=torch.zeros(B, 0, dtype=torch.bool), pooled=context.new_zeros(B, 0))
            return m(x, t, text)
        return model, forward
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel(**{k: v for k, v in raw.items() if not k.startswith("_")})
    if grad_checkpoint:
        model.enable_gradient_checkpointing()
    return model, lambda m, x, t, context: m(x, t, encoder_hidden_states=context).sample


def reset_peak_rss():
    """Start the process's peak resident memory afresh (Linux: "5" to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_gb():
    """The process's peak resident memory since the last reset (VmHWM), in GiB."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 2**20


def turn(name, args, inputs):
    """Build one model, take its warm-up and timed steps, free it; the timed steps' seconds."""
    raw = PRESETS[args.preset]
    torch.manual_seed(args.seed)
    model, forward = build(name, raw, args.grad_checkpoint)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as emu.training.loop.make_optimizer
    x, t, context, target = inputs
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = F.mse_loss(forward(model, x, t, context).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    del model, opt, forward
    gc.collect()
    return times, params


def main(args):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise SystemExit("diffusers is not installed (the reference of this benchmark only): "
                         "pip install -r requirements-test.txt")
    torch.set_num_threads(args.threads)
    raw = PRESETS[args.preset]
    g = torch.Generator().manual_seed(args.seed)
    side, width = raw["sample_size"], raw["cross_attention_dim"]
    inputs = (torch.randn(args.bs, raw["in_channels"], side, side, generator=g), torch.randint(0, 1000, (args.bs,), generator=g),
              torch.randn(args.bs, 77, width, generator=g), torch.randn(args.bs, raw["out_channels"], side, side, generator=g))
    times, params, peaks = {"emu": [], "diffusers": []}, {}, {}
    order = ["emu", "diffusers"]
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            reset_peak_rss()
            t, params[name] = turn(name, args, inputs)
            times[name] += t
            peaks[name] = max(peaks.get(name, 0), peak_rss_gb())
            print(f"round {r + 1}: {name:9s} " + ", ".join(f"{s:.2f} s" for s in t)
                  + f"  (peak resident memory of the turn {peak_rss_gb():.2f} GiB)", flush=True)
    print(f"training step, {args.preset} U-Net, batch {args.bs}, latents {raw['in_channels']}x{side}x{side}, context 77 x {width}, "
          f"{args.precision}, gradient checkpointing {'on' if args.grad_checkpoint else 'off'}, {args.threads} CPU thread(s), "
          f"{args.rounds} rounds of {args.steps} timed steps; torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"parameters: emu {params['emu'] / 1e6:.1f}M, diffusers {params['diffusers'] / 1e6:.1f}M")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, m in med.items():
        print(f"  {name:10s} median {m:8.3f} s  (min {min(times[name]):.3f}, max {max(times[name]):.3f}); "
              f"peak resident memory {peaks[name]:.2f} GiB")
    print(f"speed ratio (diffusers time / emu time): {med['diffusers'] / med['emu']:.3f}x")


if __name__ == "__main__":
    main(parse_args())
