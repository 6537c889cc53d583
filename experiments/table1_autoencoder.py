"""Table 1 in miniature: reconstruction quality of AE-4, AE-8, AE-16 and Fourier-AE-16 on real photographs.

The paper (emu_paper.txt, section 3.1, Table 1) keeps the autoencoder's architecture fixed, changes
only the latent channels, then adds the Fourier feature transform, and measures reconstructions on
ImageNet: SSIM 0.80 / 0.86 / 0.92 / 0.93 and PSNR 28.64 / 30.95 / 34.00 / 34.19 dB. Here the four
variants are the toy preset of train_ae.py (4x downsampling, adversarial loss from step 400), trained
with the same budget on crops of real photographs and measured on photographs none of them saw.

The photographs are the ones scikit-image ships inside its wheel (`skimage/data`), each public domain
or CC0 by its author (skimage/data/_fetchers.py gives the licence of each). The files are only read,
never imported, so the package's dependencies are not needed:

    .venv/bin/pip install --no-deps scikit-image==0.26.0   # only for this experiment
    .venv/bin/python experiments/table1_autoencoder.py      # about 12 minutes on 2 CPU cores

`--photos DIR` takes any folder of photographs instead (then `--heldout` names the held-out files).
Every photograph is resized to a shorter side of `--photo-size`; training crops are cut at random
from the training photographs, the held-out set is every `--size` tile of the held-out ones. Each
variant is trained by train_ae.py itself. Writes OUT/results.md (the table), OUT/reconstructions.png
(the held-out photographs through each autoencoder, side by side) and OUT/heldout_psnr.png (held-out
PSNR during training).
"""
import argparse
import importlib.util
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emu.models.first_stage import load_autoencoder  # noqa: E402
from emu.checkpoint import read_metrics  # noqa: E402
from emu.datasets.folders import IMAGE_EXTENSIONS, from_uint8, open_rgb, to_uint8  # noqa: E402
from emu.evaluation.metrics import psnr, ssim  # noqa: E402
from emu.evaluation.plot import metric_series, plot_curves  # noqa: E402
from common import run  # noqa: E402  (experiments/common.py)

# scikit-image's bundled photographs and their licences (skimage/data/_fetchers.py)
SKIMAGE_TRAIN = {
    "astronaut.png": "public domain (NASA)", "rocket.jpg": "public domain (SpaceX)",
    "hubble_deep_field.jpg": "public domain (NASA)", "retina.jpg": "CC0", "ihc.png": "no known copyright restrictions",
    "camera.png": "CC0 (Lav Varshney)", "brick.png": "CC0 (CC0Textures)", "grass.png": "CC0 (CC0Textures)",
    "gravel.png": "CC0 (CC0Textures)",
}
SKIMAGE_HELDOUT = {"chelsea.png": "CC0 (Stefan van der Walt)", "coffee.png": "CC0 (Rachel Michetti)"}

# (name, train_ae.py flags): only the latent channels and the Fourier features change
VARIANTS = (
    ("AE-4", ["--latent-channels", "4", "--no-fourier"]),
    ("AE-8", ["--latent-channels", "8", "--no-fourier"]),
    ("AE-16", ["--latent-channels", "16", "--no-fourier"]),
    ("Fourier-AE-16", ["--latent-channels", "16", "--fourier"]),
)
PAPER = {"AE-4": (0.80, 28.64), "AE-8": (0.86, 30.95), "AE-16": (0.92, 34.00), "Fourier-AE-16": (0.93, 34.19)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default=None, help="folder of photographs (default: scikit-image's bundled ones)")
    p.add_argument("--heldout", default=None,
                   help="comma-separated file names held out for evaluation (default with scikit-image: chelsea, coffee)")
    p.add_argument("--out", default="runs/exp-table1", help="everything goes here")
    p.add_argument("--photo-size", type=int, default=256, help="every photograph is resized to this shorter side")
    p.add_argument("--size", type=int, default=32, help="side of the training crops and of the held-out tiles")
    p.add_argument("--crops", type=int, default=3000, help="random training crops cut from the training photographs")
    p.add_argument("--steps", type=int, default=600, help="training steps of each autoencoder (train_ae.py --steps)")
    p.add_argument("--bs", type=int, default=16, help="batch size of each autoencoder")
    p.add_argument("--disc-start", type=int, default=400, help="step at which the adversarial loss starts")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and of every training run")
    p.add_argument("--variants", default=",".join(name for name, _ in VARIANTS),
                   help="comma-separated subset of the variants to train (default: all four)")
    args = p.parse_args(argv)
    known = [name for name, _ in VARIANTS]
    args.variants = args.variants.split(",")
    for name in args.variants:
        if name not in known:
            p.error(f"--variants: unknown variant {name!r} (known: {', '.join(known)})")
    return args


def find_photos(args):
    """(folder, {file: licence} to train on, {file: licence} held out)."""
    if args.photos is None:
        spec = importlib.util.find_spec("skimage")
        if spec is None or spec.origin is None:
            raise SystemExit("scikit-image is not installed: `pip install --no-deps scikit-image==0.26.0` "
                             "(its photographs are read, the package is not imported), or give --photos DIR")
        folder, licences = os.path.join(os.path.dirname(spec.origin), "data"), {**SKIMAGE_TRAIN, **SKIMAGE_HELDOUT}
        held_names = args.heldout.split(",") if args.heldout else list(SKIMAGE_HELDOUT)
    else:
        folder = args.photos
        if not os.path.isdir(folder):
            raise SystemExit(f"{folder}: photo folder not found")
        if not args.heldout:
            raise SystemExit("--photos needs --heldout: the file names to evaluate on")
        licences = {n: "licence not given" for n in sorted(os.listdir(folder))
                    if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS}
        held_names = args.heldout.split(",")
    held = {n: licences.get(n, "?") for n in held_names}
    train = {n: lic for n, lic in licences.items() if n not in held}
    for name in [*train, *held]:
        if not os.path.isfile(os.path.join(folder, name)):
            raise SystemExit(f"{os.path.join(folder, name)}: photograph not found")
    if not train:
        raise SystemExit(f"{folder}: no photographs left to train on")
    return folder, train, held


def load_photo(path, short_side):
    """A photograph as an (H, W, 3) uint8 array with its shorter side resized to `short_side`."""
    im = open_rgb(path)  # grayscale photographs become RGB
    scale = short_side / min(im.size)
    return np.asarray(im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC))


def tiles(photo, size):
    """Every whole, non-overlapping size x size tile of an (H, W, 3) array, row by row."""
    h, w = photo.shape[0] // size, photo.shape[1] // size
    return [photo[i * size:(i + 1) * size, j * size:(j + 1) * size] for i in range(h) for j in range(w)]


def write_dataset(folder, photos_dir, train, held, args):
    """The folder train_ae.py reads: random training crops first, the held-out tiles last (its
    --holdout takes the last N images). Returns (number of held-out tiles, {photo: its resized array})."""
    os.makedirs(folder)
    rng = np.random.default_rng(args.seed)
    train_photos = [load_photo(os.path.join(photos_dir, n), args.photo_size) for n in sorted(train)]
    for i in range(args.crops):
        photo = train_photos[rng.integers(len(train_photos))]
        top, left = rng.integers(photo.shape[0] - args.size + 1), rng.integers(photo.shape[1] - args.size + 1)
        crop = photo[top:top + args.size, left:left + args.size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        save_pair(folder, f"0-train-{i:05d}", crop)
    held_photos, n_held = {}, 0
    for name in sorted(held):
        held_photos[name] = load_photo(os.path.join(photos_dir, name), args.photo_size)
        for j, tile in enumerate(tiles(held_photos[name], args.size)):
            save_pair(folder, f"1-heldout-{os.path.splitext(name)[0]}-{j:04d}", tile)
            n_held += 1
    return n_held, held_photos


def save_pair(folder, key, image):
    Image.fromarray(np.ascontiguousarray(image)).save(os.path.join(folder, key + ".png"))
    with open(os.path.join(folder, key + ".txt"), "w") as f:
        f.write("a photograph\n")



@torch.no_grad()
def reconstruct(ae, x, bs=64):
    return torch.cat([ae.decode(ae.encode(x[i:i + bs])).clamp(-1, 1) for i in range(0, len(x), bs)])


def mean_and_error(values):
    """Mean and standard error of a 1-D tensor."""
    v = values.double()
    return v.mean().item(), (v.std() / len(v) ** 0.5).item()


def side_by_side(path, held_photos, models, size, crop=128, zoom=2):
    """One row per held-out photograph (its centre crop), one column per model, originals first."""
    columns = ["original", *models]
    rows = []
    for name, photo in held_photos.items():
        h, w = photo.shape[:2]
        c = min(crop, h, w) // 8 * 8
        top, left = (h - c) // 2, (w - c) // 2
        x = from_uint8([photo[top:top + c, left:left + c]])
        cells = [photo[top:top + c, left:left + c]] + [to_uint8(reconstruct(ae, x))[0] for ae in models.values()]
        rows.append(np.concatenate([np.pad(cell, ((0, 4), (0, 4), (0, 0)), constant_values=255) for cell in cells], axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0)).resize((rows[0].shape[1] * zoom, len(rows) * rows[0].shape[0] * zoom),
                                                                  Image.NEAREST)
    canvas = Image.new("RGB", (grid.width, grid.height + 16), "white")
    canvas.paste(grid, (0, 16))
    draw = ImageDraw.Draw(canvas)
    cell_w = grid.width // len(columns)
    for i, label in enumerate(columns):
        draw.text((i * cell_w + cell_w // 2, 8), label, fill="black", anchor="mm")
    canvas.save(path)


def main(args):
    photos_dir, train, held = find_photos(args)
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out}: already exists; remove it or give another --out")
    data = os.path.join(args.out, "data")
    n_held, held_photos = write_dataset(data, photos_dir, train, held, args)
    print(f"{args.crops} training crops from {len(train)} photographs, {n_held} held-out tiles from "
          f"{', '.join(sorted(held))} (photographs from {photos_dir})", flush=True)

    models, rows, curves = {}, [], {}
    for name, flags in VARIANTS:
        if name not in args.variants:
            continue
        out = os.path.join(args.out, name)
        log = run("train_ae.py", "--data", data, "--out", out, "--image-size", str(args.size), "--holdout", str(n_held),
                  "--steps", str(args.steps), "--bs", str(args.bs), "--adversarial", "--disc-start", str(args.disc_start),
                  "--cooldown", "0",
                  "--eval-every", str(max(1, args.steps // 6)), "--seed", str(args.seed), *flags)
        print("   " + log.strip().splitlines()[-2], flush=True)
        ae = models[name] = load_autoencoder(out)
        per_photo = {}
        for photo, image in held_photos.items():
            x = from_uint8(tiles(image, args.size))
            r = reconstruct(ae, x)
            per_photo[photo] = (psnr(r, x), ssim(r, x))
        all_psnr = torch.cat([p for p, _ in per_photo.values()])
        all_ssim = torch.cat([s for _, s in per_photo.values()])
        rows.append((name, ae.cfg.latent_channels, ae.cfg.fourier, mean_and_error(all_ssim), mean_and_error(all_psnr),
                     {photo: (s.mean().item(), p.mean().item()) for photo, (p, s) in per_photo.items()}))
        series = metric_series(read_metrics(os.path.join(out, "metrics.jsonl")), "step", ["heldout_psnr"])["heldout_psnr"]
        final = json.load(open(os.path.join(out, "metrics.json")))
        curves[name] = series + [(final["steps"], final["psnr"])]

    side_by_side(os.path.join(args.out, "reconstructions.png"), held_photos, models, args.size)
    plot_curves(os.path.join(args.out, "heldout_psnr.png"), curves, title="held-out PSNR (dB) during training")
    lines = [f"# Table 1 in miniature: {n_held} held-out {args.size}x{args.size} tiles of real photographs", "",
             "| model | channels | Fourier | SSIM | PSNR (dB) | paper SSIM | paper PSNR |", "|---|---|---|---|---|---|---|"]
    for name, channels, fourier, (s, s_err), (p, p_err), _ in rows:
        lines.append(f"| {name} | {channels} | {'yes' if fourier else 'no'} | {s:.3f} ± {s_err:.3f} | {p:.2f} ± {p_err:.2f} | "
                     f"{PAPER[name][0]:.2f} | {PAPER[name][1]:.2f} |")
    lines += ["", "± is the standard error over tiles. Per held-out photograph (SSIM / PSNR):", "",
              "| model | " + " | ".join(held_photos) + " |", "|---|" + "---|" * len(held_photos)]
    for name, *_, per_photo in rows:
        lines.append(f"| {name} | " + " | ".join(f"{s:.3f} / {p:.2f}" for s, p in per_photo.values()) + " |")
    lines += ["", f"Training: {args.crops} random {args.size}-pixel crops of {', '.join(sorted(train))}; "
              f"{args.steps} steps at batch {args.bs} each, adversarial loss from step {args.disc_start}, seed {args.seed}.",
              "Photographs: " + "; ".join(f"{n} ({lic})" for n, lic in sorted({**train, **held}.items())) + "."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}/results.md, reconstructions.png and heldout_psnr.png")


if __name__ == "__main__":
    main(parse_args())
