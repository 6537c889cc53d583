"""Masks for inpainting and outpainting (emu/variants/inpaint.py)."""
import torch

from emu.variants.inpaint import (crop_window, hole_fraction, inpaint_condition, latent_mask, outpaint_window, paste_known,
                                  place_window, random_masks, segment_distance)


def test_training_masks_are_binary_seeded_and_varied():
    masks = random_masks(64, 32, 32, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks, random_masks(64, 32, 32, torch.Generator().manual_seed(0)))
    fractions = hole_fraction(masks)
    assert 20 <= (fractions == 1).sum() <= 44  # whole images, about half: plain text to image
    partial = fractions[(fractions > 0) & (fractions < 1)]
    assert len(partial) >= 20 and 0.05 < partial.median() < 0.7
    assert (fractions > 0).all()  # every image has something to paint


def test_the_share_of_whole_image_masks_is_set_by_whole():
    """A half by default; 1 gives only whole images, 0 none; the rest keep borders to holes at 1 : 6."""
    draw = lambda **k: hole_fraction(random_masks(4000, 16, 16, torch.Generator().manual_seed(1), **k))
    default = draw()
    assert torch.equal(default, draw(whole=1 / 2))
    assert abs((default == 1).float().mean().item() - 1 / 2) < 0.03
    assert abs((draw(whole=1 / 8) == 1).float().mean().item() - 1 / 8) < 0.02
    assert (draw(whole=1.0) == 1).all()
    none = draw(whole=0.0)
    assert (none < 1).all()  # no hole, stroke or border covers everything


def test_a_stroke_is_the_pixels_near_its_segment():
    ys, xs = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    d = segment_distance(ys, xs, 4, 1, 4, 7)  # a horizontal segment on row 4, columns 1 to 7
    assert d[4, 1:8].eq(0).all() and d[2, 4] == 2 and d[4, 0] == 1
    assert torch.isclose(d[0, 0], torch.tensor(17.0).sqrt())  # the nearest point is the end (4, 1)


def test_outpainting_extends_the_canvas_around_the_image():
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    canvas, mask, window = outpaint_window(images, left=-4, top=-2, width=16, height=10)  # 2 rows on top, 4 columns a side
    assert window == (0, 0, 16, 10) and canvas.shape == (2, 3, 10, 16) and mask.shape == (2, 1, 10, 16)
    assert torch.equal(canvas[:, :, 2:, 4:12], images) and mask[:, :, 2:, 4:12].eq(0).all()
    assert mask.sum().item() == 2 * (10 * 16 - 8 * 8) and canvas[mask.expand_as(canvas) == 1].eq(0).all()


def test_the_known_region_is_kept_exactly_and_the_hole_blanked_in_the_condition():
    images, generated = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:7] = 1
    out = paste_known(generated, images, mask)
    keep = mask.expand_as(images) == 0
    assert torch.equal(out[keep], images[keep]) and torch.equal(out[~keep], generated[~keep])
    cond = inpaint_condition(images, mask)  # pixels as "latents": blanked hole, then the mask
    assert cond.shape == (2, 4, 8, 8) and cond[:, :3][~keep].eq(0).all() and torch.equal(cond[:, 3:], mask)
    # at latent resolution, a latent pixel touching the hole is hole
    assert torch.equal(latent_mask(mask, 4)[0, 0], torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    assert latent_mask(mask[:, :, :4, :4] * 0, 4).sum() == 0


def test_an_outpaint_window_off_a_corner_grows_the_canvas_and_marks_only_the_new_pixels_as_hole():
    images = torch.rand(2, 3, 4, 6) * 2 - 1
    canvas, hole, window = outpaint_window(images, left=-2, top=2, width=4, height=4)
    assert canvas.shape == (2, 3, 6, 8) and hole.shape == (2, 1, 6, 8) and window == (0, 2, 4, 4)
    assert torch.equal(canvas[..., :4, 2:], images) and torch.equal(hole[..., :4, 2:], torch.zeros(2, 1, 4, 6))
    assert hole.sum() == 2 * (6 * 8 - 4 * 6) and (canvas * hole).abs().sum() == 0  # grey (0) wherever nothing was
    drawn = torch.full((2, 3, 4, 4), 0.5)
    placed = place_window(canvas, drawn, window)
    assert torch.equal(crop_window(placed, window), drawn) and torch.equal(placed[..., :2, :], canvas[..., :2, :])
    # --extend 1,2,3,4 (top, bottom, left, right): the window is the whole grown canvas, the image in its place
    wide, border, whole = outpaint_window(images, -3, -1, 13, 7)
    assert whole == (0, 0, 13, 7) and torch.equal(wide[..., 1:5, 3:9], images) and border[..., 1:5, 3:9].eq(0).all()
    assert border.sum() == 2 * (7 * 13 - 4 * 6)
