"""Generate images from prompts with a trained model.

Each image is written as a PNG whose metadata records the prompt, seed, guidance scale, sampler
and checkpoint, so any image can be regenerated; a grid of all of them is written beside.

    python sample.py --prompt "two red circles on the left on a teal background"
    python sample.py --ckpt runs/pretrain/ckpt.pt --prompts data/prompts/toy.tsv --cfg 5
"""
import argparse
import os

import torch

from emu import EmuError
from emu.arch import ARCHS
from emu.data import make_grid, read_prompts, save_png, to_uint8
from emu.pipeline import TextToImage


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/qtune/best.pt", help="training checkpoint (pretrain.py or qtune.py)")
    p.add_argument("--arch", default=None, choices=sorted(ARCHS),
                   help="the architecture the checkpoint must hold (default: the one it records)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA weights or the raw training weights")
    p.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts", default=None, help="file of prompts: one per line, or a PartiPrompts-style .tsv")
    p.add_argument("--n", type=int, default=4, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (diffusion) or decoding steps (MaskGIT)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (deterministic at eta 0) or DDPM ancestral")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 deterministic, 1 ~ DDPM)")
    p.add_argument("--out", default="runs/samples", help="output directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p.parse_args(argv)


def main(args):
    prompts = list(args.prompt or []) + ([p for p, _ in read_prompts(args.prompts)] if args.prompts else [])
    if not prompts:
        prompts = ["two red circles on the left on a teal background", "a yellow square in the center on a black background"]
    model = TextToImage.from_checkpoint(args.ckpt, device=args.device, weights=args.weights, arch=args.arch)
    jobs = [(prompt, args.seed + i) for prompt in prompts for i in range(args.n)]
    images = to_uint8(model.generate([p for p, _ in jobs], [s for _, s in jobs], args.cfg, args.steps, args.sampler, args.eta))

    os.makedirs(args.out, exist_ok=True)
    for k, ((prompt, seed), image) in enumerate(zip(jobs, images)):
        meta = {"prompt": prompt, "seed": seed, "cfg": args.cfg, "steps": args.steps, "sampler": args.sampler,
                "eta": args.eta, "checkpoint": args.ckpt, "weights": args.weights}
        save_png(os.path.join(args.out, f"{k:04d}.png"), image, meta)
    save_png(os.path.join(args.out, "grid.png"), make_grid(images, ncol=args.n), {"prompts": " | ".join(prompts), "checkpoint": args.ckpt})
    print(f"wrote {len(images)} images and grid.png to {args.out}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except EmuError as e:
        raise SystemExit(f"error: {e}")
