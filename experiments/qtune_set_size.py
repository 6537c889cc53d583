"""Table 3 in miniature: visual appeal by the size of the quality-tuning set (emu_paper.txt, section 5).

The paper quality-tunes on random subsets of 100, 1000 and 2000 of its curated images and judges
each model against SDXL: 60.3%, 63.2% and 67.0% appeal wins, against 24.8% for the pretrained model
with no quality-tuning. The toy world has no SDXL, so the fixed baseline here is a stand-in: a
second model pretrained with the pretrained model's own recipe (data, steps, batch, everything its
checkpoint records) and another seed. The sizes are scaled to the toy funnel's output: the paper's
2000 is the whole curated training pool, 1000 half of it and 100 a twentieth (--fractions).

For each seed, through the project's own scripts:

  1. the curated set split once into a check set for early stopping (shared by every size) and the
     training pool; nested random subsets of the pool (the small set inside the medium one)
  2. qtune.py on each subset, same recipe and seed; the batch stays at 64, so a set smaller than a
     batch is repeated inside it
  3. eval_pairs.py: each quality-tuned model, and the pretrained model itself ("none"), against
     the baseline on held-out prompts (scenes no pretraining image shows)

    python experiments/qtune_set_size.py     # about 10 minutes on 2 CPU cores, after `bash toy.sh`
Writes OUT/results.md and OUT/win_rate_by_size.png.
"""
import argparse
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emu.pipeline import read_training_checkpoint  # noqa: E402
from emu.evaluation.plot import plot_curves  # noqa: E402
from common import (add_flags, cells, copy_examples, evaluate, fresh_out, pooled, quality_tune, run,  # noqa: E402
                    split_curated, unseen_prompts, write_prompts, write_results)

PAPER_TABLE_3 = {"none": 24.8, "100": 60.3, "1000": 63.2, "2000": 67.0}  # appeal win % against SDXL
# what the stand-in baseline copies from the pretrained model's checkpoint
RECIPE = ("arch", "data", "ae", "clip", "t5", "image_size", "preset", "steps", "stages", "schedule", "timesteps", "prediction",
          "noise_offset", "bs", "lr", "weight_decay", "warmup", "ema_decay", "caption_dropout", "text_dtype")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, "runs/exp-qtune-set-size")
    p.add_argument("--fractions", default="0.05,0.5,1",
                   help="set sizes as fractions of the curated training pool (the paper's 100, 1000, 2000 of 2000)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds: subsets, quality-tuning and evaluation")
    p.add_argument("--baseline", default=None, help="the fixed baseline's checkpoint (default: pretrain the stand-in)")
    p.add_argument("--baseline-seed", type=int, default=1, help="seed of the stand-in baseline's pretraining")
    return p.parse_args(argv)


def pretrain_stand_in(pretrained, seed, out):
    """pretrain.py with the recipe recorded in `pretrained`'s checkpoint and another seed -> OUT/ckpt.pt."""
    recipe = read_training_checkpoint(pretrained)["args"]
    flags = []
    for key in RECIPE:
        if recipe.get(key) is not None:
            flags += ["--" + key.replace("_", "-"), recipe[key]]
    run("pretrain.py", *flags, "--seed", seed, "--sample-every", 0, "--out", out)
    return os.path.join(out, "ckpt.pt")


def main(args):
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    fresh_out(args.out)
    prompts = os.path.join(args.out, "prompts.tsv")
    write_prompts(prompts, unseen_prompts(args.haystack, args.prompts, seed=0))
    baseline = args.baseline or pretrain_stand_in(args.pretrained, args.baseline_seed, os.path.join(args.out, "baseline"))
    pool, heldout = split_curated(args.curated, args.heldout, 0, args.out)
    sizes = [max(1, round(f * len(pool))) for f in fractions]

    results = {0: []}  # set size -> one {task: outcomes} per seed; 0 is the pretrained model
    for seed in seeds:
        print(f"== seed {seed}", flush=True)
        folder = os.path.join(args.out, f"seed-{seed}")
        results[0].append(evaluate(args, args.pretrained, baseline, ("pretrained", "baseline"), prompts,
                                   os.path.join(folder, "eval-none"), seed))
        order = random.Random(seed).sample(pool, len(pool))  # nested subsets: each size's first images
        for size in sizes:
            train = copy_examples(args.curated, order[:size], os.path.join(folder, f"set-{size}"))
            best = quality_tune(args, train, heldout, os.path.join(folder, f"qtune-{size}"), seed)
            results.setdefault(size, []).append(evaluate(args, best, baseline, (f"tuned on {size}", "baseline"), prompts,
                                                         os.path.join(folder, f"eval-{size}"), seed))
    summary = {size: pooled(by_seed, args.n_boot) for size, by_seed in results.items()}

    paper = ["none"] + [str(round(2000 * f)) for f in fractions]
    lines = ["# Visual appeal by quality-tuning set size (Table 3 in miniature)", "",
             f"Each model against the baseline (a second pretraining, seed {args.baseline_seed}, standing in for SDXL); "
             f"{args.prompts} held-out prompts x {len(seeds)} seeds; curated pool of {len(pool)}, {args.heldout} held out "
             f"for early stopping; quality-tuning: {args.iters} iterations at most, batch {args.bs}.", "",
             "| quality-tuning set | images | task | win | tie | lose | paper (images: appeal win) |",
             "|---|---|---|---|---|---|---|"]
    for (size, s), name in zip(summary.items(), paper):
        label = "none (pretrained)" if size == 0 else f"{size / len(pool):.0%} of the pool"
        for task, t in s.items():
            theirs = f"{name}: {PAPER_TABLE_3[name]}%" if task == "visual appeal" and name in PAPER_TABLE_3 else ""
            lines.append(f"| {label} | {size} | {task} | {cells(t)} | {theirs} |")
    lines += ["", "Brackets: 95% bootstrap confidence intervals over prompts, each prompt's outcomes under every seed "
              "resampled together."]
    plot_curves(os.path.join(args.out, "win_rate_by_size.png"),
                {f"{task} win %": [(size, s[task]["win"]) for size, s in summary.items()]
                 for task in summary[0]} | {"visual appeal lose %": [(size, s["visual appeal"]["lose"]) for size, s in summary.items()]},
                title="quality-tuned vs baseline, by set size", x_label="quality-tuning images")
    write_results(args.out, lines)
    print(f"wrote {args.out}/results.md and win_rate_by_size.png")


if __name__ == "__main__":
    main(parse_args())
