"""Compute the text embeddings of a dataset's captions once, so training can run without the towers.

    python data/embed_captions.py                          # toy: runs/toy/haystack -> runs/text-cache
    python pretrain.py --text-cache runs/text-cache        # trains from the cache, towers not loaded
    python qtune.py --text-cache runs/text-cache
    python data/embed_captions.py --data /data/haystack /data/curated --clip /weights/clip-vit-large-patch14 \\
        --t5 /weights/t5-v1_1-xxl --dtype bfloat16 --device cuda --bs 256 --out /data/text-cache

It reads the captions training reads: every key.txt, the accurate captions quality-tuning trains on
(the metadata field --caption-field, where present), and optionally prompt files; the empty caption
is always added. Run it again after an interruption, or on more data: only the captions the cache
lacks are computed. A cache belongs to one pair of towers (three with --xlmr) and one dtype (emu/text/cache.py).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from emu import EmuError  # noqa: E402
from emu.datasets.folders import ImageCaptionFolder, read_prompts  # noqa: E402
from emu.text.encoder import TEXT_DTYPES  # noqa: E402
from emu.text.cache import TextEmbeddingCache, write_text_cache  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["runs/toy/haystack"], help="folders of key.png + key.txt (+ key.json)")
    p.add_argument("--caption-field", default="true_caption",
                   help="also embed this metadata field where key.json has it (qtune.py's curated captions; '' for none)")
    p.add_argument("--prompts", nargs="*", default=[], help="prompt files to embed too (one per line, or a .tsv)")
    p.add_argument("--clip", default="runs/towers/clip", help="CLIP text tower directory, Hugging Face layout")
    p.add_argument("--t5", default="runs/towers/t5", help="T5 encoder directory, Hugging Face layout")
    p.add_argument("--xlmr", default=None, help="Kandinsky 2.1's multilingual tower (XLM-R with M-CLIP's head), for a "
                                                "decoder trained with pretrain.py --arch kandinsky --xlmr: cached too")
    p.add_argument("--out", default="runs/text-cache", help="cache directory (created, or added to)")
    p.add_argument("--bs", type=int, default=64, help="captions per forward pass of the towers")
    p.add_argument("--shard-size", type=int, default=1024, help="captions per shard file (the unit of resuming)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TEXT_DTYPES),
                   help="dtype the towers run and are stored in: the training scripts' --text-dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p.parse_args(argv)


def read_captions(folders, caption_field, prompt_files):
    """Every caption training reads from `folders` (read as ImageCaptionFolder reads them), then the prompts."""
    captions = []
    for root in folders:
        # Only captions are read; images stay on disk. A bad caption is skipped, as training skips it.
        folder = ImageCaptionFolder(root, image_size=0, skip_bad=True)
        found = list(folder.captions)
        keys = [key for key, meta in zip(folder.keys, folder.meta) if caption_field and caption_field in meta]
        if keys:
            found += ImageCaptionFolder(root, image_size=0, keys=keys, caption_field=caption_field, skip_bad=True).captions
        captions += [caption for caption in found if caption is not None]
    for path in prompt_files:
        captions += [prompt for prompt, _ in read_prompts(path)]
    return captions


def main(args):
    captions = read_captions(args.data, args.caption_field, args.prompts)
    print(f"{len(set(captions))} distinct captions in {', '.join(args.data + args.prompts)}")
    computed = write_text_cache(args.out, captions, args.clip, args.t5, dtype=TEXT_DTYPES[args.dtype], device=args.device,
                                batch_size=args.bs, shard_size=args.shard_size, xlmr_dir=args.xlmr)
    cache = TextEmbeddingCache(args.out)
    print(f"computed {computed} embeddings; {args.out} holds {len(cache)} captions in {len(cache.shards)} shards "
          f"({cache.manifest['dtype']})")


if __name__ == "__main__":
    try:
        main(parse_args())
    except EmuError as e:
        raise SystemExit(f"error: {e}")
