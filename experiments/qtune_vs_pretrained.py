"""Quality-tuning vs pretraining, over several seeds (emu_paper.txt, section 4.2, Figure 6).

The paper's headline: the quality-tuned model wins 82.9% of visual-appeal comparisons against its
pretrained-only counterpart on PartiPrompts (15.4% lose), and text faithfulness improves too (36.7%
against 21.0%). Here, for each seed, through the project's own scripts:

  1. the funnel's curated set (toy.sh's data/curate.py output) split at random into a check set for
     early stopping and the training set
  2. qtune.py on it, seeded
  3. eval_pairs.py: quality-tuned vs pretrained on held-out prompts, scenes (shape, colour, count,
     position, background) that no pretraining image shows, seeded sampling and judges

then the win / tie / lose rates per seed and pooled over the seeds, with 95% bootstrap intervals
over prompts (a prompt's outcomes under every seed are resampled together). The pretrained model is
the same for every seed: the seeds vary the split, the quality-tuning and the evaluation.

    python experiments/qtune_vs_pretrained.py     # about 3 minutes on 2 CPU cores, after `bash toy.sh`
Writes OUT/results.md and OUT/win_rates.png.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emu.evaluation.pairwise import summarize_outcomes  # noqa: E402
from emu.evaluation.plot import plot_win_rates  # noqa: E402
from common import (PAPER_QT_VS_PRETRAINED, add_flags, cells, fresh_out, pooled, tune_and_judge,  # noqa: E402
                    unseen_prompts, write_prompts, write_results)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, "runs/exp-qtune-vs-pretrained")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: one quality-tuning and evaluation each")
    return p.parse_args(argv)


def main(args):
    seeds = [int(s) for s in args.seeds.split(",")]
    fresh_out(args.out)
    prompts = os.path.join(args.out, "prompts.tsv")
    write_prompts(prompts, unseen_prompts(args.haystack, args.prompts, seed=0))

    by_seed = []
    for seed in seeds:
        print(f"== seed {seed}", flush=True)
        folder = os.path.join(args.out, f"seed-{seed}")
        n_train, outcomes = tune_and_judge(args, args.pretrained, folder, seed, prompts)
        by_seed.append(outcomes)
    total = pooled(by_seed, args.n_boot)

    lines = [f"# Quality-tuned vs pretrained, {len(seeds)} seeds", "",
             f"{args.prompts} held-out prompts (scenes no pretraining image shows), {n_train} curated training images, "
             f"{args.heldout} held out for early stopping; quality-tuning: {args.iters} iterations at most, batch {args.bs}.",
             "", "| seed | task | win | tie | lose |", "|---|---|---|---|---|"]
    rows = []
    for seed, outcomes in zip(seeds, by_seed):
        for task, o in outcomes.items():
            s = summarize_outcomes(o, n_boot=args.n_boot)
            lines.append(f"| {seed} | {task} | {cells(s)} |")
            rows.append((f"{task}, seed {seed}", s))
    for task, s in total.items():
        lines.append(f"| all {len(seeds)} pooled ({s['n']} pairs) | {task} | {cells(s)} |")
        rows.append((f"{task}, pooled", s))
    for task, (win, lose) in PAPER_QT_VS_PRETRAINED.items():
        lines.append(f"| paper (PartiPrompts) | {task} | {win}% | {100 - win - lose:.1f}% | {lose}% |")
    lines += ["", "Brackets: 95% bootstrap confidence intervals over prompts; the pooled rows resample each prompt's "
              "outcomes under every seed together."]
    plot_win_rates(os.path.join(args.out, "win_rates.png"), rows,
                   title=f"quality-tuned vs pretrained: {args.prompts} held-out prompts, {len(seeds)} seeds")
    write_results(args.out, lines)
    print(f"wrote {args.out}/results.md and win_rates.png")


if __name__ == "__main__":
    main(parse_args())
