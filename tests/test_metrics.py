"""How much a model's images of one prompt vary from seed to seed (emu.evaluation.metrics.seed_variety)."""
import numpy as np
import pytest

from emu.evaluation.metrics import seed_variety


def test_seed_variety_is_zero_for_one_image_per_prompt_and_measures_known_differences():
    black, grey, white = (np.full((8, 8, 3), v, dtype=np.uint8) for v in (0, 51, 255))
    same = np.stack([black, black, white, white])  # two prompts, n=2, each drawn identically
    assert seed_variety(same, 2) == {"seeds": 0.0, "prompts": 1.0}
    # one prompt's three images: black, grey (0.2 away), white (1 from black, 0.8 from grey)
    assert seed_variety(np.stack([black, grey, white]), 3) == pytest.approx({"seeds": (0.2 + 1.0 + 0.8) / 3, "prompts": None})


def test_seed_variety_pairs_images_of_the_same_prompt_only():
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 256, size=(5, 1, 16, 16, 3), dtype=np.uint8)
    noise = rng.integers(-3, 4, size=(5, 4, 16, 16, 3))
    images = np.clip(prompts.astype(int) + noise, 0, 255).astype(np.uint8).reshape(20, 16, 16, 3)
    variety = seed_variety(images, 4)
    assert variety["seeds"] < 0.02 < 0.2 < variety["prompts"]
    # the same images grouped wrongly (n=5 cuts across prompts) look far more varied
    assert seed_variety(images, 5)["seeds"] > 10 * variety["seeds"]


@pytest.mark.parametrize("count, n", [(6, 4), (4, 1)])
def test_seed_variety_refuses_images_that_do_not_group_by_n(count, n):
    with pytest.raises(ValueError, match="n >= 2 images of each prompt"):
        seed_variety(np.zeros((count, 4, 4, 3), dtype=np.uint8), n)
