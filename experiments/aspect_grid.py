"""One prompt at the demo's five aspect ratios (9:16, 2:3, 1:1, 3:2, 16:9), to check by eye that a model
draws non-square pictures: one row per model and seed, the ratios left to right, the same seed across a row.

    python experiments/aspect_grid.py      # after toy.sh: its quality-tuned model -> docs/toy-aspect-ratios.png
    python experiments/aspect_grid.py --ckpt runs/qtune/best.pt --ckpt runs/bucketed/ckpt.pt --seeds 2

Each size is the one `sample.py --aspect` draws (emu.datasets.buckets.make_buckets at the training resolution).
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image

import common  # noqa: F401  (puts the repository on sys.path)
from emu.arch import image_multiple
from emu.datasets.buckets import make_buckets
from emu.datasets.folders import to_uint8
from emu.pipeline import TextToImage


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", help="a latent model's checkpoint (repeat for several; default "
                                                   "runs/qtune/best.pt)")
    p.add_argument("--prompt", default="two red circles on the left on a teal background")
    p.add_argument("--seeds", type=int, default=3, help="rows per model")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--gap", type=int, default=4, help="white pixels between the pictures")
    p.add_argument("--scale", type=int, default=3, help="pixel upscaling of the written grid")
    p.add_argument("--out", default=os.path.join(common.ROOT, "docs", "toy-aspect-ratios.png"))
    return p.parse_args(argv)


def main(args):
    rows, names = [], []
    for path in args.ckpt or ["runs/qtune/best.pt"]:
        model = TextToImage.from_checkpoint(path)
        buckets = make_buckets(model.image_size, image_multiple(model.model, model.ae))
        for seed in range(args.seeds):
            with torch.no_grad():
                rows.append([to_uint8(model.generate([args.prompt], [seed], cfg_scale=args.cfg, size=(b.width, b.height)))[0]
                             for b in buckets])
            names.append(f"{path}, seed {seed}")
    height = max(image.shape[0] for row in rows for image in row)
    width = max(sum(image.shape[1] for image in row) + args.gap * (len(row) - 1) for row in rows)
    grid = np.full((len(rows) * (height + args.gap) - args.gap, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        x, y = 0, r * (height + args.gap)
        for image in row:  # top-aligned, left to right
            grid[y:y + image.shape[0], x:x + image.shape[1]] = image
            x += image.shape[1] + args.gap
    out = Image.fromarray(grid)
    out = out.resize((out.width * args.scale, out.height * args.scale), Image.NEAREST)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    out.save(args.out)
    sizes = ", ".join(f"{b.name} {b.width}x{b.height}" for b in buckets)
    print(f"wrote {args.out}: {args.prompt!r} at {sizes}; rows:\n" + "\n".join(f"{i + 1}. {n}" for i, n in enumerate(names)))


if __name__ == "__main__":
    main(parse_args())
