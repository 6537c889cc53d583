"""The curation funnel on a folder of images: automatic filters, with every decision on record.

    python data/curate.py train-aesthetic --data runs/toy/haystack --ratings runs/toy/haystack/ratings.csv \\
        --clip runs/towers/clip --head runs/curate/aesthetic.safetensors
    python data/curate.py --data runs/toy/haystack --clip runs/towers/clip --out runs/curate \\
        --blocklist data/blocklist.txt --aesthetic-head runs/curate/aesthetic.safetensors --aesthetic-min 5.5 \\
        --text-max-words 4 --min-size 32 --max-aspect 2 --clusters 16 --per-cluster 80 --min-likes 40
    python data/curate.py why --out runs/curate 000123

The stages run in the paper's order (emu/curation/funnel.py); each is on when its flag is given. The images
that pass every stage are copied with their captions and provenance into --out/curated, which
`qtune.py --curate-top 0 --data runs/curate/curated` trains on. A rerun measures only what it has not
measured before, so an interrupted run continues, and thresholds can change without measuring again.
"""
import argparse
import os
import sys
from contextlib import closing

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from emu import EmuError  # noqa: E402
from emu.curation.funnel import (HUMAN_STAGES, FunnelConfig, Measurer, bicubic, export_curated, open_store,  # noqa: E402
                                 read_store, register_images, run_automatic, summary, why)
from emu.curation.heads import read_ratings, save_head, train_aesthetic_head  # noqa: E402
from emu.curation.people import (add_raters, assign, decide, final_keys, human_captions, pending, prepare,  # noqa: E402
                                 simulate)
from emu.curation.people import CurationStage  # noqa: E402
from emu.pipeline import DiffusionUpsampler  # noqa: E402
from emu.variants.stable_diffusion import image_tower_folder  # noqa: E402
from emu.evaluation.rating import RatingServer  # noqa: E402

DEFAULT_PER_IMAGE = {"generalists": 3, "specialists": 1, "captions": 1}  # our choice: the paper gives no numbers

COMMANDS = ("run", "train-aesthetic", "serve", "simulate", "why")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{run,train-aesthetic,serve,simulate,why}")

    r = sub.add_parser("run", help="run the automatic stages (the default)")
    r.add_argument("--data", default="runs/toy/haystack", help="the haystack: key.png + key.txt [+ key.json with likes]")
    r.add_argument("--clip", default="runs/towers/clip", help="CLIP directory (Hugging Face layout) for image embeddings")
    r.add_argument("--base", default=None, metavar="DIR",
                   help="a Stable Diffusion v1 folder (diffusers layout): embed the images with its safety_checker/'s CLIP "
                        "ViT-L/14 image tower instead of --clip; --unsafe-head DIR/safety_checker applies its concept check")
    r.add_argument("--out", default="runs/curate", help="curation.sqlite, the summary and curated/ go here")
    r.add_argument("--blocklist", default=None, help="offensive: a file of words, one per line; a caption with one is dropped")
    r.add_argument("--unsafe-head", default=None, help="offensive: a head on CLIP image embeddings giving the unsafe logit, "
                                                       "or a Stable Diffusion folder's safety_checker/ (its concept check)")
    r.add_argument("--unsafe-max", type=float, default=0.5, help="offensive: the highest unsafe probability kept")
    r.add_argument("--aesthetic-head", default=None, help="aesthetic: a head made by train-aesthetic")
    r.add_argument("--aesthetic-min", type=float, default=None, help="aesthetic: the lowest score kept")
    r.add_argument("--text-max-words", type=float, default=None, help="text: the most words of text in an image (proxy)")
    r.add_argument("--clip-min", type=float, default=None, help="clip: the lowest image-caption cosine similarity kept")
    r.add_argument("--min-size", type=int, default=None, help="size: the smallest shorter side, in pixels")
    r.add_argument("--max-aspect", type=float, default=None, help="size: the largest aspect ratio (long side / short side)")
    r.add_argument("--clusters", type=int, default=None, help="balance: k-means clusters of the CLIP image embeddings")
    r.add_argument("--per-cluster", type=int, default=None, help="balance: the most images a cluster keeps (its most aesthetic)")
    r.add_argument("--min-likes", type=int, default=None, help="popularity: the fewest likes kept (images without likes stay)")
    r.add_argument("--seed", type=int, default=0, help="seed of the clustering")
    r.add_argument("--target-size", type=int, default=None,
                   help="kept images whose shorter side is below this are upsampled to it in curated/ (bicubic, or --upsampler)")
    r.add_argument("--upsampler", default=None,
                   help="a pixel diffusion checkpoint (pretrain.py --arch pixel) whose upsampler enlarges those images, "
                        "conditioned on their captions, as the paper's curation did; default: bicubic")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    for name, text in (("serve", "a human stage on the rating page: people keep, check and caption images"),
                       ("simulate", "toy world: simulated raters answer a human stage")):
        h = sub.add_parser(name, help=text)
        h.add_argument("--out", default="runs/curate", help="the curation store's folder")
        h.add_argument("--stage", required=True, choices=HUMAN_STAGES, help="generalists, then specialists, then captions")
        h.add_argument("--raters", default="3" if name == "simulate" else None,
                       help="comma-separated names, or a number N" + (" of simulated raters" if name == "simulate" else ""))
        h.add_argument("--per-image", type=int, default=None,
                       help="distinct raters per image (default: generalists 3, specialists 1, captions 1)")
        h.add_argument("--seed", type=int, default=0, help="seed of the assignment (and of simulated raters' noise)")
        if name == "serve":
            h.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback is reachable by others")
            h.add_argument("--port", type=int, default=8001, help="port to listen on")

    t = sub.add_parser("train-aesthetic", help="fit the aesthetic head to a ratings file")
    t.add_argument("--data", default="runs/toy/haystack", help="the folder holding the rated images")
    t.add_argument("--ratings", default="runs/toy/haystack/ratings.csv", help="CSV with key and rating columns")
    t.add_argument("--clip", default="runs/towers/clip", help="CLIP directory for image embeddings")
    t.add_argument("--base", default=None, metavar="DIR",
                   help="a Stable Diffusion v1 folder: embed with its safety_checker/'s CLIP image tower instead of --clip")
    t.add_argument("--out", default="runs/curate", help="the curation store (embeddings are cached there)")
    t.add_argument("--head", default="runs/curate/aesthetic.safetensors", help="where to write the head")
    t.add_argument("--hidden", type=int, default=0, help="0: a linear head; N: an MLP with N hidden units")
    t.add_argument("--steps", type=int, default=500, help="full-batch AdamW steps")
    t.add_argument("--holdout", type=float, default=0.2, help="share of the ratings held out to report the fit")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    w = sub.add_parser("why", help="every decision the funnel made about some images")
    w.add_argument("--out", default="runs/curate", help="the curation store's folder")
    w.add_argument("keys", nargs="+", help="image keys (file names without extension)")

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["run", *argv]
    return p.parse_args(argv)


def read_blocklist(path):
    try:
        with open(path, encoding="utf-8") as f:
            return tuple(w.strip().lower() for w in f if w.strip() and not w.startswith("#"))
    except FileNotFoundError:
        raise EmuError(f"{path}: blocklist not found") from None


def run(args):
    cfg = FunnelConfig(blocklist=read_blocklist(args.blocklist) if args.blocklist else None, unsafe_head=args.unsafe_head,
                       unsafe_max=args.unsafe_max, aesthetic_head=args.aesthetic_head, aesthetic_min=args.aesthetic_min,
                       text_max_words=args.text_max_words, clip_min=args.clip_min, min_size=args.min_size,
                       max_aspect=args.max_aspect, clusters=args.clusters, per_cluster=args.per_cluster,
                       min_likes=args.min_likes, seed=args.seed)
    if (args.clusters is None) != (args.per_cluster is None):
        raise EmuError("--clusters and --per-cluster go together")
    if args.base and args.clip_min is not None:
        raise EmuError(f"--clip-min needs CLIP's text projection, which {args.base}/text_encoder does not publish; "
                       f"give --clip with a whole CLIP model's folder (openai/clip-vit-large-patch14) instead of --base")
    clip = image_tower_folder(args.base) if args.base else args.clip
    with closing(open_store(args.out)) as conn:
        new = register_images(conn, args.data)
        print(f"{args.data}: {new} new images entered")
        _, measured = run_automatic(conn, cfg, clip, args.device)
        print(f"measured {measured} images in this run (the rest were measured before)")
        with conn:  # the export settings hold for later exports too, after the human stages
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [("target_size", str(args.target_size or "")), ("upsampler", args.upsampler or "")])
        finish(conn, args.out, args.device)


def finish(conn, out, device="cuda" if torch.cuda.is_available() else "cpu"):
    """Decide the human stages that have answers, export what came through, print the summary.
    Images below the last `run`'s --target-size are upsampled on export, by its --upsampler if given."""
    settings = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('target_size', 'upsampler')"))
    target_size = int(settings["target_size"]) if settings.get("target_size") else None
    upsampler = DiffusionUpsampler(settings["upsampler"], device) if target_size and settings.get("upsampler") else bicubic
    prepare(conn)
    for stage in HUMAN_STAGES:
        if pending(conn, stage) or conn.execute("SELECT 1 FROM tasks WHERE stage = ?", (stage,)).fetchone():
            decided, kept, waiting = decide(conn, stage)
            print(f"{stage}: {decided} images decided, {kept} kept" + (f"; {waiting} still wait for answers" if waiting else ""))
    keys = final_keys(conn)
    export_curated(conn, keys, os.path.join(out, "curated"), human_captions(conn), target_size, upsampler)
    table = summary_markdown(summary(conn))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"{len(keys)} images in {out}/curated; `data/curate.py why --out {out} KEY` tells any image's path")


def rater_names(text):
    names = [f"rater-{i + 1}" for i in range(int(text))] if text.isdigit() else [n.strip() for n in text.split(",") if n.strip()]
    if len(set(names)) != len(names) or not names:
        raise EmuError(f"--raters: give distinct names, or a number: {text!r}")
    return names


def serve(args):
    per_image = args.per_image or DEFAULT_PER_IMAGE[args.stage]
    with read_store(args.out) as conn:
        prepare(conn)
        if args.raters:
            tokens = add_raters(conn, rater_names(args.raters), "human")
        else:
            tokens = dict(conn.execute("SELECT name, token FROM raters WHERE kind = 'human'"))
            if not tokens:
                raise EmuError(f"{args.out}: no raters yet; give --raters on the first start")
        new = assign(conn, args.stage, list(tokens), per_image, seed=args.seed)
        print(f"{args.stage}: {new} images newly assigned, {pending(conn, args.stage)} answers to give")
        folder = os.path.dirname(conn.execute("SELECT file FROM images LIMIT 1").fetchone()[0])
    try:
        server = RatingServer(folder, args.host, args.port, backend=CurationStage(args.out, args.stage))
    except OSError as e:
        raise EmuError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if not server.loopback:
        print(f"warning: listening on {args.host}: the links' tokens are the only key (plain HTTP)", file=sys.stderr)
    print("".join(f"{name}\t{server.link(token)}\n" for name, token in tokens.items()), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped; every answer is already saved; `data/curate.py` again decides the stage and exports")
    finally:
        server.server_close()


def simulate_stage(args):
    with read_store(args.out) as conn:
        prepare(conn)
        if args.stage != HUMAN_STAGES[0]:
            earlier = HUMAN_STAGES[HUMAN_STAGES.index(args.stage) - 1]
            decided, _, waiting = decide(conn, earlier)
            if waiting or not decided:
                raise EmuError(f"{args.stage}: the {earlier} stage must be finished first ({waiting} images wait)")
        n = simulate(conn, args.stage, len(rater_names(args.raters)), args.per_image or DEFAULT_PER_IMAGE[args.stage],
                     seed=args.seed)
        print(f"{args.stage}: simulated raters gave {n} answers")
        finish(conn, args.out)


def summary_markdown(rows):
    lines = ["| stage | in | kept | dropped |", "|---|---|---|---|"]
    lines += [f"| {stage} | {n_in} | {kept} | {n_in - kept} |" for stage, n_in, kept in rows]
    return "\n".join(lines) + "\n"


def train_aesthetic(args):
    ratings = read_ratings(args.ratings)
    with closing(open_store(args.out)) as conn:
        register_images(conn, args.data)
        known = {k for (k,) in conn.execute("SELECT key FROM images WHERE unusable IS NULL")}
        keys = sorted(k for k in ratings if k in known)
        if len(keys) < 10:
            raise EmuError(f"{args.ratings}: only {len(keys)} rated images found in {args.data}; need at least 10")
        emb = Measurer(conn, image_tower_folder(args.base) if args.base else args.clip, device=args.device).embed(keys)
    keys = [k for k in keys if k in emb]
    order = np.random.default_rng(args.seed).permutation(len(keys))
    n_val = int(len(keys) * args.holdout)
    val, train = [keys[i] for i in order[:n_val]], [keys[i] for i in order[n_val:]]
    x = {k: torch.from_numpy(emb[k]) for k in keys}
    head = train_aesthetic_head(torch.stack([x[k] for k in train]), [ratings[k] for k in train],
                                hidden=args.hidden, steps=args.steps, seed=args.seed)
    if val:
        pred = head(torch.stack([x[k] for k in val])).numpy()
        corr = float(np.corrcoef(pred, [ratings[k] for k in val])[0, 1])
        print(f"held-out ratings: {len(val)}; correlation of predicted with given ratings {corr:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.head)), exist_ok=True)
    save_head(head, args.head)
    print(f"trained on {len(train)} ratings -> {args.head}")


def explain(args):
    with read_store(args.out) as conn:
        for key in args.keys:
            path, verdict = why(conn, key)
            print(f"{key}: {verdict}")
            for stage, kept, reason in path:
                print(f"  {stage:<12} {'kept' if kept else 'DROPPED':<8} {reason}")


def main(args):
    {"run": run, "train-aesthetic": train_aesthetic, "serve": serve, "simulate": simulate_stage, "why": explain}[args.command](args)


if __name__ == "__main__":
    try:
        main(parse_args())
    except EmuError as e:
        raise SystemExit(f"error: {e}")
