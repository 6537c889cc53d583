"""Does Kandinsky's inpainting decoder paint what its prompt says into a hole?

For each of the 100 toy prompts, a real toy image that shows it exactly (emu.evaluation.accuracy.reference_images)
loses a box of half its width and height around the prompt's objects (centred on the scene's anchor,
emu.datasets.toyworld.POSITIONS). The hole is then filled:

  * with the prompt, by the inpainting decoder (pretrain.py --arch kandinsky --preset toy-inpaint), through
    the same path as `sample.py --mode inpaint --box ...`;
  * without a prompt: the rest of the image's CLIP embedding guides the fill (sample.py's default);
  * with the prompt of another scene (the next prompt in the list): does the fill follow the text or the image?
  * with the background colour of the image (what is left when the objects are cut out), as the floor.

The attribute classifier (the faithfulness judge's, as in the README's accuracy tables) reads each result
against the image's own prompt and, for the swapped prompt, against the swapped one. The pixels outside the
hole are checked to be unchanged. Writes OUT/results.md, OUT/results.json (the same numbers) and
OUT/inpainting.png (rows: the image, the hole, the fills; columns: the first --show prompts).

    python experiments/inpainting.py    # after toy.sh and the Kandinsky commands in the README: about a minute
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

import common  # noqa: F401  (puts the repository on sys.path)
from emu.datasets.folders import from_uint8, make_grid, read_prompts, to_uint8
from emu.datasets.toyworld import BACKGROUNDS, POSITIONS, parse_caption
from emu.evaluation.accuracy import accuracy_markdown, accuracy_table, prompt_hits, reference_images
from emu.evaluation.faithfulness import load_classifier
from emu.pipeline import TextToImage
from emu.variants.inpaint import box_mask, paste_known


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/kandinsky/inpaint/ckpt.pt", help="the inpainting decoder")
    p.add_argument("--prior", default=None, help="the image prior that embeds the prompts (default: the decoder's own)")
    p.add_argument("--prompts", default=os.path.join(common.ROOT, "data", "prompts", "toy.tsv"))
    p.add_argument("--judge", default="runs/judges/attributes.pt", help="the attribute classifier (eval_pairs.py's judge)")
    p.add_argument("--hole", type=float, default=0.5, help="side of the hole, as a fraction of the image's")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=25, help="DDIM sampling steps")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of every fill")
    p.add_argument("--show", type=int, default=8, help="prompts shown in the figure")
    p.add_argument("--out", default="runs/exp-inpainting", help="everything goes here")
    return p.parse_args(argv)


def hole_box(prompt, side):
    """(left, top, right, bottom) fractions of a box of `side` around where the prompt's objects stand."""
    x, y = POSITIONS[parse_caption(prompt)["position"] or "center"]
    clip = lambda v: min(max(v, 0.0), 1.0 - side)
    left, top = clip(x - side / 2), clip(y - side / 2)
    return left, top, left + side, top + side


def main(args):
    common.fresh_out(args.out)
    prompts = [p for p, _ in read_prompts(args.prompts)]
    model = TextToImage.from_checkpoint(args.ckpt, prior=args.prior)
    if not model.model.cfg.cond_channels:
        raise SystemExit(f"{args.ckpt}: not an inpainting decoder (pretrain.py --arch kandinsky --preset toy-inpaint)")
    classifier = load_classifier(args.judge)
    size = model.image_size
    real = reference_images(prompts, seed=args.seed, size=size)  # (N, H, W, 3) uint8
    images = from_uint8(real)  # (N, 3, H, W) in [-1, 1]
    masks = torch.cat([box_mask(size, hole_box(p, args.hole)) for p in prompts])  # (N, 1, H, W), 1 in the hole
    seeds = [args.seed] * len(prompts)
    encoder = model.text_encoder
    swapped = prompts[1:] + prompts[:1]

    fills = {}
    fills["the prompt"] = model.generate(prompts, seeds, args.cfg, args.steps, inpaint=(images, masks))
    unprompted = encoder.embed_images(images * (1 - masks))  # sample.py's fill without a prompt
    fills["no prompt (the rest of the image guides it)"] = model.generate([""] * len(prompts), seeds, args.cfg, args.steps,
                                                                          image_embeds=unprompted, inpaint=(images, masks))
    fills["another scene's prompt"] = model.generate(swapped, seeds, args.cfg, args.steps, inpaint=(images, masks))
    background = torch.tensor([BACKGROUNDS[parse_caption(p)["background"]] for p in prompts]) * 2 - 1  # (N, 3) in [-1, 1]
    fills["the background colour (floor)"] = paste_known(background[:, :, None, None].expand_as(images), images, masks)

    outside = 1 - masks
    changed = max(float(((fill - images) * outside).abs().max()) for fill in fills.values())
    rows = {"the real images (ceiling)": real}
    rows.update({name: to_uint8(fill) for name, fill in fills.items()})
    tables = {name: accuracy_table(prompt_hits(classifier, im, prompts), seed=args.seed) for name, im in rows.items()}
    tables["another scene's prompt, read against that prompt"] = accuracy_table(
        prompt_hits(classifier, rows["another scene's prompt"], swapped), seed=args.seed)

    lines = [f"# Inpainting a hole of {args.hole:g} x {args.hole:g} around the objects", "",
             f"decoder {args.ckpt}; {len(prompts)} prompts, seed {args.seed}, {args.steps} DDIM steps, guidance {args.cfg:g}; "
             f"read by {args.judge}", "",
             "What the attribute classifier reads against the image's own prompt (accuracy %, 95% interval):", "",
             accuracy_markdown(tables), "",
             f"largest change of a pixel outside the hole, in [-1, 1] units: {changed:.2e}"]
    common.write_results(args.out, lines)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": tables, "changed_outside": changed, "prompts": len(prompts)}, f, indent=2)

    k = min(args.show, len(prompts))
    holes = to_uint8(paste_known(torch.ones_like(images), images, masks))  # the hole drawn white
    strips = [real[:k], holes[:k]] + [rows[name][:k] for name in fills]
    grid = make_grid(np.concatenate(strips), ncol=k)  # one row per strip
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(os.path.join(args.out, "inpainting.png"))
    print(f"wrote {os.path.join(args.out, 'inpainting.png')}: rows the image, the hole, then " + ", ".join(fills)
          + "; columns the first prompts:\n" + "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts[:k])))


if __name__ == "__main__":
    main(parse_args())
