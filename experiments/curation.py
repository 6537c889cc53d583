"""Does the curation funnel matter? Quality-tune on its output, and on a random subset of the same size.

Needs the toy pipeline's outputs (`bash toy.sh`): the haystack with its ratings.csv, the towers and
the pretrained model. Steps, each through the project's own scripts:

  1. data/curate.py: the aesthetic head from the simulated ratings; the automatic stages; simulated
     generalists, specialists and caption writers -> runs/exp-curation/funnel/curated
  2. the same number of haystack images drawn at random, with the same kind of accurate captions
  3. qtune.py on each set, the same recipe and seed: each stops early on its own check images and keeps
     its best check's model (best.pt); --no-early-stopping tunes both for the full iterations and keeps the last
  4. eval_pairs.py: funnel-tuned vs random-tuned, and each against the pretrained model

    python experiments/curation.py        # about 10 minutes on 2 CPU cores
    python experiments/curation.py --no-early-stopping --out runs/exp-curation-full
Writes runs/exp-curation/results.md.
"""
import argparse
import json
import os
import random
import shutil
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emu.evaluation.judges import appeal_score  # noqa: E402
from common import run, write_results  # noqa: E402  (experiments/common.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--haystack", default="runs/toy/haystack", help="the toy haystack (with ratings.csv)")
    p.add_argument("--clip", default="runs/towers/clip", help="the toy CLIP directory")
    p.add_argument("--pretrained", default="runs/pretrain/ckpt.pt", help="the pretrained model")
    p.add_argument("--out", default="runs/exp-curation", help="everything goes here")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subset, the funnel and quality-tuning")
    p.add_argument("--no-early-stopping", action="store_true",
                   help="tune both sets for qtune.py's full iterations and keep the last model (by default each "
                        "stops early on its own check images, and the random set's may keep the pretrained weights)")
    return p.parse_args(argv)


def appeal_and_needles(folder, haystack):
    keys = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".png"))
    images = np.stack([np.asarray(Image.open(os.path.join(haystack, k + ".png")).convert("RGB")) for k in keys])
    needles = [json.load(open(os.path.join(haystack, k + ".json")))["needle"] for k in keys]
    return len(keys), float(appeal_score(images).mean()), 100.0 * float(np.mean(needles))


def main(args):
    funnel = os.path.join(args.out, "funnel")
    if not os.path.exists(os.path.join(args.haystack, "ratings.csv")):
        raise SystemExit(f"{args.haystack}/ratings.csv missing: run data/make_toy.py (it writes the simulated ratings)")
    shutil.rmtree(args.out, ignore_errors=True)
    head = os.path.join(funnel, "aesthetic.safetensors")
    print(run("data/curate.py", "train-aesthetic", "--data", args.haystack, "--ratings", os.path.join(args.haystack, "ratings.csv"),
              "--clip", args.clip, "--out", funnel, "--head", head))
    run("data/curate.py", "--data", args.haystack, "--clip", args.clip, "--out", funnel, "--blocklist", "data/blocklist.txt",
        "--aesthetic-head", head, "--aesthetic-min", "5.5", "--text-max-words", "4", "--min-size", "32", "--max-aspect", "2",
        "--clusters", "16", "--per-cluster", "80", "--min-likes", "40", "--seed", str(args.seed))
    for stage in ("generalists", "specialists", "captions"):
        out = run("data/curate.py", "simulate", "--out", funnel, "--stage", stage, "--seed", str(args.seed))
    print(out)
    curated = os.path.join(funnel, "curated")
    n = len([f for f in os.listdir(curated) if f.endswith(".png")])

    # the random subset: as many images, drawn from the whole haystack, with the accurate captions too
    subset = os.path.join(args.out, "random")
    os.makedirs(subset)
    keys = sorted(f[:-4] for f in os.listdir(args.haystack) if f.endswith(".png"))
    for key in random.Random(args.seed).sample(keys, n):
        shutil.copy(os.path.join(args.haystack, key + ".png"), subset)
        meta = json.load(open(os.path.join(args.haystack, key + ".json")))
        with open(os.path.join(subset, key + ".txt"), "w") as f:
            f.write(meta["true_caption"] + "\n")

    holdout = str(max(4, n // 8))
    for name, data in (("funnel", curated), ("random", subset)):
        run("qtune.py", "--pretrained", args.pretrained, "--data", data, "--curate-top", "0", "--caption-field", "",
            "--holdout", holdout, "--out", os.path.join(args.out, f"qtune-{name}"), "--seed", str(args.seed),
            *(["--patience", "1000000000"] if args.no_early_stopping else []))
    kept = "ckpt.pt" if args.no_early_stopping else "best.pt"  # the last iteration's model, or the best check's
    ckpt = {"funnel": f"{args.out}/qtune-funnel/{kept}", "random": f"{args.out}/qtune-random/{kept}",
            "pretrained": args.pretrained}
    results = {}
    for a, b in (("funnel", "random"), ("funnel", "pretrained"), ("random", "pretrained")):
        run("eval_pairs.py", "--a", ckpt[a], "--b", ckpt[b], "--name-a", f"tuned on {a}", "--name-b",
            b if b == "pretrained" else f"tuned on {b}", "--out", f"{args.out}/eval-{a}-vs-{b}")
        results[(a, b)] = json.load(open(f"{args.out}/eval-{a}-vs-{b}/results.json"))["judge"]["summary"]["all"]

    rows = [("haystack", *appeal_and_needles(args.haystack, args.haystack)), ("funnel output", *appeal_and_needles(curated, args.haystack)),
            ("random subset", *appeal_and_needles(subset, args.haystack))]
    lines = ["# Quality-tuning on the funnel's output vs on a random subset", "",
             "| images | count | mean appeal | needles |", "|---|---|---|---|"]
    lines += [f"| {name} | {count} | {appeal:.3f} | {needles:.1f}% |" for name, count, appeal, needles in rows]
    lines += ["", "| A vs B | task | win | tie | lose |", "|---|---|---|---|---|"]
    for (a, b), summary in results.items():
        for task, s in summary.items():
            cells = " | ".join(f"{s[k]:.1f}% [{s['ci'][k][0]:.1f}, {s['ci'][k][1]:.1f}]" for k in ("win", "tie", "lose"))
            lines.append(f"| tuned on {a} vs {b if b == 'pretrained' else 'tuned on ' + b} | {task} | {cells} |")
    lines += ["", f"Funnel summary ({funnel}/summary.md):", "", open(os.path.join(funnel, "summary.md")).read()]
    write_results(args.out, lines)


if __name__ == "__main__":
    main(parse_args())
