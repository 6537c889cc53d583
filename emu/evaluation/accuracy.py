"""Prompt accuracy in the toy world, in the manner of GenEval (Ghosh et al., 2023): does an image show
what its prompt states?

For each image and its prompt, the attribute classifier of emu/evaluation/faithfulness.py reads the
image's shape, colour, count, position and background; an attribute the prompt states is right when
the classifier's most likely class is the stated one. The accuracy of each attribute is the share of
images it is right in (over the prompts that state it), and "all" is the share of images with every
stated attribute right. Brackets are percentile bootstrap intervals over prompts.

The ceiling is the same measure on real toy images of the same prompts, rendered by the toy world
(reference_images): what a model that draws every prompt perfectly would score with this classifier.
"""
import numpy as np
import torch

from emu.datasets import toyworld
from emu.datasets.folders import from_uint8
from emu.evaluation.faithfulness import CLASSES
from emu.text.clip import clip_clean, clip_preprocess, load_clip_text, load_clip_vision
from emu.text.hf import tokenize
from emu.text.pretraining import clip_text_embeddings
from emu.text.xlmr import load_xlmr

COLUMNS = (*toyworld.ATTRIBUTES, "all")


def prompt_hits(classifier, images, prompts):
    """Which stated attributes each image shows.

    :param images: (N, H, W, 3) uint8; prompts: N captions.
    :return: {attribute or "all": (N,) float array}, 1.0 right, 0.0 wrong, NaN where the prompt
             does not state the attribute ("all": NaN where it states none).
    """
    if len(images) != len(prompts):
        raise ValueError(f"prompt_hits got {len(images)} images for {len(prompts)} prompts")
    probs = classifier.probabilities(images)
    hits = {a: np.full(len(prompts), np.nan) for a in COLUMNS}
    for i, prompt in enumerate(prompts):
        stated = {a: v for a, v in toyworld.parse_caption(prompt).items() if v is not None}
        for a, v in stated.items():
            hits[a][i] = float(probs[a][i].argmax() == CLASSES[a].index(v))
        if stated:
            hits["all"][i] = float(all(hits[a][i] == 1.0 for a in stated))
    return hits


def accuracy_record(classifier, images, prompts):
    """{attribute or "all": share of the images that show it, or None where no prompt states it}: the
    plain numbers, for a training log (pretrain.py's sample grids, qtune.py's checks)."""
    hits = prompt_hits(classifier, images, prompts)
    return {c: (None if np.isnan(h).all() else round(float(np.nanmean(h)), 4)) for c, h in hits.items()}


def accuracy_table(hits, n_boot=2000, seed=0, level=0.95):
    """{column: {"accuracy": %, "ci": (lo, hi) %, "n": prompts that state it}} from prompt_hits."""
    rng = np.random.default_rng(seed)
    tail = 100.0 * (1.0 - level) / 2
    table = {}
    for column in COLUMNS:
        x = hits[column][~np.isnan(hits[column])]
        if len(x) == 0:
            table[column] = {"accuracy": None, "ci": None, "n": 0}
            continue
        means = 100.0 * x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
        table[column] = {"accuracy": 100.0 * float(x.mean()), "n": int(len(x)),
                         "ci": (float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail)))}
    return table


def reference_images(prompts, seed=0, size=32):
    """(N, size, size, 3) uint8 toy images that show each prompt exactly, photogenic; unstated attributes
    are drawn at random (seeded)."""
    rng = np.random.default_rng([seed, 104729])
    images = []
    for prompt in prompts:
        scene = toyworld.sample_scene(rng, photogenic=True)
        for a, v in toyworld.parse_caption(prompt).items():
            if v is not None:
                setattr(scene, a, v)
        images.append(toyworld.render(scene, size, rng))
    return np.stack(images)


def accuracy_markdown(rows):
    """A Markdown table: one row per {name: accuracy_table(...)}, one column per attribute."""
    lines = ["| images | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, table in rows.items():
        cells = ["-" if t["accuracy"] is None else f"{t['accuracy']:.1f}% [{t['ci'][0]:.1f}, {t['ci'][1]:.1f}]"
                 for t in (table[c] for c in COLUMNS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The toy CLIP's zero-shot accuracy


def every_caption(language="en"):
    """Every scene the toy world can draw (toyworld.every_scene), as (accurate caption in `language`,
    attributes): 1800 of them, the same scenes in the same order in every language."""
    return [(toyworld.caption(scene, language), {a: getattr(scene, a) for a in toyworld.ATTRIBUTES})
            for scene in toyworld.every_scene()]


@torch.no_grad()
def clip_zero_shot(clip_dir, images, attributes, temperature=0.01):
    """CLIP's zero-shot accuracy on each toy attribute, as CLIP is evaluated on ImageNet: no training on
    the labels, only captions. Each image is compared with every toy caption (every_caption); a softmax
    over the cosine similarities (at CLIP's trained temperature, 1/100) gives each caption's probability,
    summing them over the captions that share an attribute value gives that value's, and the most
    probable value is CLIP's answer.

    :param images: (N, H, W, 3) uint8; attributes: N dicts of the images' true attributes.
    :return: {attribute: accuracy in [0, 1]}.
    """
    text, tokenizer = load_clip_text(clip_dir, dtype=torch.float32)
    vision = load_clip_vision(clip_dir, dtype=torch.float32)
    captions = every_caption()
    ids, _ = tokenize(tokenizer, [c for c, _ in captions], clean=clip_clean)
    text_embeds = torch.nn.functional.normalize(text(ids)[1], dim=-1)
    pixels = clip_preprocess(from_uint8(images), vision.config.image_size)
    image_embeds = torch.nn.functional.normalize(vision(pixels)[1], dim=-1)
    probs = (image_embeds @ text_embeds.T / temperature).softmax(dim=-1)  # (N, captions)
    accuracy = {}
    for attribute, values in CLASSES.items():
        value_of = torch.tensor([values.index(a[attribute]) for _, a in captions])
        per_value = torch.zeros(len(images), len(values)).index_add_(1, value_of, probs)  # (N, values)
        truth = torch.tensor([values.index(a[attribute]) for a in attributes])
        accuracy[attribute] = float((per_value.argmax(dim=1) == truth).float().mean())
    return accuracy


# ----------------------------------------------------------------------------------------------------
# The toy XLM-R's distillation into CLIP's text space


@torch.no_grad()
def mclip_retrieval(xlmr_dir, clip_dir, queries=None, languages=toyworld.LANGUAGES):
    """How closely a multilingual tower distilled as M-CLIP was lands where its CLIP teacher puts the
    English. Each query scene's caption, in each language, is embedded by the tower (its projected
    vector) and compared by cosine with the CLIP text embedding of every scene's English caption
    (every_caption); the nearest of the 1800 is the tower's answer. The scene is right when the answer
    is the query's own English caption (chance: 1/1800), an attribute when the answer's scene has the
    query's value (chance: about one over the attribute's number of values).

    :param queries: indices into every_caption() of the scenes to ask about, default all of them (a
        tower distilled on some scenes is asked about the others to see whether it composes).
    :return: {language: {"scene" or attribute: share of the queries answered right, in [0, 1]}}.
    """
    text, clip_tokenizer = load_clip_text(clip_dir, dtype=torch.float32)
    xlmr, xlmr_tokenizer = load_xlmr(xlmr_dir, dtype=torch.float32)
    english = every_caption()
    queries = torch.arange(len(english)) if queries is None else torch.as_tensor(queries)
    teacher = torch.nn.functional.normalize(clip_text_embeddings(text, clip_tokenizer, [c for c, _ in english]), dim=-1)
    value_of = {a: torch.tensor([CLASSES[a].index(attrs[a]) for _, attrs in english]) for a in toyworld.ATTRIBUTES}
    rates = {}
    for language in languages:
        captions = every_caption(language)
        ids, mask = tokenize(xlmr_tokenizer, [captions[i][0] for i in queries], trim=True)
        student = torch.nn.functional.normalize(xlmr(ids, mask)[0], dim=-1)  # (Q, P)
        answer = (student @ teacher.T).argmax(dim=1)  # (Q,) index of the nearest English caption
        rates[language] = {"scene": float((answer == queries).float().mean())}
        for a, values in value_of.items():
            rates[language][a] = float((values[answer] == values[queries]).float().mean())
    return rates
