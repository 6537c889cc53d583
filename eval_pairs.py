"""Pairwise A/B evaluation of two models, as the paper does it (emu_paper.txt, section 4.1).

For every prompt both models generate an image from the same seed. A rater sees the pair with the
two images in a random left/right order. Visual appeal: 5 raters who do NOT see the prompt answer
A / B / Tie. Text faithfulness: 3 raters who see the prompt answer A / B / Both / Neither (Both and
Neither count as a tie). Each pair's outcome is the majority vote; the report gives model A's
win / tie / lose rates with 95% bootstrap confidence intervals, overall and per prompt category,
and how well the raters agree.

Three commands share one study folder (--out / --study, emu/evaluation/study.py):

    python eval_pairs.py --a runs/qtune/best.pt --b runs/pretrain/ckpt.pt   # generate (the default)
    python eval_pairs.py serve --raters alice,bob,carol,dan,erin            # people vote in a browser
    python eval_pairs.py report                                             # people and judges

`generate` draws both models' images and lets the automatic judges (emu/evaluation/judges.py, toy world only:
`--judges none` for real models) vote as the paper's raters would; they also measure each model's prompt
accuracy (emu/evaluation/accuracy.py: how often the images show what the prompts state) against real toy
images of the same prompts. `serve` gives each person a link
to the rating page (emu/evaluation/rating.py). `report` summarises every kind of rater the same way, so the
judges can be compared with people.
"""
import argparse
import csv
import json
import os
import sys
from contextlib import closing

import numpy as np
import torch

from emu import EmuError
from emu.arch import ARCHS
from emu.datasets.folders import make_grid, read_prompts, save_png, to_uint8
from emu.evaluation.accuracy import accuracy_markdown, accuracy_table, prompt_hits, reference_images
from emu.evaluation.judges import AppealJudge
from emu.evaluation.faithfulness import FaithfulnessJudge, load_or_train_classifier
from emu.evaluation.pairwise import A, B, BOTH, NEITHER, RATES, TIE, to_markdown
from emu.pipeline import TextToImage
from emu.evaluation.rating import RatingServer
from emu.evaluation.study import (TASKS, add_judge_votes, add_raters, assign, create_study, meta, open_study,
                                  read_votes, study_report)

COMMANDS = ("generate", "serve", "report")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{generate,serve,report}")

    g = sub.add_parser("generate", help="both models' images for every prompt, and the judges' votes (the default)")
    g.add_argument("--a", default="runs/qtune/best.pt", help="checkpoint of model A (the one whose win rate is reported), "
                                                              "or a published Stable Diffusion folder")
    g.add_argument("--b", default="runs/pretrain/ckpt.pt", help="checkpoint of model B (the baseline), or a published Stable "
                                                                 "Diffusion folder: a base that model A was quality-tuned from")
    g.add_argument("--arch", default=None, choices=sorted(ARCHS),
                   help="the architecture both checkpoints must hold (default: any; each is read from its checkpoint)")
    g.add_argument("--name-a", default="quality-tuned", help="display name of model A")
    g.add_argument("--name-b", default="pretrained", help="display name of model B")
    g.add_argument("--prompts", default="data/prompts/toy.tsv", help="prompt file: PartiPrompts-style .tsv or one prompt per line")
    g.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    g.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed + i by both models")
    g.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale for both models")
    g.add_argument("--cfg-rescale", type=float, default=None, metavar="PHI",
                   help="guidance rescale (Lin et al. 2024) for both models, 0 = plain guidance; default: model A's own "
                        "(sample.py --cfg-rescale)")
    g.add_argument("--steps", type=int, default=25, help="sampling steps")
    g.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="sampler")
    g.add_argument("--judges", default="toy", choices=["toy", "none"],
                   help="automatic raters: the toy world's judges, or none (real models: people rate through `serve`)")
    g.add_argument("--appeal-raters", type=int, default=5, help="judges per pair for visual appeal (paper: 5)")
    g.add_argument("--faith-raters", type=int, default=3, help="judges per pair for text faithfulness (paper: 3)")
    g.add_argument("--judge", default="runs/judges/attributes.pt",
                   help="attribute classifier for the faithfulness judge; trained on toy-world images if missing")
    g.add_argument("--judge-steps", type=int, default=None, help="training steps if the classifier must be trained (default: its own)")
    g.add_argument("--rater-seed", type=int, default=0, help="seed of the judges' noise and of the left/right order")
    g.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the confidence intervals")
    g.add_argument("--out", default="runs/eval", help="study folder: images, study.sqlite, results")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")

    s = sub.add_parser("serve", help="the rating page: people vote on the study's pairs in a browser")
    s.add_argument("--study", default="runs/eval", help="study folder written by generate")
    s.add_argument("--raters", default=None,
                   help="first start only: comma-separated rater names, or a number N for rater-1..rater-N")
    s.add_argument("--appeal-raters", type=int, default=5, help="distinct people per pair for visual appeal (paper: 5)")
    s.add_argument("--faith-raters", type=int, default=3, help="distinct people per pair for text faithfulness (paper: 3)")
    s.add_argument("--seed", type=int, default=0, help="seed of the assignment, the order and the left/right sides")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback is reachable by others")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")

    r = sub.add_parser("report", help="majority votes, win rates with confidence intervals, agreement; Markdown and CSV")
    r.add_argument("--study", default="runs/eval", help="study folder")
    r.add_argument("--partial", action="store_true", help="count pairs that do not yet have all their votes")
    r.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the confidence intervals")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["generate", *argv]  # the default command keeps the short form: eval_pairs.py --a X --b Y
    return p.parse_args(argv)


def generate(args):
    prompts = read_prompts(args.prompts)[:args.limit]
    texts, categories = [p for p, _ in prompts], [c or "(none)" for _, c in prompts]
    seeds = [args.seed + i for i in range(len(prompts))]

    # model A first: unless told, its own guidance rescale is both models'
    model = TextToImage.load(args.a, device=args.device, arch=args.arch)
    if args.cfg_rescale is None:
        args.cfg_rescale = model.cfg_rescale
    # the study next: it refuses to replace one that people have voted in, before any image is touched
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    create_study(args.out, [{"prompt": t, "category": c, "seed": s, "image_a": f"images/{i:04d}-a.png",
                             "image_b": f"images/{i:04d}-b.png"} for i, (t, c, s) in enumerate(zip(texts, categories, seeds))],
                 {"name_a": args.name_a, "name_b": args.name_b, "a": args.a, "b": args.b, "prompts": args.prompts,
                  "cfg": args.cfg, "cfg_rescale": args.cfg_rescale, "steps": args.steps, "sampler": args.sampler})

    # both sides from the same prompts, seeds and guidance
    images = {}
    for side, path in (("a", args.a), ("b", args.b)):
        model = model if side == "a" else TextToImage.load(path, device=args.device, arch=args.arch)
        print(f"generating {len(texts)} images with {path}")
        images[side] = to_uint8(model.generate(texts, seeds, args.cfg, args.steps, args.sampler, cfg_rescale=args.cfg_rescale))
        for i, image in enumerate(images[side]):
            save_png(os.path.join(args.out, "images", f"{i:04d}-{side}.png"), image,
                     {"prompt": texts[i], "seed": seeds[i], "checkpoint": path, "cfg": args.cfg,
                      "cfg_rescale": args.cfg_rescale, "steps": args.steps})
        del model

    if args.judges == "toy":
        # the judges see each pair in a random left/right order, like people, and never know which is A
        a_on_left = np.random.default_rng(args.rater_seed).random(len(texts)) < 0.5
        left = np.where(a_on_left[:, None, None, None], images["a"], images["b"])
        right = np.where(a_on_left[:, None, None, None], images["b"], images["a"])
        classifier = load_or_train_classifier(args.judge, args.judge_steps)
        faith_judge = FaithfulnessJudge(classifier, n_raters=args.faith_raters, seed=args.rater_seed + 1)
        votes = {"appeal": AppealJudge(n_raters=args.appeal_raters, seed=args.rater_seed).vote(left, right),
                 "faithfulness": faith_judge.vote(left, right, texts)}  # (n_raters, n_pairs), +1 = the left image
        with closing(open_study(args.out)) as conn:
            add_judge_votes(conn, votes, a_on_left)
        write_prompt_accuracy(args, classifier, images, texts)
        report(argparse.Namespace(study=args.out, partial=False, n_boot=args.n_boot, seed=args.rater_seed))

    n_show = min(16, len(texts))
    pairs = np.concatenate([images["a"][:n_show], images["b"][:n_show]])
    save_png(os.path.join(args.out, "pairs.png"), make_grid(pairs, ncol=n_show), {"top row": args.a, "bottom row": args.b})
    print(f"wrote the study to {args.out}/: images/, study.sqlite and pairs.png (top row {args.name_a}, bottom {args.name_b})")


def write_prompt_accuracy(args, classifier, images, texts):
    """accuracy.json: how often each model's images show what their prompts state, read by the judges'
    attribute classifier, beside real toy images of the same prompts (the ceiling); report() shows it."""
    size = images["a"].shape[1]
    rows = {f"{args.name_a} (A)": prompt_hits(classifier, images["a"], texts),
            f"{args.name_b} (B)": prompt_hits(classifier, images["b"], texts),
            "real images of the prompts": prompt_hits(classifier, reference_images(texts, args.rater_seed, size), texts)}
    tables = {name: accuracy_table(hits, n_boot=args.n_boot, seed=args.rater_seed) for name, hits in rows.items()}
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(tables, f, indent=1)


def serve(args):
    with closing(open_study(args.study)) as conn:
        humans = dict(conn.execute("SELECT name, token FROM raters WHERE kind = 'human' ORDER BY rowid"))
        if not humans:  # the first start: raters, their links and their assignments
            if not args.raters:
                raise EmuError(f"{args.study}: no raters yet; give --raters (names, or a number) on the first start")
            names = ([f"rater-{i + 1}" for i in range(int(args.raters))] if args.raters.isdigit()
                     else [n.strip() for n in args.raters.split(",") if n.strip()])
            if len(set(names)) != len(names):
                raise EmuError(f"--raters names someone twice: {args.raters}")
            humans = add_raters(conn, names, "human")
            assign(conn, names, {"appeal": args.appeal_raters, "faithfulness": args.faith_raters}, seed=args.seed)
        elif args.raters:
            raise EmuError(f"{args.study}: already has raters ({', '.join(humans)}); leave out --raters to continue the study")
        counts = dict(conn.execute("SELECT rater, COUNT(*) FROM assignments GROUP BY rater"))
    try:
        server = RatingServer(args.study, args.host, args.port)
    except OSError as e:
        raise EmuError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if not server.loopback:
        print(f"warning: listening on {args.host}: anyone who can reach this address may try the page; "
              "the links' tokens are the only key and travel unencrypted (plain HTTP)", file=sys.stderr)
    links = "".join(f"{name}\t{counts.get(name, 0)} items\t{server.link(token)}\n" for name, token in humans.items())
    with open(os.open(os.path.join(args.study, "links.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(links)
    print(f"rating page for {args.study} on {server.base_url}; send each rater their own link (also in links.txt):\n{links}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped; every vote is already saved")
    finally:
        server.server_close()


def report_markdown(reports, info, partial):
    """The report as Markdown: per kind of rater, agreement and the table; then people vs judges."""
    who = {"human": "people", "judge": "automatic judges"}
    name_a, name_b = info["name_a"], info["name_b"]
    sections = [f"# {name_a} (A) vs {name_b} (B)"]
    if "a" in info:
        sections.append(f"{info['a']} vs {info['b']}, prompts {info['prompts']}, {info['sampler']} {info['steps']} steps, "
                        f"guidance {info['cfg']}" + (f", rescaled {info['cfg_rescale']}" if float(info.get("cfg_rescale", 0)) else ""))
    for kind, r in reports.items():
        sections.append(f"## Rated by {who[kind]}: {r['raters']} rater{'s' * (r['raters'] != 1)}, {r['votes']} votes")
        agreement = "; ".join(f"{task}: Fleiss' kappa {'undefined' if a['kappa'] is None else format(a['kappa'], '.2f')}, "
                              f"{100 * a['observed']:.0f}% of rater pairs agree" for task, a in r["agreement"].items())
        sections.append(f"Agreement between raters: {agreement or 'no pair has two votes yet'}.")
        sections.append(to_markdown(r["summary"], name_a, name_b) if r["summary"] else
                        "No pair has all its votes yet" + ("." if partial else " (--partial counts the pairs that have some)."))
    if len(reports) == 2:  # how often the judges' majority matches the people's
        lines = []
        for task in TASKS:
            human, judge = reports["human"]["outcomes"][task], reports["judge"]["outcomes"][task]
            both = sorted(set(human) & set(judge))
            if both:
                same = sum(human[p] == judge[p] for p in both)
                lines.append(f"- {TASKS[task].name}: the same outcome on {same} of {len(both)} pairs ({100 * same / len(both):.0f}%)")
        sections.append("## People vs automatic judges\n\n" + ("\n".join(lines) or "No pair rated by both yet."))
    return "\n\n".join(sections) + "\n"


def report(args):
    """Summaries for people and for judges (whichever voted), written as Markdown, CSV and JSON."""
    with closing(open_study(args.study)) as conn:
        info = meta(conn)
        reports = {kind: study_report(conn, kind, n_boot=args.n_boot, seed=args.seed, partial=args.partial)
                   for kind in ("human", "judge")}
        reports = {kind: r for kind, r in reports.items() if r["votes"]}
        names = {A: "A", B: "B", TIE: "tie", BOTH: "both", NEITHER: "neither"}
        votes = [{"kind": kind, **v, "vote": names[v["vote"]]} for kind in ("human", "judge") for v in read_votes(conn, kind)]
    if not reports:
        raise EmuError(f"{args.study}: no votes yet")
    markdown = report_markdown(reports, info, args.partial)
    accuracy_file = os.path.join(args.study, "accuracy.json")
    accuracy = json.load(open(accuracy_file)) if os.path.exists(accuracy_file) else None
    if accuracy:  # the toy world's judges also measured what the images show
        markdown += ("\n## Prompt accuracy (toy world)\n\nThe share of images in which the judges' attribute classifier "
                     "reads each attribute the prompt states, and all of them; brackets: 95% bootstrap intervals over "
                     "prompts.\n\n" + accuracy_markdown(accuracy) + "\n")

    with open(os.path.join(args.study, "results.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.study, "results.json"), "w") as f:
        json.dump({"study": info, **{kind: {k: v for k, v in r.items() if k != "outcomes"} for kind, r in reports.items()},
                   **({"prompt_accuracy": accuracy} if accuracy else {})}, f, indent=1)
    with open(os.path.join(args.study, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rated_by", "category", "task", "pairs", *[f"{k}{end}" for k in RATES for end in ("", "_lo", "_hi")], "kappa"])
        for kind, r in reports.items():
            for cat, s in r["summary"].items():
                for task, t in s.items():
                    kappa = r["agreement"].get(task, {}).get("kappa")
                    w.writerow([kind, cat, task, t["n"], *[f"{x:.2f}" for k in RATES for x in (t[k], *t["ci"][k])],
                                "" if kappa is None else f"{kappa:.3f}"])
    with open(os.path.join(args.study, "votes.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kind", "rater", "pair", "prompt", "category", "task", "a_on_left", "choice", "vote", "at"])
        w.writeheader()
        w.writerows(votes)
    print(markdown)
    print(f"wrote {args.study}/results.md, results.csv, results.json and votes.csv")


def main(args):
    {"generate": generate, "serve": serve, "report": report}[args.command](args)


if __name__ == "__main__":
    try:
        main(parse_args())
    except EmuError as e:
        raise SystemExit(f"error: {e}")
