"""The toy world: a seeded procedural image-caption generator that fits a laptop CPU.

Each scene is `count` objects of one `shape` and `color`, grouped at a `position`, on a
`background` colour. The caption says exactly that ("two red circles on the left on a teal
background"), in English or, for Kandinsky's multilingual tower, in Russian ("два красных круга
слева на бирюзовом фоне"). On top of the content, every image has hidden photographic qualities
named after the paper's curation guidelines (emu_paper.txt, section 3.3), each in [0, 1] with 1 the
best:

    composition  subject placed well and whole; low values push it off-centre, shrink it, cut it
    exposure     balanced light; low values under- or over-expose the whole frame
    contrast     vibrant colour and strong contrast; low values wash the image out to grey
    sharpness    crisp edges; low values blur the frame
    noise        clean pixels; low values add sensor noise
    clutter      clean background; low values scatter small distracting objects behind the subject

A "haystack" is what the web gives: mostly mediocre images with noisy alt-text captions, and a
few photogenic "needles" whose qualities are all high. The hidden qualities are written to each
image's metadata for analysis only: no model, filter or judge reads them.
"""
import itertools
import json
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from emu.datasets.buckets import RATIOS

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {  # object colours, RGB in [0, 1]
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.06),
    "yellow": (0.95, 0.86, 0.12),
    "green": (0.12, 0.70, 0.22),
    "blue": (0.12, 0.30, 0.92),
    "purple": (0.56, 0.16, 0.76),
}
BACKGROUNDS = {
    "white": (0.92, 0.92, 0.90),
    "black": (0.07, 0.07, 0.09),
    "gray": (0.50, 0.50, 0.50),
    "teal": (0.08, 0.45, 0.46),
    "pink": (0.95, 0.70, 0.76),
}
POSITIONS = {  # anchor of the subject group, as fractions of (x, y); a group too large to keep its margin
    "left": (0.25, 0.50),  # there moves inwards (render)
    "right": (0.75, 0.50),
    "top": (0.50, 0.25),
    "bottom": (0.50, 0.75),
    "center": (0.50, 0.50),
}
# Each object's 'radius', as a fraction of the frame's side, by the number of objects. At 32 px a single
# object is 13 px across, 3 to 4 cells of the 8x8 latent grid; two and three objects stand in a line along
# the free axis. Objects two thirds this size (the world's first sizes) are one or two latent cells: the
# toy U-Net then never learned their shape, and groups that filled more of the frame blurred the positions.
OBJECT_RADIUS = {1: 0.21, 2: 0.16, 3: 0.125}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}

# The same words in Russian, Kandinsky's own language. All four shapes are masculine nouns, so each
# colour needs two forms only. One object is named in the nominative singular, with no numeral
# ("красный круг", a red circle: Russian has no article); after два and три (2, 3) Russian puts the
# adjective in the genitive plural and the noun in the genitive singular ("два красных круга").
SHAPES_RU = {  # nominative singular, genitive singular, genitive plural (after "несколько", some)
    "circle": ("круг", "круга", "кругов"),
    "square": ("квадрат", "квадрата", "квадратов"),
    "triangle": ("треугольник", "треугольника", "треугольников"),
    "diamond": ("ромб", "ромба", "ромбов"),
}
COLORS_RU = {  # nominative singular masculine, genitive plural
    "red": ("красный", "красных"),
    "orange": ("оранжевый", "оранжевых"),
    "yellow": ("жёлтый", "жёлтых"),
    "green": ("зелёный", "зелёных"),
    "blue": ("синий", "синих"),
    "purple": ("фиолетовый", "фиолетовых"),
}
COUNT_WORDS_RU = {2: "два", 3: "три"}
POSITION_PHRASES_RU = {"left": "слева", "right": "справа", "top": "сверху", "bottom": "снизу",
                       "center": "в центре"}
BACKGROUND_PHRASES_RU = {"white": "на белом фоне", "black": "на чёрном фоне", "gray": "на сером фоне",
                         "teal": "на бирюзовом фоне", "pink": "на розовом фоне"}
LANGUAGES = ("en", "ru")
QUALITIES = ("composition", "exposure", "contrast", "sharpness", "noise", "clutter")
ATTRIBUTES = ("shape", "color", "count", "position", "background")


@dataclass
class Scene:
    shape: str
    color: str
    count: int
    position: str
    background: str
    qualities: dict = field(default_factory=dict)

    @property
    def photogenic_score(self):
        """Mean of the hidden qualities: the toy world's ground truth of photographic quality."""
        return float(np.mean([self.qualities[q] for q in QUALITIES]))


# -----------------------------------------------------------------------------
# captions

def caption(scene, language="en"):
    """The canonical, accurate caption of a scene (what a careful human would write), in English
    ("en") or Russian ("ru").

    >>> caption(Scene("circle", "red", 2, "left", "teal"), "ru")
    'два красных круга слева на бирюзовом фоне'
    """
    if language == "en":
        noun = scene.shape + ("s" if scene.count > 1 else "")
        return (f"{COUNT_WORDS[scene.count]} {scene.color} {noun} {POSITION_PHRASES[scene.position]}"
                f" on a {scene.background} background")
    if language == "ru":
        return (f"{russian_subject(scene.shape, scene.color, scene.count)} {POSITION_PHRASES_RU[scene.position]}"
                f" {BACKGROUND_PHRASES_RU[scene.background]}")
    raise ValueError(f"caption: language {language!r} is not one of {LANGUAGES}")


def russian_subject(shape, color, count, exact=True):
    """The objects in Russian: the nominative singular alone for one ("красный круг"); after два and три
    the adjective in the genitive plural and the noun in the genitive singular ("два красных круга"); a
    group not counted (`exact` False: несколько, some) takes the genitive plural of both."""
    if count == 1:
        return f"{COLORS_RU[color][0]} {SHAPES_RU[shape][0]}"
    if exact:
        return f"{COUNT_WORDS_RU[count]} {COLORS_RU[color][1]} {SHAPES_RU[shape][1]}"
    return f"несколько {COLORS_RU[color][1]} {SHAPES_RU[shape][2]}"


WEB_PREFIXES = ("", "", "", "photo of ", "stock image: ", "img ", "picture of ", "cheap ")


WEB_PREFIXES_RU = ("", "", "", "фото: ", "стоковое изображение: ", "img ", "картинка: ", "дёшево ")


def web_caption(scene, rng, language="en"):
    """A noisy alt-text caption, as scraped from the web, in English ("en") or Russian ("ru"): parts
    missing, sometimes a wrong colour, sometimes junk around it. Pretraining sees these; quality-tuning
    uses accurate captions, as the paper's curated set had handwritten ones. Both languages draw the
    same numbers from `rng`, so a scene's Russian caption is its English one's noise in other words."""
    color = scene.color
    if rng.random() < 0.15:  # a wrong colour word
        color = rng.choice([c for c in COLORS if c != scene.color])
    exact = rng.random() < 0.7  # else "some" (несколько) for a group
    position, background = rng.random() < 0.6, rng.random() < 0.6
    prefix = int(rng.integers(len(WEB_PREFIXES)))
    junk = f" {rng.integers(100, 9999)}" if rng.random() < 0.2 else ""
    if language == "en":
        noun = scene.shape + ("s" if scene.count > 1 else "")
        count = COUNT_WORDS[scene.count] if exact else ("some" if scene.count > 1 else "a")
        parts = [f"{count} {color} {noun}"]
        parts += [POSITION_PHRASES[scene.position]] if position else []
        parts += [f"on a {scene.background} background"] if background else []
        return WEB_PREFIXES[prefix] + " ".join(parts) + junk
    if language == "ru":
        parts = [russian_subject(scene.shape, color, scene.count, exact)]
        parts += [POSITION_PHRASES_RU[scene.position]] if position else []
        parts += [BACKGROUND_PHRASES_RU[scene.background]] if background else []
        return WEB_PREFIXES_RU[prefix] + " ".join(parts) + junk
    raise ValueError(f"web_caption: language {language!r} is not one of {LANGUAGES}")


def yo_as_ye(text):
    """Russian text with ё written as е, as most Russian print writes it: "жёлтый" and "желтый" are one word."""
    return text.replace("ё", "е")


# What parse_caption looks up in Russian: each word form -> (attribute, value), ё written as е. A colour
# in the nominative singular also says the count: one, where English says "a".
RUSSIAN_WORDS = {
    **{yo_as_ye(form): ("shape", shape) for shape, forms in SHAPES_RU.items() for form in forms},
    **{yo_as_ye(form): ("color", color) for color, forms in COLORS_RU.items() for form in forms},
    **{word: ("count", count) for count, word in COUNT_WORDS_RU.items()},
}
RUSSIAN_SINGULAR = {yo_as_ye(nominative) for nominative, _ in COLORS_RU.values()}


def parse_caption(text):
    """Read the attributes a caption states, in English or Russian; attributes it does not mention
    are None.

    >>> parse_caption("two red circles on the left on a teal background")["count"]
    2
    >>> parse_caption("красный круг в центре на сером фоне")["count"]
    1
    """
    words = yo_as_ye(text.lower()).replace(",", " ").split()
    found = dict.fromkeys(ATTRIBUTES)
    for i, w in enumerate(words):
        if w.rstrip("s") in SHAPES:
            found["shape"] = w.rstrip("s")
        elif w in COLORS and found["color"] is None:
            found["color"] = w
        elif w in BACKGROUNDS and i + 1 < len(words) and words[i + 1].startswith("background"):
            found["background"] = w
        elif w in ("a", "one", "an") and found["count"] is None and i + 2 < len(words) and words[i + 1] in COLORS:
            found["count"] = 1
        elif w == "two":
            found["count"] = 2
        elif w == "three":
            found["count"] = 3
        elif w in RUSSIAN_WORDS:  # Cyrillic: no English word reaches this branch
            attribute, value = RUSSIAN_WORDS[w]
            if attribute != "color" or found["color"] is None:  # the first colour named, as in English
                found[attribute] = value
            if w in RUSSIAN_SINGULAR and found["count"] is None:
                found["count"] = 1
    joined = " ".join(words)
    for attribute, phrases in (("position", POSITION_PHRASES), ("position", POSITION_PHRASES_RU),
                               ("background", BACKGROUND_PHRASES_RU)):
        for value, phrase in phrases.items():
            if yo_as_ye(phrase) in joined:
                found[attribute] = value
    return found


# -----------------------------------------------------------------------------
# scenes and rendering

def sample_scene(rng, photogenic):
    """Draw a scene. Needles have every quality in [0.85, 1]; haystack images draw each quality
    from a wide, mediocre-centred distribution, so a web image is rarely good at everything."""
    if photogenic:
        qualities = {q: float(rng.uniform(0.85, 1.0)) for q in QUALITIES}
    else:
        qualities = {q: float(rng.beta(3.0, 2.0)) for q in QUALITIES}
    return Scene(shape=str(rng.choice(SHAPES)), color=str(rng.choice(list(COLORS))),
                 count=int(rng.integers(1, 4)), position=str(rng.choice(list(POSITIONS))),
                 background=str(rng.choice(list(BACKGROUNDS))), qualities=qualities)


def _shape_mask(shape, xs, ys, cx, cy, r):
    """Boolean mask of one shape of 'radius' r centred at (cx, cy) on the grid (xs, ys)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.82 * r) & (np.abs(dy) <= 0.82 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    # triangle pointing up: inside the three half-planes of its edges
    top, base = cy - r, cy + 0.8 * r
    half_width = (ys - top) / (base - top) * r
    return (ys >= top) & (ys <= base) & (np.abs(dx) <= half_width)


def _group_offsets(count, position, r):
    """Where the `count` objects sit relative to the group anchor: in a line along the free axis (a
    column for left and right, a row for top and bottom), or a triangle in the center. The group is
    centred on its anchor and stays narrow across the axis its position is on."""
    gap = 2.3 * r  # centre to centre, so that neighbouring diamonds (1.1 r to their points) do not touch
    if count == 1:
        return [(0.0, 0.0)]
    if position == "center" and count == 3:
        h = gap * np.sqrt(3) / 4  # half the triangle's height
        return [(0.0, -h), (-gap / 2, h), (gap / 2, h)]
    along = [(k - (count - 1) / 2) * gap for k in range(count)]
    return [(0.0, a) for a in along] if position in ("left", "right") else [(a, 0.0) for a in along]


def _gaussian_blur(img, sigma):
    """Separable Gaussian blur of an (H, W, 3) float image with reflect padding."""
    if sigma < 0.05:
        return img
    radius = max(1, int(3 * sigma + 0.5))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(radius, radius) if a == axis else (0, 0) for a in range(3)]
        padded = np.pad(img, pad, mode="reflect")
        img = sum(k[i] * np.take(padded, np.arange(i, i + img.shape[axis]), axis=axis) for i in range(len(k)))
    return img


def render(scene, size, rng, supersample=4):
    """Draw a scene as an (H, W, 3) uint8 image: `size` is one side (a square) or (width, height). Shapes
    are antialiased by supersampling. Positions are fractions of the frame's width and height, and sizes
    fractions of its geometric mean side, so a scene keeps its layout at any aspect ratio and its circles
    stay round."""
    q = scene.qualities
    W, H = (size, size) if np.isscalar(size) else size
    Sw, Sh = W * supersample, H * supersample
    S = float(np.sqrt(Sw * Sh))  # the side of a square of the same area: what object sizes are fractions of
    ys, xs = np.mgrid[0:Sh, 0:Sw].astype(np.float32) + 0.5
    # background with a soft light from the top left
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    light = 1.0 + 0.10 * (1.0 - (xs / Sw + ys / Sh))
    img = np.clip(bg[None, None, :] * light[..., None], 0, 1)
    # clutter: small objects of random shapes and colours scattered behind the subject
    for _ in range(int(round((1.0 - q["clutter"]) * 8))):
        cx, cy = rng.uniform(0, 1, size=2) * (Sw, Sh)
        rr = S * rng.uniform(0.03, 0.05)
        mask = _shape_mask(str(rng.choice(SHAPES)), xs, ys, cx, cy, rr)
        img[mask] = rng.uniform(0.1, 0.95, size=3)
    # the subject: composition moves the group towards the frame edge and shrinks it
    bad = 1.0 - q["composition"]
    r = S * OBJECT_RADIUS[scene.count] * (1.0 - 0.14 * bad)
    offsets = np.array(_group_offsets(scene.count, scene.position, r))
    # the anchor, moved inwards where the group would come closer than 1/16 of the frame to its edge
    # (1.1 r reaches a diamond's points)
    half = np.abs(offsets).max(axis=0) + 1.1 * r
    room = S / 16 + half
    ax, ay = POSITIONS[scene.position]
    anchor = np.clip(np.array([ax * Sw, ay * Sh]), room, np.maximum(room, (Sw, Sh) - room))
    out = np.array([ax - 0.5, ay - 0.5])
    out = out / np.linalg.norm(out) if np.linalg.norm(out) > 0 else rng.normal(size=2) / np.sqrt(2)
    cx, cy = anchor + (out * 0.1 * bad + rng.normal(0, 0.008, size=2)) * (Sw, Sh)
    color = np.array(COLORS[scene.color], dtype=np.float32)
    for ox, oy in offsets:
        mask = _shape_mask(scene.shape, xs, ys, cx + ox, cy + oy, r)
        img[mask] = color
    img = img.reshape(H, supersample, W, supersample, 3).mean(axis=(1, 3))  # antialias
    # photographic degradations, in the order a camera and its processing would apply them
    img = _gaussian_blur(img, 1.1 * (1.0 - q["sharpness"]))
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * (0.3 + 0.7 * q["contrast"])  # saturation
    img = img.mean() + (img - img.mean()) * (0.5 + 0.5 * q["contrast"])  # contrast
    stops = (1.0 - q["exposure"]) * 1.3 * (1 if rng.random() < 0.5 else -1)
    img = img * 2.0 ** stops if stops < 0 else 1.0 - (1.0 - img) * 2.0 ** -stops
    img = img + rng.normal(0, 0.07 * (1.0 - q["noise"]), size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# -----------------------------------------------------------------------------
# data sets

def make_example(index, seed, size, photogenic, aspect="1:1", language="en"):
    """One image with its web caption and metadata; fully determined by (seed, index, aspect, language).
    `aspect` is one of emu.datasets.buckets.RATIOS: the image has about size x size pixels in that ratio.
    `language` is the web caption's ("en" or "ru"); the image and the metadata do not depend on it."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, photogenic)
    w, h = next((w, h) for name, w, h in RATIOS if name == aspect)
    image = render(scene, (round(size * np.sqrt(w / h)), round(size * np.sqrt(h / w))), rng)
    likes = int(np.exp(2.0 + 3.0 * scene.photogenic_score + rng.normal(0, 0.5)))
    meta = {"attributes": {a: getattr(scene, a) for a in ATTRIBUTES}, "qualities": scene.qualities,
            "photogenic_score": scene.photogenic_score, "needle": bool(photogenic), "likes": likes,
            "true_caption": caption(scene), **({"aspect": aspect} if aspect != "1:1" else {}),
            **({"language": language} if language != "en" else {})}
    return image, web_caption(scene, rng, language), meta


def make_haystack(n, seed=0, size=32, needle_fraction=0.05, aspect_share=0.0, russian_share=0.0):
    """`n` examples, a `needle_fraction` of them photogenic, the rest mediocre, in shuffled order. An
    `aspect_share` of them, drawn at random, are at one of the four other ratios of emu.datasets.buckets.RATIOS
    (9:16, 2:3, 3:2, 16:9), the rest square. The choice has its own generator, so the scenes stay the same
    and the square images are the ones aspect_share=0 gives; a non-square one draws more pixel noise, so
    its web caption's noise differs. A `russian_share` of the web captions, drawn at random with a
    generator of its own, are in Russian (a multilingual web, for Kandinsky's XLM-R); the images are the same."""
    order = np.random.default_rng(seed).permutation(n)
    n_needles = int(round(n * needle_fraction))
    others = [name for name, w, h in RATIOS if w != h]
    shapes = np.random.default_rng([seed, 104723])
    aspects = ["1:1" if shapes.random() >= aspect_share else others[shapes.integers(len(others))] for _ in range(n)]
    languages = np.random.default_rng([seed, 130363]).random(n) < russian_share
    return [make_example(i, seed, size, photogenic=bool(order[i] < n_needles), aspect=aspects[i],
                         language="ru" if languages[i] else "en") for i in range(n)]


def write_folder(root, examples):
    """Write examples in the image-folder layout emu reads: key.png, key.txt, key.json."""
    os.makedirs(root, exist_ok=True)
    for i, (image, text, meta) in enumerate(examples):
        key = os.path.join(root, f"{i:06d}")
        Image.fromarray(image).save(key + ".png")
        with open(key + ".txt", "w") as f:
            f.write(text + "\n")
        with open(key + ".json", "w") as f:
            json.dump(meta, f)


def random_prompts(n, seed):
    """`n` canonical captions of random scenes, as (prompt, category) pairs for evaluation."""
    rng = np.random.default_rng([seed, 7919])
    prompts = []
    for _ in range(n):
        scene = sample_scene(rng, photogenic=False)
        category = "Counting" if scene.count > 1 else "Basic"
        prompts.append((caption(scene), category))
    return prompts


def every_scene():
    """Every scene the toy world can draw, once each (4 shapes x 6 colours x 3 counts x 5 positions x
    5 backgrounds = 1800), photogenic; in a fixed order."""
    values = itertools.product(SHAPES, COLORS, (1, 2, 3), POSITIONS, BACKGROUNDS)
    return [Scene(*v, qualities=dict.fromkeys(QUALITIES, 1.0)) for v in values]


def scene_from_attributes(attributes, qualities=None):
    """A Scene from a parsed attribute dict (missing qualities default to photogenic 1.0)."""
    qualities = qualities or dict.fromkeys(QUALITIES, 1.0)
    return Scene(**{a: attributes[a] for a in ATTRIBUTES}, qualities=qualities)
