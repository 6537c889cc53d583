"""Make the toy world on disk: the haystack, and tiny text towers in the Hugging Face layout.

    python data/make_toy.py                       # runs/toy/haystack + runs/towers/{clip,t5,xlmr}
    python data/make_toy.py --n 20000 --size 64   # a bigger toy world

The haystack is written as key.png + key.txt (the web caption) + key.json (hidden qualities and
the accurate caption), the layout every script reads. The towers' tokenizers are trained on the toy
captions, and the towers are pretrained briefly as the real ones were (CLIP contrastively on the
haystack's image-caption pairs, T5 by span corruption on its captions), then frozen. A third tower,
the toy XLM-R of Kandinsky 2.1, reads English and Russian: it learns both languages from the haystack's
web captions (and their Russian versions), then is distilled from the trained toy CLIP as M-CLIP was,
on every toy scene's caption in both languages. `--russian-share` writes a share of the haystack's own
captions in Russian, for Kandinsky's multilingual decoder. Their files have the same names and
keys as the public CLIP ViT-L/14, T5 v1.1 and M-CLIP (kandinsky-2-1's text_encoder/) checkpoints, so
the real ones load the same way.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from emu.datasets import toyworld  # noqa: E402
from emu.datasets.folders import from_uint8, square_tensor, to_uint8  # noqa: E402
from emu.evaluation.accuracy import clip_zero_shot, mclip_retrieval  # noqa: E402
from emu.evaluation.judges import appeal_score  # noqa: E402
from emu.text.encoder import make_toy_towers  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="haystack size")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--aspect-share", type=float, default=0.0,
                   help="share of the haystack drawn at 9:16, 2:3, 3:2 or 16:9 (about --size squared pixels) instead of "
                        "square, for pretrain.py --buckets")
    p.add_argument("--russian-share", type=float, default=0.0,
                   help="share of the web captions written in Russian (the same images), for Kandinsky's multilingual "
                        "decoder (pretrain.py --arch kandinsky --xlmr)")
    p.add_argument("--needles", type=float, default=0.05, help="fraction of photogenic needles in the haystack")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--out", default="runs/toy/haystack", help="haystack folder")
    p.add_argument("--towers", default="runs/towers", help="where to write the toy text towers; 'none': write the haystack "
                                                         "only (another haystack of the same world, read by the towers of "
                                                         "an earlier run)")
    p.add_argument("--tower-steps", type=int, default=200,
                   help="pretraining steps of each toy tower (CLIP contrastive on the haystack, T5 span corruption on its "
                        "captions, the XLM-R span corruption on them and their Russian versions, then its distillation "
                        "from CLIP four times as many, an eighth the size); 0 leaves "
                        "them random")
    p.add_argument("--no-xlmr", action="store_true",
                   help="make CLIP and T5 only, not the toy XLM-R (Kandinsky 2.1's multilingual tower, which toy.sh's "
                        "models do not read; about 45 s of the towers' time)")
    p.add_argument("--ratings", type=int, default=1000,
                   help="images of the haystack given a simulated human aesthetic rating (ratings.csv), for the curation funnel")
    return p.parse_args(argv)


def write_ratings(folder, images, n, seed):
    """ratings.csv for `n` of the images: a rating study like AVA's, where people score images from 1
    to 10; here each rating is a noisy view of the toy judges' appeal measurement."""
    rng = np.random.default_rng([seed, 7])
    rated = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    score = appeal_score(np.stack([images[i] for i in rated]))
    rating = np.clip(1 + 9 * (score + rng.normal(0, 0.05, size=len(rated))), 1, 10)
    with open(os.path.join(folder, "ratings.csv"), "w") as f:
        f.write("key,rating\n" + "".join(f"{i:06d},{r:.2f}\n" for i, r in zip(rated, rating)))
    return len(rated)


def square_views(images, size):
    """The images as they are, but those that are not square centre-cropped to size x size (as CLIP's own
    preprocessing crops them): the toy judges and the CLIP pretraining read squares."""
    return [im if im.shape[:2] == (size, size) else to_uint8(square_tensor(Image.fromarray(im), size)[None])[0]
            for im in images]


def main(args):
    examples = toyworld.make_haystack(args.n, seed=args.seed, size=args.size, needle_fraction=args.needles,
                                      aspect_share=args.aspect_share, russian_share=args.russian_share)
    toyworld.write_folder(args.out, examples)
    print(f"wrote {len(examples)} images ({sum(m['needle'] for _, _, m in examples)} needles) to {args.out}")
    square = square_views([image for image, _, _ in examples], args.size)  # what the judges and CLIP read
    if args.ratings:
        n = write_ratings(args.out, square, args.ratings, args.seed)
        print(f"wrote simulated aesthetic ratings of {n} images to {args.out}/ratings.csv")
    if args.towers == "none":
        return
    # CLIP learns from the images and their web captions, as the real one learned from alt-text; T5 reads
    # the accurate captions too, so that the towers know every phrase a toy prompt can use
    captions = [text for _, text, _ in examples] + [m["true_caption"] for _, _, m in examples]
    images = from_uint8(square)
    # the XLM-R reads a web of both languages (each image's web caption in Russian too, whatever the haystack's
    # --russian-share), then learns every scene's caption in English and Russian, as M-CLIP learned translated ones
    rng = np.random.default_rng([args.seed, 8831])
    russian = [toyworld.web_caption(toyworld.scene_from_attributes(m["attributes"]), rng, "ru") for _, _, m in examples]
    translated = [(toyworld.caption(s, "en"), toyworld.caption(s, "ru")) for s in toyworld.every_scene()]
    clip_dir, t5_dir, xlmr_dir = make_toy_towers(captions, args.towers, seed=args.seed, images=images,
                                                 steps=args.tower_steps, log=print, translated=translated,
                                                 multilingual=russian, xlmr=not args.no_xlmr)
    print(f"wrote toy text towers to {clip_dir}, {t5_dir}" + (f" and {xlmr_dir}" if xlmr_dir else ""))
    if args.tower_steps:  # on images CLIP never saw: a new world seed
        held_out = toyworld.make_haystack(min(500, args.n), seed=args.seed + 1, size=args.size, needle_fraction=args.needles)
        accuracy = clip_zero_shot(clip_dir, np.stack([image for image, _, _ in held_out]),
                                  [m["attributes"] for _, _, m in held_out])
        print(f"the toy CLIP's zero-shot accuracy on {len(held_out)} new images: "
              + ", ".join(f"{a} {100 * v:.0f}%" for a, v in accuracy.items()))
        for language, rates in (mclip_retrieval(xlmr_dir, clip_dir) if xlmr_dir else {}).items():
            print(f"the toy XLM-R's {language} captions of every scene land nearest the toy CLIP's English caption "
                  f"of the same scene {100 * rates['scene']:.1f}% of the time (chance 0.06%), of the same "
                  + ", ".join(f"{a} {100 * rates[a]:.0f}%" for a in toyworld.ATTRIBUTES))


if __name__ == "__main__":
    main(parse_args())
