"""Noise offset: does it let the model make very dark, very bright and high-contrast images?

The paper pretrains with a noise offset of 0.02 in its final stage "to facilitate high-contrast
generation" (emu_paper.txt, section 3.2; the idea is from crosslabs.org's offset-noise post). Plain
DDPM noise never changes an image's mean colour much at the last timestep, so a model without the
offset drifts towards mid-grey means. Steps, each through the project's own scripts:

  1. pretrain.py twice from the same autoencoder, towers, data and seed: --noise-offset 0 and
     --noise-offset OFFSET (0.1 by default: the toy world's 32-pixel latents are tiny, and 0.1 is the
     value the offset-noise post used; the paper's 0.02 is pretrain.py's default)
  2. sample.py from each, on the toy prompts
  3. the mean brightness (luma) and contrast (standard deviation of luma) of every generated image
     against the training images

    python experiments/noise_offset.py     # about 5 minutes on 2 CPU cores, after `bash toy.sh`
Writes OUT/results.md and OUT/brightness.png, OUT/contrast.png (histograms).
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emu.evaluation.plot import plot_curves  # noqa: E402
from common import fresh_out, run, write_results  # noqa: E402  (experiments/common.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/toy/haystack", help="the training images")
    p.add_argument("--ae", default="runs/ae", help="the autoencoder (train_ae.py)")
    p.add_argument("--clip", default="runs/towers/clip", help="CLIP directory")
    p.add_argument("--t5", default="runs/towers/t5", help="T5 directory")
    p.add_argument("--prompts", default="data/prompts/toy.tsv", help="prompts to sample")
    p.add_argument("--n", type=int, default=2, help="images per prompt")
    p.add_argument("--offset", type=float, default=0.1, help="the noise offset of the second model")
    p.add_argument("--steps", type=int, default=1600, help="pretraining steps of each model")
    p.add_argument("--bs", type=int, default=16, help="pretraining batch size")
    p.add_argument("--out", default="runs/exp-noise-offset", help="everything goes here")
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining and sampling")
    return p.parse_args(argv)


def luma_stats(folder, limit=None):
    """(mean brightness, contrast) in [0, 1] of each PNG in a folder (grid.png excepted): the mean and
    the standard deviation of its luma (ITU-R BT.601 weights)."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png") and n != "grid.png")[:limit]
    if not names:
        raise SystemExit(f"{folder}: no images")
    stats = []
    for name in names:
        rgb = np.asarray(Image.open(os.path.join(folder, name)).convert("RGB"), dtype=np.float64) / 255.0
        luma = rgb @ np.array([0.299, 0.587, 0.114])
        stats.append((luma.mean(), luma.std()))
    return np.array(stats)


def histogram(values, bins):
    """[(bin centre, fraction of values in the bin)] over `bins` equal bins of [0, 1]."""
    counts, edges = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0, 1))
    return [(float((edges[i] + edges[i + 1]) / 2), float(c / len(values))) for i, c in enumerate(counts)]


def main(args):
    fresh_out(args.out)
    sets = {}
    for name, offset in (("no offset", 0.0), (f"offset {args.offset:g}", args.offset)):
        tag = "offset-" + f"{offset:g}"
        ckpt_dir, samples = os.path.join(args.out, f"pretrain-{tag}"), os.path.join(args.out, f"samples-{tag}")
        run("pretrain.py", "--data", args.data, "--ae", args.ae, "--clip", args.clip, "--t5", args.t5, "--out", ckpt_dir,
            "--steps", str(args.steps), "--bs", str(args.bs), "--noise-offset", str(offset), "--seed", str(args.seed))
        run("sample.py", "--ckpt", os.path.join(ckpt_dir, "ckpt.pt"), "--prompts", args.prompts, "--n", str(args.n),
            "--seed", str(args.seed), "--out", samples)
        sets[name] = luma_stats(samples)
    training = luma_stats(args.data, limit=1000)
    sets = {"training images": training, **sets}

    lines = [f"# Noise offset: brightness and contrast of generated images ({args.steps} pretraining steps each)", "",
             "| images | count | brightness mean ± sd | brightness 5th–95th pct | dark (< 0.25) | bright (> 0.75) "
             "| contrast mean | contrast 95th pct |", "|---|---|---|---|---|---|---|---|"]
    for name, s in sets.items():
        b, c = s[:, 0], s[:, 1]
        lines.append(f"| {name} | {len(s)} | {b.mean():.3f} ± {b.std():.3f} | {np.percentile(b, 5):.3f}–{np.percentile(b, 95):.3f} | "
                     f"{100 * np.mean(b < 0.25):.1f}% | {100 * np.mean(b > 0.75):.1f}% | {c.mean():.3f} | {np.percentile(c, 95):.3f} |")
    lines += ["", f"Training images: the first {len(training)} of {args.data}. Brightness is an image's mean luma, contrast its "
              "standard deviation, both on [0, 1]."]
    plot_curves(os.path.join(args.out, "brightness.png"), {k: histogram(s[:, 0], 20) for k, s in sets.items()},
                title="mean brightness of each image (fraction per bin)", x_label="brightness")
    plot_curves(os.path.join(args.out, "contrast.png"), {k: histogram(s[:, 1], 20) for k, s in sets.items()},
                title="contrast of each image (fraction per bin)", x_label="contrast")
    write_results(args.out, lines)
    print(f"wrote {args.out}/results.md, brightness.png and contrast.png")


if __name__ == "__main__":
    main(parse_args())
