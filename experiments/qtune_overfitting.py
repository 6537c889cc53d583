"""Early stopping and overfitting: quality-tune far past the point early stopping would stop.

The paper (emu_paper.txt, section 3.4): "early stopping is important here as fine-tuning on a small
dataset for too long will result in significant overfitting and degradation in generality of visual
concepts"; it stops at 15K iterations at most "despite the loss still decreasing". Here, through the
project's own scripts:

  1. the funnel's curated set split into a check set and the training set, as qtune.py does
     (--train-size keeps a random part of the training set: a smaller set overfits sooner)
  2. one qtune.py run with early stopping turned off, in segments that end at each --milestones
     iteration (each segment resumes the last exactly, so they are one unbroken run); the EMA
     checkpoint at each milestone is kept
  3. eval_pairs.py: each milestone's model against the pretrained model on two prompt sets: held-out
     prompts (scenes no pretraining image shows: generality) and the training set's own captions
     (what the model was tuned on)

The table gives appeal and faithfulness win rates at each milestone, the held-out loss and the
automatic appeal score qtune.py logged, and where qtune.py's early stopping (--patience checks
without a better held-out loss) would have stopped.

    python experiments/qtune_overfitting.py     # about 10 minutes on 2 CPU cores, after `bash toy.sh`
Writes OUT/results.md, OUT/win_rates_by_iteration.png and OUT/qtune/loss.png.
"""
import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emu.checkpoint import read_metrics  # noqa: E402
from emu.datasets.folders import read_caption  # noqa: E402
from emu.evaluation.pairwise import summarize_outcomes  # noqa: E402
from emu.evaluation.plot import metric_series, plot_curves  # noqa: E402
from emu.training.loop import early_stopping  # noqa: E402
from common import (add_flags, cells, copy_examples, evaluate, fresh_out, quality_tune, split_curated,  # noqa: E402
                    unseen_prompts, write_prompts, write_results)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, "runs/exp-qtune-overfitting")
    p.add_argument("--milestones", default="150,300,600,1200",
                   help="iterations at which the model is kept and evaluated (qtune.py's toy cap is 200)")
    p.add_argument("--patience", type=int, default=4, help="the early-stopping rule to report: checks without improvement")
    p.add_argument("--train-size", type=int, default=None,
                   help="tune on only this many of the curated training images (default: all; few overfit sooner)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, quality-tuning and evaluation")
    return p.parse_args(argv)


def early_stop_point(heldout, patience):
    """(iteration where qtune.py's rule stops, best iteration) for a held-out loss series [(iter, loss), ...]
    whose first check is before any tuning: qtune.py's emu.training.loop.early_stopping applied check by check;
    (None, best) if it would not stop within the series."""
    (first, loss), *checks = heldout
    stop = {"best": loss, "best_step": first, "bad": 0}
    for it, loss in checks:
        stop = early_stopping(stop, it, loss)
        if stop["bad"] >= patience:
            return it, stop["best_step"]
    return None, stop["best_step"]


def main(args):
    milestones = sorted(int(m) for m in args.milestones.split(","))
    fresh_out(args.out)
    pool, heldout = split_curated(args.curated, args.heldout, args.seed, args.out)
    pool = pool[:args.train_size]  # a random subset: the pool comes in a seeded random order
    train = copy_examples(args.curated, pool, os.path.join(args.out, "train"))
    prompt_sets = {"held-out prompts": os.path.join(args.out, "prompts-heldout.tsv"),
                   "training captions": os.path.join(args.out, "prompts-train.tsv")}
    write_prompts(prompt_sets["held-out prompts"], unseen_prompts(args.haystack, args.prompts, seed=0))
    write_prompts(prompt_sets["training captions"],
                  [(read_caption(os.path.join(train, key + ".txt")), "Training") for key in sorted(pool)[:args.prompts]])

    qtune_dir = os.path.join(args.out, "qtune")
    results = {}  # (milestone, prompt set) -> {task: outcomes}
    for m in milestones:
        print(f"== to iteration {m}", flush=True)
        quality_tune(args, train, heldout, qtune_dir, args.seed, "--iters", m, "--patience", 10 ** 9, "--resume", "auto")
        kept = shutil.copy(os.path.join(qtune_dir, "ckpt.pt"), os.path.join(args.out, f"iter-{m}.pt"))
        for name, prompts in prompt_sets.items():
            results[(m, name)] = evaluate(args, kept, args.pretrained, (f"tuned {m} iterations", "pretrained"), prompts,
                                          os.path.join(args.out, f"eval-{m}-{name.split()[0]}"), args.seed)

    series = metric_series(read_metrics(os.path.join(qtune_dir, "metrics.jsonl")), "iter", ["heldout", "appeal"])
    heldout_at, appeal_at = dict(series["heldout"]), dict(series["appeal"])
    stop, best = early_stop_point(series["heldout"], args.patience)
    rule = (f"would stop at iteration {stop}, keeping iteration {best}" if stop else
            f"would not stop within {milestones[-1]} iterations (best held-out loss at iteration {best})")
    lines = [f"# Quality-tuning past early stopping ({len(pool)} training images, batch {args.bs}, seed {args.seed})", "",
             f"qtune.py's early stopping (patience {args.patience} checks, one every {args.eval_every} iterations) {rule}. "
             f"Held-out loss before tuning: {heldout_at.get(0, float('nan')):.4f}.", "",
             "| iterations | held-out loss | appeal score | prompts | task | win | tie | lose |",
             "|---|---|---|---|---|---|---|---|"]
    curves = {}
    for (m, name), outcomes in results.items():
        for task, o in outcomes.items():
            s = summarize_outcomes(o, n_boot=args.n_boot)
            lines.append(f"| {m} | {heldout_at.get(m, float('nan')):.4f} | {appeal_at.get(m, float('nan')):.3f} | {name} | "
                         f"{task} | {cells(s)} |")
            curves.setdefault(f"{task} win %, {name}", []).append((m, s["win"]))
    lines += ["", "Against the pretrained model, the same seeds for both. Brackets: 95% bootstrap confidence intervals "
              "over prompts. Held-out loss and appeal score: qtune.py's check at that iteration (the automatic appeal "
              "score of the EMA model's images of the held-out captions)."]
    plot_curves(os.path.join(args.out, "win_rates_by_iteration.png"), curves,
                title="quality-tuned vs pretrained, by quality-tuning iterations", x_label="iterations")
    write_results(args.out, lines)
    print(f"wrote {args.out}/results.md, win_rates_by_iteration.png and {qtune_dir}/loss.png")


if __name__ == "__main__":
    main(parse_args())
