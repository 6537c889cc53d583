"""What the experiment scripts share: running the project's own scripts as a user would, the
held-out prompts, quality-tuning and pairwise evaluation with one set of flags, and the tables."""
import io
import json
import os
import random
import runpy
import shutil
import sys
from contextlib import closing, redirect_stderr, redirect_stdout

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emu.evaluation.pairwise import RATES, summarize_outcomes  # noqa: E402
from emu.evaluation.study import TASKS, open_study, study_report  # noqa: E402
from emu.datasets.toyworld import ATTRIBUTES, BACKGROUNDS, COLORS, POSITIONS, SHAPES, Scene, caption  # noqa: E402

# The paper's pairwise results (emu_paper.txt, section 4.2, Figure 6, PartiPrompts): Emu vs its pretrained model.
PAPER_QT_VS_PRETRAINED = {"visual appeal": (82.9, 15.4), "text faithfulness": (36.7, 21.0)}  # (win, lose) %


def run(*argv):
    """Run a script of the repository (`run("qtune.py", "--iters", "10")`) as `python qtune.py --iters 10`
    would, print its command line, return its standard output; stop the experiment with the script's last
    output if it fails. The script runs in this process, so torch is imported once for the whole
    experiment instead of once a step (seconds each); each script seeds and builds everything it uses."""
    argv = [str(a) for a in argv]
    print("$ python " + " ".join(argv), flush=True)
    out, err, saved = io.StringIO(), io.StringIO(), (sys.argv, os.getcwd())
    try:
        sys.argv = argv
        os.chdir(ROOT)
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise SystemExit(f"{argv[0]} failed:\n{out.getvalue()[-2000:]}\n{err.getvalue()[-2000:]}\n{e.code}")
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
    return out.getvalue()


def write_results(out, lines):
    """Write OUT/results.md and print it."""
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def fresh_out(path):
    """Make the experiment's output folder; refuse to mix a new run into an old one."""
    if os.path.exists(path):
        raise SystemExit(f"{path}: already exists; remove it or give another --out")
    os.makedirs(path)


# ----------------------------------------------------------------------------------------------------
# Held-out prompts and curated sets

def unseen_prompts(haystack, n, seed):
    """`n` toy prompts whose scene (shape, colour, count, position, background) no haystack image shows,
    as (prompt, category) pairs: the model saw each word in pretraining, never this combination.
    The haystack's key.json files carry each image's true attributes."""
    seen = set()
    for name in os.listdir(haystack):
        if name.endswith(".json"):
            with open(os.path.join(haystack, name)) as f:
                attributes = json.load(f).get("attributes")
            if attributes:
                seen.add(tuple(attributes[a] for a in ATTRIBUTES))
    if not seen:
        raise SystemExit(f"{haystack}: no key.json with toy-world attributes; give the toy haystack")
    unseen = [combo for combo in ((s, c, n_, p, b) for s in SHAPES for c in COLORS for n_ in (1, 2, 3)
                                  for p in POSITIONS for b in BACKGROUNDS) if combo not in seen]
    if len(unseen) < n:
        raise SystemExit(f"{haystack}: only {len(unseen)} scenes never shown, fewer than the {n} prompts asked for")
    picked = random.Random(seed).sample(unseen, n)
    return [(caption(Scene(*combo)), "Counting" if combo[2] > 1 else "Basic") for combo in picked]


def write_prompts(path, prompts):
    """A PartiPrompts-style TSV of (prompt, category) pairs, the form eval_pairs.py reads."""
    with open(path, "w") as f:
        f.write("Prompt\tCategory\tChallenge\tNote\n")
        f.writelines(f"{p}\t{c}\t\t\n" for p, c in prompts)


def copy_examples(src, keys, dst):
    """Copy key.png / key.txt / key.json (those that exist) of `keys` from folder src to a new folder dst."""
    os.makedirs(dst)
    for key in keys:
        for ext in (".png", ".txt", ".json"):
            if os.path.exists(os.path.join(src, key + ext)):
                shutil.copy(os.path.join(src, key + ext), dst)
    return dst


def split_curated(curated, n_heldout, seed, out):
    """Split a curated folder at random into OUT/heldout (n_heldout images that check early stopping
    and are never trained on) and the training pool; return (pool keys in a seeded random order,
    held-out folder)."""
    keys = sorted(f[:-4] for f in os.listdir(curated) if f.endswith(".png"))
    if len(keys) <= n_heldout:
        raise SystemExit(f"{curated}: {len(keys)} images, not more than the {n_heldout} to hold out")
    keys = random.Random(seed).sample(keys, len(keys))
    return keys[n_heldout:], copy_examples(curated, keys[:n_heldout], os.path.join(out, "heldout"))


# ----------------------------------------------------------------------------------------------------
# Quality-tuning and evaluation with the experiments' shared flags

def add_flags(p, out):
    """The flags every quality-tuning experiment takes: its inputs, the fine-tuning recipe, the evaluation."""
    p.add_argument("--pretrained", default="runs/pretrain/ckpt.pt", help="the pretrained model (pretrain.py)")
    p.add_argument("--curated", default="runs/curate/curated", help="the curation funnel's output (data/curate.py)")
    p.add_argument("--haystack", default="runs/toy/haystack", help="the pretraining haystack: held-out prompts avoid its scenes")
    p.add_argument("--heldout", type=int, default=11, help="curated images held out to check early stopping")
    p.add_argument("--prompts", type=int, default=100, help="held-out prompts to evaluate on")
    p.add_argument("--iters", type=int, default=200, help="quality-tuning iteration cap (qtune.py's toy default)")
    p.add_argument("--bs", type=int, default=64, help="quality-tuning batch size (the paper's 64)")
    p.add_argument("--eval-every", type=int, default=25, help="quality-tuning: held-out check every N iterations")
    p.add_argument("--sample-steps", type=int, default=25, help="sampling steps of the pairwise evaluation")
    p.add_argument("--judge", default="runs/judges/attributes.pt", help="the faithfulness judge's classifier (eval_pairs.py)")
    p.add_argument("--judge-steps", type=int, default=None, help="its training steps, if it must be trained")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--out", default=out, help="everything goes here")


def quality_tune(args, data, heldout, out, seed, *extra, pretrained=None):
    """qtune.py on an already-curated folder with its check set, from `pretrained` (default
    --pretrained); returns the best checkpoint's path."""
    run("qtune.py", "--pretrained", pretrained or args.pretrained, "--data", data, "--curate-top", "0", "--caption-field", "",
        "--heldout-data", heldout, "--out", out, "--seed", seed, "--iters", args.iters, "--bs", args.bs,
        "--eval-every", args.eval_every, *extra)
    return os.path.join(out, "best.pt")


def tune_and_judge(args, pretrained, folder, seed, prompts):
    """One seed of quality-tuned vs pretrained, in `folder`: the curated set split at random (seeded)
    into a check set and the training set, qtune.py from `pretrained` on it, then eval_pairs.py on
    the prompt file. Returns (number of training images, the judges' outcomes as evaluate gives them)."""
    pool, heldout = split_curated(args.curated, args.heldout, seed, folder)
    train = copy_examples(args.curated, pool, os.path.join(folder, "train"))
    best = quality_tune(args, train, heldout, os.path.join(folder, "qtune"), seed, pretrained=pretrained)
    return len(pool), evaluate(args, best, pretrained, ("quality-tuned", "pretrained"), prompts,
                               os.path.join(folder, "eval"), seed)


def evaluate(args, a, b, names, prompts, out, seed):
    """eval_pairs.py: A vs B on the prompt file, the judges voting; returns {task name: (n_prompts,)
    outcomes in prompt order, +1 = A wins}. Prompt i is drawn with seed 1000 * seed + i by both models."""
    judge = ["--judge", args.judge] + (["--judge-steps", args.judge_steps] if args.judge_steps else [])
    run("eval_pairs.py", "--a", a, "--b", b, "--name-a", names[0], "--name-b", names[1], "--prompts", prompts,
        "--seed", 1000 * seed, "--rater-seed", seed, "--steps", args.sample_steps, "--n-boot", args.n_boot,
        *judge, "--out", out)
    return judge_outcomes(out)


def judge_outcomes(study):
    """{task name ("visual appeal", ...): (n_prompts,) majority outcomes in prompt order} of a study's judges."""
    with closing(open_study(study)) as conn:
        outcomes = study_report(conn, "judge", n_boot=1)["outcomes"]
    return {TASKS[task].name: np.array([o for _, o in sorted(by_pair.items())]) for task, by_pair in outcomes.items()}


def pooled(outcomes_by_seed, n_boot, seed=0):
    """{task: summarize_outcomes} over several seeds' outcomes of the same prompts: (n_prompts, n_seeds),
    bootstrapped by prompt."""
    tasks = outcomes_by_seed[0].keys()
    return {task: summarize_outcomes(np.stack([o[task] for o in outcomes_by_seed], axis=1), n_boot=n_boot, seed=seed)
            for task in tasks}


def cells(summary):
    """'win% [lo, hi] | tie% [lo, hi] | lose% [lo, hi]' of one summarize_outcomes result."""
    return " | ".join(f"{summary[k]:.1f}% [{summary['ci'][k][0]:.1f}, {summary['ci'][k][1]:.1f}]" for k in RATES)
