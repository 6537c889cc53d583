"""Does a toy model read each word of its prompt? Real photogenic toy images are encoded, noised to step t,
and denoised again (DDIM with classifier-free guidance, as SDEdit does) twice: once with the image's own
caption, once with that caption's value of one attribute swapped for another (a circle becomes a square,
red becomes orange, ...). The judges' attribute classifier then reads the attribute in both results.

A model that reads the word draws the asked value more often under the swapped caption than the own value;
a model that ignores it draws the same images under both captions, so "asked" stays at the rate at which
the classifier confuses the two values. At small t the image is nearly decided and even a model that reads
the word keeps the image's own value; at large t the caption decides.

    python experiments/word_swap.py --ckpt runs/pretrain/ckpt.pt            # after toy.sh
    python experiments/word_swap.py --ckpt runs/qtune/best.pt --attributes shape --t 200,400,600

For each attribute and t it prints: with the own caption, the share of results showing the own value; with
the swapped caption, the shares showing the own value and the asked one.
"""
import argparse
import dataclasses

import torch

import common  # noqa: F401  (puts the repository on sys.path)
from emu.datasets import toyworld
from emu.datasets.folders import from_uint8, to_uint8
from emu.diffusion import classifier_free_guidance
from emu.evaluation.accuracy import prompt_hits
from emu.evaluation.faithfulness import CLASSES, load_classifier
from emu.pipeline import TextToImage


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/pretrain/ckpt.pt", help="a latent diffusion checkpoint (--arch ldm)")
    p.add_argument("--classifier", default="runs/judges/attributes.pt", help="the judges' attribute classifier")
    p.add_argument("--attributes", default="shape,color,position", help="comma-separated attributes to swap")
    p.add_argument("--t", default="200,400,600,800", help="comma-separated steps to noise the images to")
    p.add_argument("--n", type=int, default=100, help="how many images (photogenic scenes of --seed)")
    p.add_argument("--seed", type=int, default=777, help="world seed of the images (not the training world's)")
    p.add_argument("--steps-per", type=int, default=40, help="one DDIM step per this many diffusion steps")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--cfg-rescale", type=float, default=None, metavar="PHI",
                   help="guidance rescale in [0, 1], 0 = plain guidance (default: the model's own, as sample.py)")
    return p.parse_args(argv)


def swapped(scene, attribute):
    """The scene with `attribute` moved on to the next value in its list: the caption to ask for."""
    values = CLASSES[attribute]
    return dataclasses.replace(scene, **{attribute: values[(values.index(getattr(scene, attribute)) + 1) % len(values)]})


@torch.no_grad()
def redraw(model, latents, captions, t0, steps_per, cfg, rescale, seed=0):
    """SDEdit: noise the clean `latents` (model.ae.encode of the images) to step t0 (the same noise for every
    call with the same seed), run DDIM down to the clean image with `captions`, and decode. t0 = -1 returns
    the images through the autoencoder alone."""
    x = latents
    if t0 >= 0:
        diffusion, n = model.objective, len(latents)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        text, uncond = model.text_encoder.encode(captions), model.text_encoder.encode([""] * n)
        guided = lambda x_t, t: classifier_free_guidance(model.model, x_t, t, text, uncond, cfg, rescale=rescale)
        x = diffusion.sample(guided, diffusion.q_sample(x, torch.full((n,), t0), noise), steps=max(2, t0 // steps_per + 1),
                             start=t0)
    return model.ae.decode(x).clamp(-1, 1)


def shows(classifier, images, scenes, attribute):
    """(N,) bool: does each image show its scene's value of `attribute`, as the classifier reads it."""
    return prompt_hits(classifier, to_uint8(images), [toyworld.caption(s) for s in scenes])[attribute] == 1.0


def main(args):
    attributes, steps = args.attributes.split(","), [int(t) for t in args.t.split(",")]
    unknown = [a for a in attributes if a not in CLASSES]
    if unknown:
        raise SystemExit(f"error: --attributes {','.join(unknown)}: choose from {','.join(CLASSES)}")
    model = TextToImage.from_checkpoint(args.ckpt)
    if any(not -1 <= t < model.objective.num_timesteps for t in steps):
        raise SystemExit(f"error: --t {args.t}: each step must lie in -1 .. {model.objective.num_timesteps - 1}")
    if model.arch.name != "ldm":
        raise SystemExit(f"error: {args.ckpt} is an --arch {model.arch.name} model; this measure is for --arch ldm")
    rescale = model.cfg_rescale if args.cfg_rescale is None else args.cfg_rescale
    if not 0.0 <= rescale <= 1.0:
        raise SystemExit(f"error: --cfg-rescale {rescale}: must lie in 0 .. 1")
    classifier = load_classifier(args.classifier)
    examples = [toyworld.make_example(i, args.seed, model.image_size, photogenic=True) for i in range(args.n)]
    with torch.no_grad():
        latents = model.ae.encode(from_uint8([image for image, _, _ in examples]))  # once: every redraw starts here
    scenes = [toyworld.scene_from_attributes(meta["attributes"]) for _, _, meta in examples]
    own_captions = [toyworld.caption(s) for s in scenes]
    print(f"{args.ckpt}: {args.n} photogenic toy images (world seed {args.seed}), guidance {args.cfg}, rescaled {rescale}")
    print("| attribute | t | own caption: own | swapped caption: own | swapped caption: asked |\n|---|---|---|---|---|")
    for attribute in attributes:
        asked = [swapped(s, attribute) for s in scenes]
        for t0 in steps:
            own = redraw(model, latents, own_captions, t0, args.steps_per, args.cfg, rescale)
            other = redraw(model, latents, [toyworld.caption(s) for s in asked], t0, args.steps_per, args.cfg, rescale)
            rates = [shows(classifier, own, scenes, attribute).mean(), shows(classifier, other, scenes, attribute).mean(),
                     shows(classifier, other, asked, attribute).mean()]
            print(f"| {attribute} | {t0} | " + " | ".join(f"{100 * r:.0f}%" for r in rates) + " |")


if __name__ == "__main__":
    main(parse_args())
