"""Quality-tuning on three architectures (emu_paper.txt, section 4.2, Figure 10).

The paper re-trains a pixel diffusion model like Imagen and a masked generative transformer like
Muse, quality-tunes both on the same 2000 curated images as Emu, and finds that both improve in
visual appeal and text faithfulness over their pretrained selves. Here, on the toy world, through
the project's own scripts, for each of --arch ldm, pixel and muse:

  1. pretraining on the toy haystack with the same recipe (pretrain.py's toy defaults): the latent
     model is toy.sh's runs/pretrain/ckpt.pt (--pretrained); the pixel cascade and the masked
     transformer are pretrained here, the latter on a VQ tokenizer trained here (train_ae.py --arch muse)
  2. for each seed: the funnel's curated set (toy.sh's data/curate.py output) split at random into a
     check set for early stopping and the training set, the same split for every architecture;
     qtune.py on it (batch 64, the toy iteration cap)
  3. eval_pairs.py: quality-tuned vs pretrained on held-out prompts (scenes no pretraining image
     shows), the judges voting

then the win / tie / lose rates of each architecture, pooled over the seeds, with 95% bootstrap
intervals over prompts.

    python experiments/architectures.py    # after `bash toy.sh`; 65 minutes on 2 CPU cores
Writes OUT/results.md and OUT/win_rates.png.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emu.evaluation.plot import plot_win_rates  # noqa: E402
from common import (add_flags, cells, fresh_out, pooled, run, tune_and_judge, unseen_prompts, write_prompts,  # noqa: E402
                    write_results)

ARCH_NAMES = {"ldm": "latent diffusion (Emu)", "pixel": "pixel diffusion (Imagen-like)",
              "muse": "masked transformer (Muse-like)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, "runs/exp-architectures")
    p.add_argument("--archs", default="ldm,pixel,muse", help="comma-separated architectures (pretrain.py --arch)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: one split, quality-tuning and evaluation each")
    p.add_argument("--towers", default="runs/towers", help="the toy text towers (clip/ and t5/), from data/make_toy.py")
    p.add_argument("--pretrain-steps", type=int, default=1600, help="pretraining steps of the pixel and Muse-like models "
                                                                    "(pretrain.py's toy default, as the latent model had)")
    p.add_argument("--vq-steps", type=int, default=600, help="VQ tokenizer training steps (the README's run)")
    p.add_argument("--pretrained-from", default=None, metavar="DIR",
                   help="an earlier run's --out: its pixel and Muse-like models (DIR/ARCH/pretrain/ckpt.pt) are tuned "
                        "instead of pretraining them again, e.g. after a change to sampling or quality-tuning alone")
    p.add_argument("--pretrain-flags", default="", help="extra flags for pretrain.py (tests: a tiny world)")
    p.add_argument("--vq-flags", default="", help="extra flags for train_ae.py --arch muse (tests: a tiny world)")
    return p.parse_args(argv)


def pretrain(args, arch, out):
    """The pretrained checkpoint of `arch`: the latent model is given (--pretrained); the others are
    trained here on the toy haystack, the Muse-like model on a VQ tokenizer trained first, or taken
    from an earlier run (--pretrained-from)."""
    if arch == "ldm":
        return args.pretrained
    if args.pretrained_from:
        path = os.path.join(args.pretrained_from, arch, "pretrain", "ckpt.pt")
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no pretrained --arch {arch} model there (--pretrained-from)")
        return path
    frozen = ["--clip", os.path.join(args.towers, "clip"), "--t5", os.path.join(args.towers, "t5")]
    if arch == "muse":
        run("train_ae.py", "--arch", "muse", "--data", args.haystack, "--out", os.path.join(out, "vq"),
            "--steps", args.vq_steps, *args.vq_flags.split())
        frozen += ["--ae", os.path.join(out, "vq")]
    run("pretrain.py", "--arch", arch, "--data", args.haystack, *frozen, "--steps", args.pretrain_steps,
        "--out", os.path.join(out, "pretrain"), *args.pretrain_flags.split())
    return os.path.join(out, "pretrain", "ckpt.pt")


def main(args):
    archs, seeds = args.archs.split(","), [int(s) for s in args.seeds.split(",")]
    fresh_out(args.out)
    prompts = os.path.join(args.out, "prompts.tsv")
    write_prompts(prompts, unseen_prompts(args.haystack, args.prompts, seed=0))

    results = {}
    for arch in archs:
        print(f"== {arch}", flush=True)
        folder = os.path.join(args.out, arch)
        pretrained = pretrain(args, arch, folder)
        by_seed = []
        for seed in seeds:  # a seed splits the curated set the same way for every architecture
            n_train, outcomes = tune_and_judge(args, pretrained, os.path.join(folder, f"seed-{seed}"), seed, prompts)
            by_seed.append(outcomes)
        results[arch] = pooled(by_seed, args.n_boot)

    lines = [f"# Quality-tuned vs pretrained, three architectures ({len(seeds)} seeds pooled)", "",
             f"{args.prompts} held-out prompts (scenes no pretraining image shows), {n_train} curated training images, "
             f"{args.heldout} held out for early stopping; quality-tuning: {args.iters} iterations at most, batch {args.bs}.",
             "", "| architecture | task | win | tie | lose |", "|---|---|---|---|---|"]
    rows = []
    for arch, summaries in results.items():
        for task, s in summaries.items():
            lines.append(f"| {ARCH_NAMES[arch]} | {task} | {cells(s)} |")
            rows.append((f"{arch}: {task}", s))
    lines += ["", "Brackets: 95% bootstrap confidence intervals over prompts, each prompt's outcomes under every seed "
              "resampled together. Paper (Figure 10): both other architectures improve significantly in visual appeal "
              "and text faithfulness after quality-tuning (it gives the rates as a chart, not numbers)."]
    plot_win_rates(os.path.join(args.out, "win_rates.png"), rows,
                   title=f"quality-tuned vs pretrained, by architecture: {args.prompts} held-out prompts, {len(seeds)} seeds")
    write_results(args.out, lines)
    print(f"wrote {args.out}/results.md and win_rates.png")


if __name__ == "__main__":
    main(parse_args())
