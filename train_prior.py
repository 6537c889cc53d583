"""Train Kandinsky's image prior: a caption's CLIP text embedding -> a CLIP image embedding.

The Kandinsky decoder draws an image from a CLIP image embedding; the prior supplies that embedding
from a caption (kandinsky_paper.txt, section 3). The paper compares priors (Table 3) and finds the
simplest, one linear layer, gives the best FID, while the transformer diffusion prior gives the best
CLIP score and human preference. Both are here (emu/variants/prior.py):

    python data/make_toy.py                    # once: the toy haystack and towers
    python train_prior.py --kind linear        # closed-form ridge regression: seconds
    python train_prior.py                      # the diffusion prior: a few minutes on a CPU

The CLIP towers are frozen, so every caption's and image's embeddings are computed once and kept in
OUT/embeddings.pt (a rerun with the same data and towers reuses them). The last --holdout pairs are
never trained on; the measure is the cosine similarity of the predicted image embedding to the true
one on them, raw and centred on the mean training embedding (emu.variants.prior.cosine_similarity), beside
the raw cosine of that mean itself (the same embedding for every caption), and, for the diffusion
prior, its unguided samples.
Writes OUT/prior.pt (what sample.py loads), OUT/metrics.jsonl and OUT/results.md.
"""
import argparse
import json
import os
import time

import torch

from emu import EmuError
from emu.checkpoint import append_metrics, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from emu.text.clip import clip_clean, clip_preprocess, load_clip_text, load_clip_vision
from emu.datasets.folders import ImageCaptionFolder
from emu.text.hf import tokenize
from emu.variants.prior import PRIOR_PRESETS, DiffusionPrior, LinearPrior, cosine_similarity, prior_config
from emu.text.encoder import TextEmbedding
from emu.training.loop import resume_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/toy/haystack", help="folder of key.png + key.txt pairs")
    p.add_argument("--clip", default="runs/towers/clip", help="CLIP directory with both towers (Hugging Face layout)")
    p.add_argument("--out", default="runs/prior", help="output directory")
    p.add_argument("--kind", default="diffusion", choices=["linear", "diffusion"], help="which prior")
    p.add_argument("--preset", default="toy", choices=sorted(PRIOR_PRESETS), help="diffusion prior size")
    p.add_argument("--holdout", type=int, default=200, help="the last N pairs are held out for the measure")
    p.add_argument("--ridge", type=float, default=1e-3, help="linear prior: the ridge penalty")
    p.add_argument("--steps", type=int, default=1000, help="diffusion prior: training steps")
    p.add_argument("--bs", type=int, default=256, help="diffusion prior: batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="diffusion prior: AdamW learning rate")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="diffusion prior: probability of the empty caption (for guidance)")
    p.add_argument("--cfg", type=float, default=2.0, help="diffusion prior: guidance scale of the held-out samples")
    p.add_argument("--sample-steps", type=int, default=25, help="diffusion prior: DDIM steps of the held-out samples")
    p.add_argument("--eval-every", type=int, default=500, help="diffusion prior: held-out measure every N steps")
    p.add_argument("--save-every", type=int, default=500, help="diffusion prior: checkpoint every N steps")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' for OUT/ckpt.pt")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches, noise and samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p.parse_args(argv)


@torch.no_grad()
def clip_text(clip, tokenizer, captions, device):
    """Captions -> the TextEmbedding a prior reads: CLIP's token states, mask and pooled vector (the
    T5 fields are empty: a prior reads CLIP alone)."""
    ids, mask = tokenize(tokenizer, captions, device, clean=clip_clean)
    hidden, pooled = clip(ids)
    B = len(captions)
    return TextEmbedding(clip=hidden.float(), clip_mask=mask, t5=torch.zeros(B, 1, 1, device=device),
                         t5_mask=torch.zeros(B, 1, dtype=torch.bool, device=device), pooled=pooled.float())


@torch.no_grad()
def embed_all(args, device):
    """Every usable pair's (TextEmbedding, image embeddings (N, E)), and the empty caption's
    TextEmbedding (what dropped captions become, and what guidance compares against), cut to the
    captions' token length; computed once and cached."""
    cache = os.path.join(args.out, "embeddings.pt")
    stamp = {"data": os.path.abspath(args.data), "clip": os.path.abspath(args.clip),
             "files": sorted(os.listdir(args.data)) if os.path.isdir(args.data) else None}
    if os.path.exists(cache):
        saved = load_checkpoint(cache)
        if saved["stamp"] == stamp and "empty" in saved:
            return TextEmbedding(**saved["text"]), saved["images"], TextEmbedding(**saved["empty"])
        print(f"{cache}: made from other data or towers; embedding again")
    if not os.path.isdir(args.data):
        raise EmuError(f"{args.data}: data folder not found (run python data/make_toy.py first)")
    text_tower, tokenizer = load_clip_text(args.clip, dtype=torch.float32, device=device)
    vision = load_clip_vision(args.clip, dtype=torch.float32, device=device)
    data = ImageCaptionFolder(args.data, vision.config.image_size, skip_bad=True)
    usable = [i for i in range(len(data)) if i not in data.skipped] if len(data) else []
    texts, images = [], []
    for start in range(0, len(data), 256):
        batch = data.load_all(start, min(start + 256, len(data)))  # the usable images of the chunk
        captions = [data.captions[i] for i in range(start, min(start + 256, len(data))) if i not in data.skipped]
        if len(batch):
            texts.append(clip_text(text_tower, tokenizer, captions, device))
            images.append(vision(clip_preprocess(batch.to(device), vision.config.image_size))[1].float())
    if len(usable) <= args.holdout:
        raise EmuError(f"{args.data}: {len(usable)} usable pairs, not more than --holdout {args.holdout}")
    text, image_embeds = TextEmbedding.cat(texts).without_padding(), torch.cat(images)
    empty, L = clip_text(text_tower, tokenizer, [""], device), text.clip.shape[1]
    empty = TextEmbedding(clip=empty.clip[:, :L], clip_mask=empty.clip_mask[:, :L], t5=text.t5[:1],
                          t5_mask=text.t5_mask[:1], pooled=empty.pooled)
    save_checkpoint(cache, {"stamp": stamp, "text": vars(text), "images": image_embeds, "empty": vars(empty)})
    return text, image_embeds, empty


def main(args):
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    text, images, empty = embed_all(args, device)
    text, images, empty = text.to(device), images.to(device), empty.to(device)
    n_train = len(images) - args.holdout
    train_text, train_images, test_text, test_images = text[:n_train], images[:n_train], text[n_train:], images[n_train:]
    center = train_images.mean(0)
    measure = lambda predicted: {"cosine": cosine_similarity(predicted, test_images).mean().item(),
                                 "centred cosine": cosine_similarity(predicted, test_images, center).mean().item()}
    mean_image = cosine_similarity(center.expand_as(test_images), test_images).mean().item()
    print(f"{len(images)} pairs: {n_train} to train on, {args.holdout} held out; CLIP image embeddings of width "
          f"{images.shape[1]}; the mean training embedding scores {mean_image:.4f} on the held-out pairs")
    metrics_log = os.path.join(args.out, "metrics.jsonl")

    if args.kind == "linear":  # one closed-form solve
        prior = LinearPrior(text.pooled.shape[1], images.shape[1]).to(device).fit(train_text.pooled, train_images, args.ridge)
        scores = measure(prior(test_text))
        append_metrics(metrics_log, {"kind": "linear", "ridge": args.ridge, **scores})
        return finish(args, prior, {**scores, "cosine of the mean training embedding": mean_image})

    cfg = PRIOR_PRESETS[args.preset]
    cfg = type(cfg)(**{**vars(cfg), "image_dim": images.shape[1], "text_dim": text.pooled.shape[1],
                       "token_dim": text.clip.shape[2]})
    prior = DiffusionPrior(cfg).to(device)
    prior.norm.fit(train_images)  # the paper's element-wise normalisation, from the training set
    opt = torch.optim.AdamW(prior.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(args.seed)
    step = 0
    ckpt_path = resume_path(args.resume, args.out)
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        prior.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")

    def evaluate():
        prior.eval()
        uncond = TextEmbedding.cat([empty] * len(test_images))
        sample_gen = torch.Generator(device).manual_seed(args.seed + 1)  # the same samples at every check
        guided = measure(prior.generate(test_text, uncond, steps=args.sample_steps, cfg_scale=args.cfg, generator=sample_gen))
        unguided = measure(prior.generate(test_text, uncond, steps=args.sample_steps, cfg_scale=1.0, generator=sample_gen))
        prior.train()
        return {**guided, **{f"{k}, unguided": v for k, v in unguided.items()}}

    t0 = time.time()
    prior.train()
    while step < args.steps:
        idx = torch.randint(0, n_train, (args.bs,), generator=gen, device=device)
        loss = prior.training_loss(train_images[idx], train_text[idx], empty, gen, args.caption_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            scores = evaluate()
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}  held-out centred cosine {scores['centred cosine']:.4f} "
                  f"(guidance {args.cfg}), {scores['centred cosine, unguided']:.4f} (none)  "
                  f"{(time.time() - t0) / args.eval_every:.3f}s/step")
            append_metrics(metrics_log, {"step": step, "loss": loss.item(), **scores})
            t0 = time.time()
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(os.path.join(args.out, "ckpt.pt"), {"model": prior.state_dict(), "opt": opt.state_dict(),
                                                                "step": step, "gen": gen.get_state(), "rng": rng_state(),
                                                                "args": vars(args)})
    return finish(args, prior, {**evaluate(), "cosine of the mean training embedding": mean_image})


def finish(args, prior, scores):
    """Write OUT/prior.pt and OUT/results.md; print the scores."""
    save_checkpoint(os.path.join(args.out, "prior.pt"), {"config": prior_config(prior), "model": prior.state_dict(),
                                                         "data": os.path.abspath(args.data), "clip": os.path.abspath(args.clip)})
    lines = [f"# {args.kind} prior", "", "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in scores.items()]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    print(f"saved {os.path.join(args.out, 'prior.pt')}")
    return scores


if __name__ == "__main__":
    try:
        main(parse_args())
    except EmuError as e:
        raise SystemExit(f"error: {e}")
