"""A grid to check by eye whether two models draw their prompts: one row per prompt, its seeds side by side,
the first model's images on the left and the second's on the right, with the same seeds.

    python experiments/prompt_grid.py                 # after toy.sh: pretrained | quality-tuned -> docs/toy-prompts.png
    python experiments/prompt_grid.py --a runs/pretrain/ckpt.pt --b runs/qtune/best.pt --n 6 --seeds 4
    python experiments/prompt_grid.py --a runs/kandinsky/multilingual/ckpt.pt --b runs/kandinsky/multilingual/ckpt.pt \
        --prompts-b data/prompts/toy_ru.tsv --out docs/toy-multilingual.png    # one model, English | Russian

The prompts are the first --n of data/prompts/toy.tsv (the right half's, of --prompts-b when given: the same
scenes in another language); they are printed in row order.
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image

import common  # noqa: F401  (puts the repository on sys.path)
from emu.datasets.folders import read_prompts, to_uint8
from emu.pipeline import TextToImage


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="runs/pretrain/ckpt.pt", help="the model on the left")
    p.add_argument("--b", default="runs/qtune/best.pt", help="the model on the right")
    p.add_argument("--prompts", default=os.path.join(common.ROOT, "data", "prompts", "toy.tsv"))
    p.add_argument("--prompts-b", default=None, help="the right half's prompts, row for row (default: --prompts)")
    p.add_argument("--n", type=int, default=8, help="how many prompts (rows)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt and model (columns)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--scale", type=int, default=2, help="pixel upscaling of the written grid")
    p.add_argument("--out", default=os.path.join(common.ROOT, "docs", "toy-prompts.png"))
    return p.parse_args(argv)


def main(args):
    prompts = [p for p, _ in read_prompts(args.prompts)][:args.n]
    prompts_b = [p for p, _ in read_prompts(args.prompts_b)][:args.n] if args.prompts_b else prompts
    seeds = [s for _ in prompts for s in range(args.seeds)]
    halves = []
    for path, texts in ((args.a, prompts), (args.b, prompts_b)):
        jobs = [p for p in texts for _ in range(args.seeds)]
        model = TextToImage.from_checkpoint(path)
        with torch.no_grad():
            images = to_uint8(model.generate(jobs, seeds, cfg_scale=args.cfg))  # (n * seeds, H, W, 3)
        H, W = images.shape[1:3]
        halves.append(images.reshape(len(prompts), args.seeds, H, W, 3).transpose(0, 2, 1, 3, 4)
                      .reshape(len(prompts) * H, args.seeds * W, 3))
    gap = np.full((halves[0].shape[0], 8, 3), 255, dtype=np.uint8)
    grid = Image.fromarray(np.concatenate([halves[0], gap, halves[1]], axis=1))
    grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.NEAREST)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}: left {args.a}, right {args.b}, seeds 0-{args.seeds - 1}; rows:")
    print("\n".join(f"{i + 1}. {p}" + (f" | {q}" if q != p else "") for i, (p, q) in enumerate(zip(prompts, prompts_b))))


if __name__ == "__main__":
    main(parse_args())
