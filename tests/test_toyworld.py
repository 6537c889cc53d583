import hashlib
import itertools
import json
import os

import numpy as np
import pytest

from emu.datasets import toyworld


def test_examples_are_deterministic_per_seed_and_index():
    a = toyworld.make_example(5, seed=3, size=32, photogenic=False)
    b = toyworld.make_example(5, seed=3, size=32, photogenic=False)
    c = toyworld.make_example(6, seed=3, size=32, photogenic=False)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8


def test_canonical_captions_parse_back_to_their_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = toyworld.sample_scene(rng, photogenic=False)
        parsed = toyworld.parse_caption(toyworld.caption(scene))
        assert parsed == {a: getattr(scene, a) for a in toyworld.ATTRIBUTES}


def test_english_captions_and_their_parses_are_pinned_for_every_scene():
    """The whole pipeline's data is made from the English captions, so digests pin them: the caption of
    every scene, and what parse_caption reads from those and from 2000 web captions."""
    english = [toyworld.caption(scene) for scene in toyworld.every_scene()]
    assert english[0] == "a red circle on the left on a white background"
    assert toyworld.caption(toyworld.Scene("diamond", "blue", 3, "center", "teal")) == \
        "three blue diamonds in the center on a teal background"
    digest = hashlib.sha256("\n".join(english).encode()).hexdigest()
    assert digest == "9539b610789a8a9acd2f4226c06bf21a942e35baea01403a6c7e7bc653f7546e"
    rng = np.random.default_rng(0)
    web = [toyworld.web_caption(toyworld.sample_scene(rng, False), rng) for _ in range(2000)]
    parsed = json.dumps([toyworld.parse_caption(text) for text in english + web])
    assert hashlib.sha256(parsed.encode()).hexdigest() == "0ce7436d6b5e3314a7861fe02a1f7a8b2db0bd2c7863429792359a099c567ebc"


@pytest.mark.parametrize("scene, text", [
    (("circle", "red", 1, "left", "teal"), "красный круг слева на бирюзовом фоне"),
    (("circle", "red", 2, "left", "teal"), "два красных круга слева на бирюзовом фоне"),
    (("diamond", "blue", 3, "center", "white"), "три синих ромба в центре на белом фоне"),
    (("triangle", "yellow", 2, "top", "black"), "два жёлтых треугольника сверху на чёрном фоне"),
    (("square", "green", 1, "bottom", "pink"), "зелёный квадрат снизу на розовом фоне"),
    (("square", "purple", 3, "right", "gray"), "три фиолетовых квадрата справа на сером фоне"),
    (("triangle", "orange", 1, "center", "gray"), "оранжевый треугольник в центре на сером фоне"),
])
def test_russian_captions_agree_in_case_and_number(scene, text):
    """One object: nominative singular, no numeral; two or three: genitive plural adjective, genitive
    singular noun."""
    assert toyworld.caption(toyworld.Scene(*scene), "ru") == text


def test_parse_caption_reads_every_scene_in_both_languages():
    for scene in toyworld.every_scene():
        attributes = {a: getattr(scene, a) for a in toyworld.ATTRIBUTES}
        russian = toyworld.caption(scene, "ru")
        assert toyworld.parse_caption(toyworld.caption(scene, "en")) == attributes
        assert toyworld.parse_caption(russian) == attributes
        assert toyworld.parse_caption(russian.replace("ё", "е").capitalize()) == attributes  # as Russian is often typed


def test_every_scene_is_drawn_once_and_an_unknown_language_is_an_error():
    scenes = toyworld.every_scene()
    assert len(scenes) == 1800 == len({tuple(getattr(s, a) for a in toyworld.ATTRIBUTES) for s in scenes})
    assert len({toyworld.caption(s, "ru") for s in scenes}) == 1800
    with pytest.raises(ValueError, match="language"):
        toyworld.caption(scenes[0], "de")


def test_web_captions_are_noisy_but_never_empty():
    haystack = toyworld.make_haystack(300, seed=1)
    web = [text for _, text, _ in haystack]
    true = [m["true_caption"] for _, _, m in haystack]
    assert all(w.strip() for w in web)
    assert 0.5 < np.mean([w != t for w, t in zip(web, true)]) < 1.0


def test_haystack_has_the_requested_needles_and_they_are_photogenic():
    haystack = toyworld.make_haystack(400, seed=2, needle_fraction=0.05)
    needles = [m for _, _, m in haystack if m["needle"]]
    rest = [m for _, _, m in haystack if not m["needle"]]
    assert len(needles) == 20
    assert min(m["photogenic_score"] for m in needles) > np.percentile([m["photogenic_score"] for m in rest], 95)


def test_degradations_move_pixels_the_way_the_guidelines_describe():
    rng = np.random.default_rng(0)
    scene = toyworld.sample_scene(rng, photogenic=True)
    clean = toyworld.render(scene, 32, np.random.default_rng(1)).astype(float)
    noisy = toyworld.render(toyworld.Scene(**{**scene.__dict__, "qualities": {**scene.qualities, "noise": 0.0}}),
                            32, np.random.default_rng(1)).astype(float)
    flat = toyworld.render(toyworld.Scene(**{**scene.__dict__, "qualities": {**scene.qualities, "contrast": 0.0}}),
                           32, np.random.default_rng(1)).astype(float)
    assert np.abs(np.diff(noisy, axis=1)).mean() > np.abs(np.diff(clean, axis=1)).mean()
    assert flat.std() < clean.std()


def test_write_folder_layout(tmp_path):
    toyworld.write_folder(tmp_path, toyworld.make_haystack(3, seed=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"00000{i}.{ext}" for i in range(3) for ext in ("json", "png", "txt")]
    meta = json.loads((tmp_path / "000000.json").read_text())
    assert set(meta) >= {"attributes", "qualities", "needle", "likes", "true_caption"}


def test_the_russian_toy_prompts_are_the_english_ones_translated():
    from emu.datasets.folders import read_prompts
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "prompts")
    english, russian = read_prompts(os.path.join(root, "toy.tsv")), read_prompts(os.path.join(root, "toy_ru.tsv"))
    assert len(english) == len(russian) == 100
    for (en, category), (ru, category_ru) in zip(english, russian):
        assert category == category_ru and toyworld.parse_caption(ru) == toyworld.parse_caption(en)
        assert ru == toyworld.caption(toyworld.Scene(**toyworld.parse_caption(en)), "ru")


def test_a_scene_keeps_its_layout_and_round_shapes_at_other_aspect_ratios():
    """render at (width, height): positions are fractions of the frame, sizes of its geometric mean side,
    so "on the left" stays at 25% of the width and a circle stays round; a square size is the old render."""
    perfect = dict.fromkeys(toyworld.QUALITIES, 1.0)
    for position, (w, h), axis, expected in [("left", (43, 24), 0, 0.25), ("top", (24, 43), 1, 0.25),
                                             ("right", (39, 26), 0, 0.75), ("bottom", (26, 39), 1, 0.75)]:
        scene = toyworld.Scene("circle", "red", 1, position, "white", qualities=perfect)
        image = toyworld.render(scene, (w, h), np.random.default_rng(0)).astype(int)
        assert image.shape == (h, w, 3)
        red = (image[..., 0] > 150) & (image[..., 1] < 100)
        ys, xs = np.nonzero(red)
        centre = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
        assert abs(centre[axis] - expected) < 0.04 and abs(centre[1 - axis] - 0.5) < 0.06, (position, centre)
        assert abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 1  # as wide as it is high
    scene = toyworld.sample_scene(np.random.default_rng(3), photogenic=False)
    assert np.array_equal(toyworld.render(scene, 32, np.random.default_rng(1)),
                          toyworld.render(scene, (32, 32), np.random.default_rng(1)))


def test_a_well_composed_group_is_whole_large_and_on_its_side_of_the_frame():
    """Every scene with perfect qualities, at 32 px: the group keeps 1/16 of the frame (2 px) from every edge,
    a single object is at least 10 px across (a square, the narrowest, 11), and the group's centre is on its position's side, 15% of the
    frame or more from the centre (the anchor moves inwards only as far as the margin needs)."""
    perfect = dict.fromkeys(toyworld.QUALITIES, 1.0)
    for shape, count, position in itertools.product(toyworld.SHAPES, (1, 2, 3), toyworld.POSITIONS):
        scene = toyworld.Scene(shape, "red", count, position, "white", qualities=perfect)
        image = toyworld.render(scene, 32, np.random.default_rng(0)).astype(int)
        ys, xs = np.nonzero((image[..., 0] > 120) & (image[..., 1] < 150))
        margin = min(xs.min(), ys.min(), 31 - xs.max(), 31 - ys.max())
        assert margin >= 2, (shape, count, position, margin)
        if count == 1:
            assert min(xs.max() - xs.min(), ys.max() - ys.min()) + 1 >= 10, (shape, position)
        centre = np.array([xs.mean(), ys.mean()]) + 0.5 - 16
        ax, ay = toyworld.POSITIONS[position]
        side = np.array([ax - 0.5, ay - 0.5])
        if position == "center":
            assert np.abs(centre).max() < 2.5, (shape, count, centre)
        else:
            assert centre @ side / np.abs(side).sum() > 0.15 * 32, (shape, count, position, centre)


def test_a_share_of_the_haystack_at_other_ratios_keeps_its_scenes():
    """make_haystack(aspect_share=...): the same scenes, some drawn at the other four ratios; the square ones unchanged."""
    square = toyworld.make_haystack(60, seed=2)
    mixed = toyworld.make_haystack(60, seed=2, aspect_share=0.5)
    aspects = [m.get("aspect", "1:1") for _, _, m in mixed]
    assert 20 <= sum(a != "1:1" for a in aspects) <= 40 and set(aspects) == {"1:1", "9:16", "2:3", "3:2", "16:9"}
    sizes = {"9:16": (24, 43), "2:3": (26, 39), "3:2": (39, 26), "16:9": (43, 24), "1:1": (32, 32)}
    for (a_image, a_text, a_meta), (b_image, b_text, b_meta), aspect in zip(square, mixed, aspects):
        assert b_image.shape[1::-1] == sizes[aspect]  # (width, height), about 32 x 32 pixels
        assert a_meta["attributes"] == b_meta["attributes"] and a_meta["true_caption"] == b_meta["true_caption"]
        if aspect == "1:1":  # the same draws: the same picture and web caption (a larger image draws more pixel noise)
            assert np.array_equal(a_image, b_image) and a_text == b_text and a_meta == b_meta


def test_a_russian_web_caption_says_what_the_english_one_says_with_the_same_noise():
    """web_caption(scene, rng, "ru") draws the same numbers as the English one: the same wrong colour, the
    same parts left out, the same junk. So both parse to the same attributes, the count included: where
    the English says "some", the Russian says "несколько", and neither states a count."""
    for index in range(300):
        scene = toyworld.sample_scene(np.random.default_rng([5, index]), photogenic=False)
        en = toyworld.web_caption(scene, np.random.default_rng([6, index]), "en")
        ru = toyworld.web_caption(scene, np.random.default_rng([6, index]), "ru")
        assert toyworld.parse_caption(ru) == toyworld.parse_caption(en), (en, ru)
        assert ("несколько" in ru) == (" some " in f" {en} "), (en, ru)
        assert not any("a" <= ch <= "z" for ch in ru.replace("img", "")), ru  # Cyrillic, but for the "img " prefix
    with pytest.raises(ValueError, match="web_caption: language 'de' is not one of"):
        toyworld.web_caption(scene, np.random.default_rng(0), "de")


def test_a_share_of_the_haystack_captioned_in_russian_keeps_its_images():
    english = toyworld.make_haystack(80, seed=3)
    mixed = toyworld.make_haystack(80, seed=3, russian_share=0.5)
    russian = [m.get("language") == "ru" for _, _, m in mixed]
    assert 25 <= sum(russian) <= 55
    for (a_image, a_text, a_meta), (b_image, b_text, b_meta), ru in zip(english, mixed, russian):
        assert np.array_equal(a_image, b_image)
        assert {k: v for k, v in b_meta.items() if k != "language"} == a_meta
        assert (b_text == a_text) != ru
        assert toyworld.parse_caption(b_text) == toyworld.parse_caption(a_text)
