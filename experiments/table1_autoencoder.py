"""Table 1 done the paper's way: AE-4/8/16, the adversarial loss and the Fourier features, on real photographs.

The paper (emu_paper.txt, section 3.1, Table 1) keeps the autoencoder's architecture fixed, changes
only the latent channels, then adds the Fourier feature transform and an adversarial loss at once, and
measures reconstructions on ImageNet: SSIM 0.80 / 0.86 / 0.92 / 0.93 and PSNR 28.64 / 30.95 / 34.00 /
34.19 dB. Its AE-4/8/16 rows are the plain autoencoder. Here each step is its own row, so that the
Fourier features and the adversarial loss are each measured alone:

    AE-4, AE-8, AE-16                  no Fourier features, no adversarial loss
    AE-16 + adversarial                the adversarial loss alone
    Fourier-AE-16                      the Fourier features alone
    Fourier-AE-16 + adversarial        both: the paper's Fourier-AE-16, and Emu's autoencoder

Every variant is train_ae.py itself, with the same flags but for the ones its row names (VARIANTS).
The main table downsamples 8x as the paper's does (three 2x2 downsamplings, preset `toy-f8`, 64-pixel
crops: 8x8 latents); the toy world's 4x autoencoder (preset `toy`, 32-pixel crops) is measured beside it.
Every run starts from the PCA code of the training crops' patches (`--pca-start`: the toy presets' linear
patch path set to the best linear code, the deep path's output at zero; 28.3 dB on held-out photographs at 8x
before any step), warms up, holds its learning rate and decays it over its last third (train_ae.py's
schedule). From the PCA code AE-16's held-out curve flattens within the budget (8x: 31.4 dB at step 400,
31.9 at 600, 32.3 after the decay at 1000); from a random start it was still rising by 0.5 dB every 100
steps at step 900 (31.6 dB after 1500 steps).

The photographs come from packages installed beforehand (experiments/photos.py says how; nothing is
downloaded): scikit-image's bundled ones, Debian's mate-backgrounds and plasma-workspace-wallpapers,
each with the licence its package states. Eight are held out (photos.HELDOUT) and measured as every
whole tile; the rest are cut into random training crops.

    .venv/bin/pip install --no-deps scikit-image==0.26.0
    sudo apt-get install mate-backgrounds plasma-workspace-wallpapers     # or --debian-root: photos.py
    .venv/bin/python experiments/table1_autoencoder.py                    # about 30 minutes on 2 CPU cores

`--photos DIR --heldout a.png,b.jpg` takes any folder of photographs instead. Writes OUT/results.md (the
tables, with each photograph's licence), OUT/reconstructions.png (the held-out photographs through each
8x autoencoder) and OUT/heldout_psnr_f8.png and _f4.png (held-out PSNR during training).

FID, the paper's third column, needs the Inception network's published weights, which cannot be had
here; no other distance is reported under its name.
"""
import argparse
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
from common import fresh_out, run, write_results  # noqa: E402  (experiments/common.py)
import photos as photo_sources  # noqa: E402  (experiments/photos.py)

# (name, train_ae.py flags): a row differs from another only in these
VARIANTS = (
    ("AE-4", ["--latent-channels", "4", "--no-fourier", "--no-adversarial"]),
    ("AE-8", ["--latent-channels", "8", "--no-fourier", "--no-adversarial"]),
    ("AE-16", ["--latent-channels", "16", "--no-fourier", "--no-adversarial"]),
    ("AE-16 + adversarial", ["--latent-channels", "16", "--no-fourier", "--adversarial"]),
    ("Fourier-AE-16", ["--latent-channels", "16", "--fourier", "--no-adversarial"]),
    ("Fourier-AE-16 + adversarial", ["--latent-channels", "16", "--fourier", "--adversarial"]),
)
# the paper's rows (SSIM, PSNR); its Fourier-AE-16 has the adversarial loss too
PAPER = {"AE-4": (0.80, 28.64), "AE-8": (0.86, 30.95), "AE-16": (0.92, 34.00), "Fourier-AE-16 + adversarial": (0.93, 34.19)}
# downsampling factor -> (train_ae.py preset, side of the crops and tiles)
SCALES = {8: ("toy-f8", 64), 4: ("toy", 32)}
# the paired differences the README asks about: (row, against)
COMPARISONS = (("Fourier-AE-16 + adversarial", "AE-16"), ("Fourier-AE-16", "AE-16"), ("AE-16 + adversarial", "AE-16"),
               ("Fourier-AE-16 + adversarial", "AE-16 + adversarial"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default=",".join(photo_sources.SOURCES),
                   help="comma-separated photograph sources (experiments/photos.py): skimage, mate, plasma")
    p.add_argument("--debian-root", default="/", help="where the Debian packages' files are (/ when installed; or "
                                                      "the folder their .deb files were unpacked into)")
    p.add_argument("--photos", default=None, help="a folder of photographs instead of --sources (then --heldout names files)")
    p.add_argument("--heldout", default=None,
                   help="comma-separated photographs held out for evaluation (default: photos.HELDOUT)")
    p.add_argument("--out", default="runs/exp-table1", help="everything goes here")
    p.add_argument("--photo-size", type=int, default=256, help="every photograph is resized to this shorter side")
    p.add_argument("--scales", default="8,4", help="downsampling factors to measure: 8 (the main table) and 4 (the toy's)")
    p.add_argument("--crops", type=int, default=4000, help="random training crops per scale")
    p.add_argument("--steps", default="8:1000,4:600", help="training steps per scale, factor:steps")
    p.add_argument("--bs", type=int, default=16, help="batch size of each autoencoder")
    p.add_argument("--disc-start", type=int, default=None,
                   help="step at which the adversarial loss starts (default: half of each scale's steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and of every training run")
    p.add_argument("--variants", default=",".join(name for name, _ in VARIANTS),
                   help="comma-separated subset of the variants to train (default: all six)")
    args = p.parse_args(argv)
    known = [name for name, _ in VARIANTS]
    args.variants = args.variants.split(",")
    for name in args.variants:
        if name not in known:
            p.error(f"--variants: unknown variant {name!r} (known: {', '.join(known)})")
    try:
        args.scales = [int(s) for s in args.scales.split(",")]
        args.steps = {int(k): int(v) for k, v in (item.split(":") for item in args.steps.split(","))}
    except ValueError:
        p.error(f"--scales {args.scales} / --steps {args.steps}: expected e.g. --scales 8,4 --steps 8:1000,4:600")
    for scale in args.scales:
        if scale not in SCALES or scale not in args.steps:
            p.error(f"--scales: {scale} needs to be one of {sorted(SCALES)} and have its steps in --steps")
    return args


def find_photos(args):
    """(photographs to train on, photographs held out): lists of photos.Photo."""
    if args.photos is None:
        found = photo_sources.find_photos(args.sources.split(","), args.debian_root)
        held_names = args.heldout.split(",") if args.heldout else list(photo_sources.HELDOUT)
    else:
        if not os.path.isdir(args.photos):
            raise SystemExit(f"{args.photos}: photo folder not found")
        if not args.heldout:
            raise SystemExit("--photos needs --heldout: the file names to evaluate on")
        found = [photo_sources.Photo(n, os.path.join(args.photos, n), "licence not given") for n in sorted(os.listdir(args.photos))
                 if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
        held_names = args.heldout.split(",")
    by_name = {photo.name: photo for photo in found}
    for name in held_names:
        if name not in by_name:
            where = args.photos or f"sources {args.sources}"
            raise SystemExit(f"{os.path.join(args.photos, name) if args.photos else name}: photograph not found ({where})")
    held = [by_name[n] for n in held_names]
    train = [photo for photo in found if photo.name not in held_names]
    if not train:
        raise SystemExit(f"{args.photos or args.sources}: no photographs left to train on")
    return train, held


def load_photo(path, short_side):
    """A photograph as an (H, W, 3) uint8 array with its shorter side resized to `short_side`."""
    im = open_rgb(path)  # grayscale photographs become RGB
    scale = short_side / min(im.size)
    return np.asarray(im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC))


def tiles(photo, size):
    """Every whole, non-overlapping size x size tile of an (H, W, 3) array, row by row."""
    h, w = photo.shape[0] // size, photo.shape[1] // size
    return [photo[i * size:(i + 1) * size, j * size:(j + 1) * size] for i in range(h) for j in range(w)]


def key(name):
    """A photograph's name as a file name: "mate/LadyBird.jpg" -> "mate-LadyBird"."""
    return os.path.splitext(name)[0].replace("/", "-")


def write_dataset(folder, train, held, size, args):
    """The folder train_ae.py reads: random training crops first, the held-out tiles last (its --holdout
    takes the last N images). Returns (number of held-out tiles, {photo name: its resized array})."""
    os.makedirs(folder)
    rng = np.random.default_rng(args.seed)
    train_photos = [load_photo(photo.path, args.photo_size) for photo in train]
    for i in range(args.crops):
        photo = train_photos[rng.integers(len(train_photos))]
        top, left = rng.integers(photo.shape[0] - size + 1), rng.integers(photo.shape[1] - size + 1)
        crop = photo[top:top + size, left:left + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        save_pair(folder, f"0-train-{i:05d}", crop)
    held_photos, n_held = {}, 0
    for photo in held:
        held_photos[photo.name] = load_photo(photo.path, args.photo_size)
        for j, tile in enumerate(tiles(held_photos[photo.name], size)):
            save_pair(folder, f"1-heldout-{key(photo.name)}-{j:04d}", tile)
            n_held += 1
    return n_held, held_photos


def save_pair(folder, name, image):
    Image.fromarray(np.ascontiguousarray(image)).save(os.path.join(folder, name + ".png"))
    with open(os.path.join(folder, name + ".txt"), "w") as f:
        f.write("a photograph\n")


def train_command(name, scale, data, out, n_held, args):
    """The train_ae.py command line of one variant at one downsampling factor."""
    preset, size = SCALES[scale]
    steps = args.steps[scale]
    disc_start = args.disc_start if args.disc_start is not None else steps // 2
    return ["train_ae.py", "--data", data, "--out", out, "--preset", preset, "--image-size", str(size), "--pca-start",
            "--holdout", str(n_held), "--steps", str(steps), "--bs", str(args.bs), "--disc-start", str(disc_start),
            "--eval-every", str(max(1, steps // 15)), "--save-every", str(steps), "--seed", str(args.seed),
            *dict(VARIANTS)[name]]


@torch.no_grad()
def reconstruct(ae, x, bs=64):
    return torch.cat([ae.decode(ae.encode(x[i:i + bs])).clamp(-1, 1) for i in range(0, len(x), bs)])


def mean_and_error(values):
    """Mean and standard error of a 1-D tensor."""
    v = values.double()
    return v.mean().item(), (v.std() / len(v) ** 0.5).item()


def side_by_side(path, held_photos, models, crop=64, zoom=2):
    """One row per held-out photograph (its centre crop, one 64-pixel tile), one column per model, originals first,
    drawn twice as large."""
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
        draw.text((i * cell_w + cell_w // 2, 8), label.replace(" + adversarial", " + adv"), fill="black", anchor="mm")
    canvas.save(path)


def measure(ae, held_photos, size):
    """{photo name: (PSNR, SSIM) per tile}: the held-out tiles through the autoencoder."""
    per_photo = {}
    for name, image in held_photos.items():
        x = from_uint8(tiles(image, size))
        r = reconstruct(ae, x)
        per_photo[name] = (psnr(r, x), ssim(r, x))
    return per_photo


def scale_table(scale, results, n_held, size):
    """The markdown lines of one downsampling factor's table, its paired differences and per-photograph values."""
    lines = [f"## {scale}x downsampling: {n_held} held-out {size}x{size} tiles, {size // scale}x{size // scale} latents", "",
             "| model | channels | Fourier | adversarial | SSIM | PSNR (dB) | paper SSIM | paper PSNR |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s, s_err = mean_and_error(r["ssim"])
        p, p_err = mean_and_error(r["psnr"])
        paper = PAPER.get(name)
        lines.append(f"| {name} | {r['channels']} | {'yes' if r['fourier'] else 'no'} | {'yes' if r['adversarial'] else 'no'} | "
                     f"{s:.3f} ± {s_err:.3f} | {p:.2f} ± {p_err:.2f} | {f'{paper[0]:.2f}' if paper else '-'} | "
                     f"{f'{paper[1]:.2f}' if paper else '-'} |")
    pairs = [(a, b) for a, b in COMPARISONS if a in results and b in results]
    if pairs:
        lines += ["", "Paired over the same tiles (± the standard error of the per-tile differences):", "",
                  "| difference | SSIM | PSNR (dB) |", "|---|---|---|"]
        for a, b in pairs:
            ds, ds_err = mean_and_error(results[a]["ssim"] - results[b]["ssim"])
            dp, dp_err = mean_and_error(results[a]["psnr"] - results[b]["psnr"])
            lines.append(f"| {a} − {b} | {ds:+.5f} ± {ds_err:.5f} | {dp:+.3f} ± {dp_err:.3f} |")
    photos = list(next(iter(results.values()))["per_photo"])
    lines += ["", "Per held-out photograph (SSIM / PSNR):", "", "| model | " + " | ".join(photos) + " |",
              "|---|" + "---|" * len(photos)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{s:.3f} / {p:.2f}" for p, s in
                                                  ((p.mean().item(), s.mean().item()) for p, s in r["per_photo"].values())) + " |")
    return lines


def main(args):
    train, held = find_photos(args)
    fresh_out(args.out)
    print(f"{len(train)} photographs to train on, {len(held)} held out: {', '.join(p.name for p in held)}", flush=True)

    lines = ["# Table 1: autoencoders on held-out real photographs", ""]
    for scale in args.scales:
        preset, size = SCALES[scale]
        data = os.path.join(args.out, f"data-f{scale}")
        n_held, held_photos = write_dataset(data, train, held, size, args)
        print(f"{scale}x: {args.crops} training crops of {size} pixels, {n_held} held-out tiles", flush=True)
        models, results, curves = {}, {}, {}
        for name, _ in VARIANTS:
            if name not in args.variants:
                continue
            out = os.path.join(args.out, f"f{scale}", key(name).replace(" + ", "+").replace(" ", ""))
            log = run(*train_command(name, scale, data, out, n_held, args))
            print("   " + log.strip().splitlines()[-2], flush=True)
            ae = models[name] = load_autoencoder(out)
            per_photo = measure(ae, held_photos, size)
            results[name] = {"channels": ae.cfg.latent_channels, "fourier": ae.cfg.fourier,
                             "adversarial": "--adversarial" in dict(VARIANTS)[name], "per_photo": per_photo,
                             "psnr": torch.cat([p for p, _ in per_photo.values()]),
                             "ssim": torch.cat([s for _, s in per_photo.values()])}
            # train_ae.py logs the held-out PSNR every --eval-every steps and at the end
            curves[name] = metric_series(read_metrics(os.path.join(out, "metrics.jsonl")), "step", ["heldout_psnr"])["heldout_psnr"]
        plot_curves(os.path.join(args.out, f"heldout_psnr_f{scale}.png"), curves,
                    title=f"held-out PSNR (dB) during training, {scale}x downsampling")
        if scale == args.scales[0]:
            side_by_side(os.path.join(args.out, "reconstructions.png"), held_photos, models)
        lines += scale_table(scale, results, n_held, size) + [""]
        lines.append(f"Training: {args.crops} random {size}-pixel crops, preset {preset}, {args.steps[scale]} steps at batch "
                     f"{args.bs} (learning rate decayed over the last third), adversarial loss (where on) from step "
                     f"{args.disc_start if args.disc_start is not None else args.steps[scale] // 2}, seed {args.seed}.")
        lines.append("")
    lines += ["Photographs (training, then held out), each with the licence its package states:", ""]
    lines += [f"- {p.name}: {p.licence}" for p in train] + [f"- {p.name} (held out): {p.licence}" for p in held]
    write_results(args.out, lines)
    print(f"wrote {args.out}/results.md, reconstructions.png and heldout_psnr_f*.png")


if __name__ == "__main__":
    main(parse_args())
