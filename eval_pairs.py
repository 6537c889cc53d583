"""Pairwise A/B evaluation of two models, as the paper does it (emu_paper.txt, section 4.1).

For every prompt both models generate an image from the same seed. The pair is shown with the two
images in a random left/right order. Visual appeal: 5 raters who do NOT see the prompt answer
left / right / tie. Text faithfulness: 3 raters who see the prompt answer left / right / both /
neither (both and neither count as a tie). Each pair's outcome is the majority vote; the report
gives model A's win / tie / lose rates with 95% bootstrap confidence intervals, overall and per
prompt category.

In the toy world the raters are automatic judges (emu/judges.py) that look only at pixels, and
the prompt for faithfulness; they stand in for the paper's human annotators.

    python eval_pairs.py --a runs/qtune/best.pt --b runs/pretrain/ckpt.pt
"""
import argparse
import json
import os

import numpy as np
import torch

from emu import EmuError
from emu.data import make_grid, read_prompts, save_png, to_uint8
from emu.judges import AppealJudge, FaithfulnessJudge, load_classifier, save_classifier, train_attribute_classifier
from emu.pairwise import faithfulness_to_ternary, majority_vote, summarize, to_markdown
from emu.pipeline import TextToImage


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="runs/qtune/best.pt", help="checkpoint of model A (the one whose win rate is reported)")
    p.add_argument("--b", default="runs/pretrain/ckpt.pt", help="checkpoint of model B (the baseline)")
    p.add_argument("--name-a", default="quality-tuned", help="display name of model A")
    p.add_argument("--name-b", default="pretrained", help="display name of model B")
    p.add_argument("--prompts", default="data/prompts/toy.tsv", help="prompt file: PartiPrompts-style .tsv or one prompt per line")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed + i by both models")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale for both models")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="sampler")
    p.add_argument("--appeal-raters", type=int, default=5, help="raters per pair for visual appeal (paper: 5)")
    p.add_argument("--faith-raters", type=int, default=3, help="raters per pair for text faithfulness (paper: 3)")
    p.add_argument("--judge", default="runs/judges/attributes.pt",
                   help="attribute classifier for the faithfulness judge; trained on toy-world images if missing")
    p.add_argument("--judge-steps", type=int, default=None, help="training steps if the classifier must be trained (default: its own)")
    p.add_argument("--rater-seed", type=int, default=0, help="seed of the raters' noise and of the left/right order")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--out", default="runs/eval", help="output directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p.parse_args(argv)


def faithfulness_classifier(path, steps):
    """Load the judges' attribute classifier, training it on fresh toy-world images the first time."""
    if os.path.exists(path):
        return load_classifier(path)
    print(f"training the faithfulness judge's attribute classifier -> {path}")
    classifier = train_attribute_classifier(**({"steps": steps} if steps else {}))
    save_classifier(classifier, path)
    return classifier


def main(args):
    prompts = read_prompts(args.prompts)[:args.limit]
    texts, categories = [p for p, _ in prompts], [c or "all" for _, c in prompts]
    seeds = [args.seed + i for i in range(len(prompts))]

    # both sides from the same prompts and seeds
    images = {}
    for side, path in (("a", args.a), ("b", args.b)):
        model = TextToImage.from_checkpoint(path, device=args.device)
        print(f"generating {len(texts)} images with {path}")
        images[side] = to_uint8(model.generate(texts, seeds, args.cfg, args.steps, args.sampler))
        del model

    # show each pair in a random left/right order; the raters only ever see "left" and "right"
    a_left = np.random.default_rng(args.rater_seed).random(len(texts)) < 0.5
    left = np.where(a_left[:, None, None, None], images["a"], images["b"])
    right = np.where(a_left[:, None, None, None], images["b"], images["a"])
    appeal = AppealJudge(n_raters=args.appeal_raters, seed=args.rater_seed).vote(left, right)
    faith_judge = FaithfulnessJudge(faithfulness_classifier(args.judge, args.judge_steps), n_raters=args.faith_raters,
                                    seed=args.rater_seed + 1)
    faith = faithfulness_to_ternary(faith_judge.vote(left, right, texts))
    sign = np.where(a_left, 1, -1)  # a vote for "left" is a vote for A when A was on the left
    votes = {"visual appeal": appeal * sign, "text faithfulness": faith * sign}

    # majority vote, win rates and confidence intervals, overall and per category
    summary = {"all": summarize(votes, n_boot=args.n_boot, seed=args.rater_seed)}
    for cat in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == cat]
        if len(set(categories)) > 1:
            summary[cat] = summarize({k: v[:, idx] for k, v in votes.items()}, n_boot=args.n_boot, seed=args.rater_seed)
    report = {"a": args.a, "b": args.b, "name_a": args.name_a, "name_b": args.name_b, "prompts": args.prompts,
              "n_pairs": len(texts), "cfg": args.cfg, "steps": args.steps, "sampler": args.sampler, "summary": summary}

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "pairs.jsonl"), "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"prompt": text, "category": categories[i], "seed": seeds[i], "a_on_left": bool(a_left[i]),
                                **{task: {"votes": v[:, i].tolist(), "outcome": int(majority_vote(v[:, i:i + 1])[0])}
                                   for task, v in votes.items()}}) + "\n")
    markdown = "\n\n".join(f"### {cat} ({summary[cat]['visual appeal']['n']} prompts)\n\n" + to_markdown(s, args.name_a, args.name_b)
                           for cat, s in summary.items())
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# {args.name_a} vs {args.name_b}\n\n{args.a} vs {args.b}, prompts {args.prompts}\n\n{markdown}\n")
    n_show = min(16, len(texts))
    pairs = np.concatenate([images["a"][:n_show], images["b"][:n_show]])
    save_png(os.path.join(args.out, "pairs.png"), make_grid(pairs, ncol=n_show), {"top row": args.a, "bottom row": args.b})
    print(to_markdown(summary["all"], args.name_a, args.name_b))
    print(f"wrote {args.out}/results.json, results.md, pairs.jsonl and pairs.png")


if __name__ == "__main__":
    try:
        main(parse_args())
    except EmuError as e:
        raise SystemExit(f"error: {e}")
