"""Kandinsky's image priors on the toy world (kandinsky_paper.txt, section 5, Table 3), and its
image variations.

The paper compares priors by what the decoder makes of their embeddings: the linear prior gives the
best FID, the diffusion prior the best CLIP score and human preference. Here, with the project's
own scripts and library:

  1. train_prior.py fits the linear prior and trains the diffusion prior on the toy haystack, the last
     --holdout image-caption pairs held out (the same split for both);
  2. the Kandinsky decoder (pretrain.py --arch kandinsky) draws one image per held-out caption, the
     same seed for every row of the table, with its image embedding taken from
       - the held-out image itself (CLIP's vision tower): what a perfect prior would give,
       - the linear prior, the diffusion prior,
       - nothing (zeros, the decoder's unconditional embedding): the text tokens alone;
     beside the judge's score of the held-out images themselves (their captions are noisy web
     captions, so even the real images do not show everything they state) and of another model's
     images of the same captions and seeds (--compare: Emu's toy latent model);
  3. each row's centred cosine of the embedding to the true one (emu.variants.prior.cosine_similarity), the
     faithfulness judge's mean score of the images (emu.evaluation.faithfulness.faithfulness_score: the classifier's
     belief that the image shows what its caption states), and the judge's three raters comparing the
     diffusion prior's images with the linear prior's, pair by pair (win / tie / lose, 95% bootstrap
     intervals over captions);
  4. variations: for the first --variations held-out images, two variations each (the image's CLIP
     embedding, new noise), embedded again: the centred cosine of each variation to its own source
     and to the other sources, the share of the other sources it is farther from than from its own,
     and how often its own source is the nearest.

    python train_ae.py --arch kandinsky && python pretrain.py --arch kandinsky --out runs/kandinsky/decoder
    python experiments/kandinsky_priors.py    # then this: about ten minutes on 2 CPU cores
Writes OUT/results.md and OUT/results.json.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emu.datasets.folders import ImageCaptionFolder, to_uint8  # noqa: E402
from emu.evaluation.faithfulness import FaithfulnessJudge, faithfulness_score, load_or_train_classifier  # noqa: E402
from emu.evaluation.pairwise import faithfulness_to_ternary, summarize  # noqa: E402
from emu.pipeline import TextToImage  # noqa: E402
from emu.variants.prior import cosine_similarity, load_prior  # noqa: E402
from common import fresh_out, run, write_results  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", default="runs/kandinsky/decoder/ckpt.pt", help="Kandinsky decoder (pretrain.py --arch kandinsky)")
    p.add_argument("--compare", default="runs/pretrain/ckpt.pt",
                   help="a text-to-image checkpoint of another architecture whose images of the same captions and seeds "
                        "are scored beside (default: Emu's toy latent model from toy.sh; '' for none)")
    p.add_argument("--haystack", default="runs/toy/haystack", help="the image-caption pairs the priors learn from")
    p.add_argument("--clip", default="runs/towers/clip", help="the CLIP towers (the decoder's)")
    p.add_argument("--holdout", type=int, default=200, help="the last N pairs: held out from the priors, evaluated on")
    p.add_argument("--prior-steps", type=int, default=1000, help="diffusion prior training steps (train_prior.py's default)")
    p.add_argument("--prior-flags", default="", help="extra flags for train_prior.py (tests: a tiny world)")
    p.add_argument("--judge", default="runs/judges/attributes.pt", help="the faithfulness judge's classifier (eval_pairs.py)")
    p.add_argument("--judge-steps", type=int, default=None, help="its training steps, if it must be trained")
    p.add_argument("--steps", type=int, default=25, help="decoder sampling steps")
    p.add_argument("--cfg", type=float, default=5.0, help="decoder guidance scale")
    p.add_argument("--variations", type=int, default=50, help="held-out images to make variations of")
    p.add_argument("--seed", type=int, default=0, help="first image seed")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--out", default="runs/exp-kandinsky-priors", help="everything goes here")
    return p.parse_args(argv)


def main(args):
    fresh_out(args.out)
    # 1. both priors, on the same split
    priors = {}
    for kind in ("linear", "diffusion"):
        out = os.path.join(args.out, f"prior-{kind}")
        run("train_prior.py", "--kind", kind, "--data", args.haystack, "--clip", args.clip, "--holdout", args.holdout,
            "--steps", args.prior_steps, "--out", out, *args.prior_flags.split())
        priors[kind] = os.path.join(out, "prior.pt")

    # the held-out pairs (train_prior.py holds out the last --holdout usable ones)
    model = TextToImage.from_checkpoint(args.decoder, arch="kandinsky", prior=priors["linear"])
    encoder = model.text_encoder
    data = ImageCaptionFolder(args.haystack, model.image_size, skip_bad=True)
    every = data.load_all()  # the usable images, in order; their captions lined up with them
    every_caption = [c for i, c in enumerate(data.captions) if i not in data.skipped]
    images, captions = every[-args.holdout:], every_caption[-args.holdout:]
    true = encoder.embed_images(images)
    train_images = torch.cat([encoder.embed_images(every[s:s + 256]) for s in range(0, len(every) - args.holdout, 256)])
    train_images = train_images[:len(every) - args.holdout]
    center = train_images.mean(0)  # centred cosine: measured from the mean training embedding

    # 2. one image per caption and source of the image embedding, the same seeds throughout
    embeddings = {"true image (CLIP)": true}
    for kind, path in priors.items():
        encoder.prior = load_prior(path)
        embeddings[f"{kind} prior"] = encoder.encode(captions).image
    embeddings["none (text alone)"] = torch.zeros_like(true)
    seeds = [args.seed + i for i in range(len(captions))]
    classifier = load_or_train_classifier(args.judge, args.judge_steps)
    rows = {"the held-out images themselves": {"centred cosine": None, "faithfulness": float(
        faithfulness_score(classifier, to_uint8(images), captions).mean())}}
    generated = {}
    for name, embeds in embeddings.items():
        print(f"== decoding {len(captions)} captions with image embeddings from: {name}", flush=True)
        generated[name] = to_uint8(model.generate(captions, seeds, args.cfg, args.steps, image_embeds=embeds))
        rows[name] = {"centred cosine": cosine_similarity(embeds, true, center).mean().item() if name != "none (text alone)" else None,
                      "faithfulness": float(faithfulness_score(classifier, generated[name], captions).mean())}

    if args.compare:  # the same captions and seeds through another model, for scale
        other = TextToImage.from_checkpoint(args.compare)
        name = f"{other.arch.name} model {args.compare} (text alone)"
        print(f"== decoding {len(captions)} captions with {name}", flush=True)
        made = to_uint8(other.generate(captions, seeds, args.cfg, args.steps))
        rows[name] = {"centred cosine": None, "faithfulness": float(faithfulness_score(classifier, made, captions).mean())}

    # 3. the judge's raters: diffusion prior (A) vs linear prior (B)
    votes = faithfulness_to_ternary(FaithfulnessJudge(classifier).vote(generated["diffusion prior"], generated["linear prior"],
                                                                        captions))
    pairwise = summarize({"text faithfulness": votes}, n_boot=args.n_boot)["text faithfulness"]

    # 4. variations: closer to their own source than to the others?
    k = min(args.variations, len(images))
    sources = true[:k]
    variations = encoder.embed_images(model.generate([""] * 2 * k, [10_000 + i for i in range(2 * k)], args.cfg, args.steps,
                                                     image_embeds=sources.repeat_interleave(2, 0)))
    sim = torch.nn.functional.normalize(variations - center, dim=-1) @ torch.nn.functional.normalize(sources - center, dim=-1).T
    own = sim[torch.arange(2 * k), torch.arange(k).repeat_interleave(2)]  # (2k,)
    others = (sim.sum(1) - own) / (k - 1)
    nearest = (sim.argmax(1) == torch.arange(k).repeat_interleave(2)).float().mean().item()
    beaten = ((sim < own[:, None]).sum(1).float() / (k - 1)).mean().item()  # share of other sources farther than its own
    var = {"sources": k, "own": own.mean().item(), "others": others.mean().item(), "own nearest": nearest,
           "others farther": beaten}

    lines = ["# Kandinsky's image priors on the toy world", "",
             f"decoder {args.decoder}; {len(captions)} held-out captions; {args.steps} steps, guidance {args.cfg}", "",
             "| image embedding from | centred cosine to the true one | faithfulness score (judge) |", "|---|---|---|"]
    for name, row in rows.items():
        cos = "n/a" if row["centred cosine"] is None else "1 (itself)" if name.startswith("true") else f"{row['centred cosine']:.3f}"
        lines.append(f"| {name} | {cos} | {row['faithfulness']:.3f} |")
    ci = pairwise["ci"]
    lines += ["", "Pairwise text faithfulness, diffusion prior vs linear prior (3 judge raters, majority): "
              f"win {pairwise['win']:.1f}% [{ci['win'][0]:.1f}, {ci['win'][1]:.1f}], tie {pairwise['tie']:.1f}%, "
              f"lose {pairwise['lose']:.1f}% [{ci['lose'][0]:.1f}, {ci['lose'][1]:.1f}]", "",
              f"Variations ({k} held-out images, 2 each): centred cosine to their own source {var['own']:.3f}, "
              f"to the other sources {var['others']:.3f}; a variation is closer to its own source than to "
              f"{100 * var['others farther']:.0f}% of the others, and its own source is the nearest for "
              f"{100 * var['own nearest']:.0f}%"]
    write_results(args.out, lines)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "pairwise": pairwise, "variations": var, "args": vars(args)}, f, indent=2)
    return rows, pairwise, var


if __name__ == "__main__":
    main(parse_args())
