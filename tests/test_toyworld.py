import json

import numpy as np

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
