"""Masks for Kandinsky's inpainting and outpainting (kandinsky_paper.txt, section 2 and Figure 1).

An inpainting model is the decoder U-Net with extra input channels (emu.models.unet.UNetConfig.cond_channels):
the latents of the image with the hole blanked out, and the mask itself, downsized to the latents
(emu/variants/kandinsky.py trains and samples it).
It is trained on random masks, so that at sampling time any region a person erases can be filled;
outpainting is the same with the mask on a border the image is extended by.

Masks here are float tensors, 1 where the model must paint (the hole) and 0 where the image is
known, (B, 1, H, W) at pixel resolution.
"""
import numpy as np
import torch
import torch.nn.functional as F


def random_masks(batch, height, width, generator=None, device="cpu"):
    """Training masks: for each image a random mix of rectangles and thick brush strokes, or
    (one time in eight) the whole image, so the model also learns to draw from nothing, or (one in
    eight) a border to outpaint. The proportions are ours; the paper gives none.

    :return: (B, 1, H, W) float, 1 in the hole.
    """
    masks = torch.zeros(batch, 1, height, width, device=device)
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)
    for i in range(batch):
        kind = rand(1).item()
        if kind < 1 / 8:  # everything: plain text to image
            masks[i] = 1
        elif kind < 2 / 8:  # a border: outpainting
            masks[i] = 1 - border_free(height, width, *(0.1 + 0.3 * rand(4)).tolist(), device=device)
        else:
            for _ in range(1 + int(3 * rand(1).item())):
                if rand(1).item() < 0.5:  # a rectangle of 10% to 50% of each side
                    h, w = (0.1 + 0.4 * rand(2)).tolist()
                    top, left = rand(1).item() * (1 - h), rand(1).item() * (1 - w)
                    masks[i, 0, int(top * height):int((top + h) * height) + 1, int(left * width):int((left + w) * width) + 1] = 1
                else:  # a brush stroke: a line between two random points, 5% to 15% of the image thick
                    y0, y1 = (rand(2) * height).tolist()
                    x0, x1 = (rand(2) * width).tolist()
                    radius = max(1.0, 0.05 * min(height, width) * (1 + 2 * rand(1).item()))
                    stroke = segment_distance(ys, xs, y0, x0, y1, x1) <= radius
                    masks[i, 0] = torch.maximum(masks[i, 0], stroke.float())
    return masks


def segment_distance(ys, xs, y0, x0, y1, x1):
    """Distance of every pixel (ys, xs grids) to the segment from (y0, x0) to (y1, x1)."""
    dy, dx = y1 - y0, x1 - x0
    length2 = max(dy * dy + dx * dx, 1e-9)
    s = (((ys - y0) * dy + (xs - x0) * dx) / length2).clamp(0, 1)
    return torch.hypot(ys - (y0 + s * dy), xs - (x0 + s * dx))


def border_free(height, width, top, bottom, left, right, device="cpu"):
    """(1, H, W) float: 1 inside, 0 on borders that take the given fractions of each side."""
    inside = torch.zeros(1, height, width, device=device)
    inside[:, int(top * height):height - int(bottom * height), int(left * width):width - int(right * width)] = 1
    return inside


def outpaint_canvas(images, top, bottom, left, right):
    """Extend images by borders of the given sizes in pixels, for outpainting.

    :param images: (B, 3, H, W) in [-1, 1].
    :return: (canvas (B, 3, H + top + bottom, W + left + right) with the images in place and grey
              (0) borders, mask (B, 1, ...) with 1 on the borders).
    """
    canvas = F.pad(images, (left, right, top, bottom), value=0.0)
    mask = F.pad(torch.zeros_like(images[:, :1]), (left, right, top, bottom), value=1.0)
    return canvas, mask


def latent_mask(mask, factor):
    """A pixel mask (B, 1, H, W) at latent resolution (B, 1, H/f, W/f): a latent pixel is in the hole
    if any pixel it covers is (max pooling), so nothing of the hole is treated as known."""
    return F.max_pool2d(mask, factor) if factor > 1 else mask


def inpaint_condition(latents, mask):
    """The inpainting U-Net's extra input channels, (B, C + 1, h, w): the latents with the hole set
    to 0, then the mask, both at latent resolution (mask (B, 1, h, w), from latent_mask).

    In training the latents are the whole image's (the batches hold latents, not images); at
    sampling time they are those of the image with the hole blanked first
    (emu.variants.kandinsky.decoder_generate), so nothing of what was erased reaches the model, not even
    through the latents beside the hole, whose encoder saw across its edge."""
    return torch.cat([latents * (1 - mask), mask], dim=1)


def paste_known(generated, images, mask):
    """The generated images in the hole and the original images everywhere else: what a person
    erased is filled; what they kept stays exactly as it was."""
    return mask * generated + (1 - mask) * images


def hole_fraction(mask):
    """(B,) the share of each mask that is hole."""
    return mask.flatten(1).mean(1)


def box_mask(size, box):
    """(1, 1, size, size) mask of a box given as fractions of the image, (left, top, right, bottom)."""
    left, top, right, bottom = box
    if not 0 <= left < right <= 1 or not 0 <= top < bottom <= 1:
        raise ValueError(f"a box is left,top,right,bottom with 0 <= left < right <= 1 and 0 <= top < bottom <= 1, not {box}")
    mask = torch.zeros(1, 1, size, size)
    mask[..., round(top * size):max(round(bottom * size), round(top * size) + 1),
         round(left * size):max(round(right * size), round(left * size) + 1)] = 1
    return mask


def mask_from_image(gray, size):
    """A mask drawn as an image (a PIL image; white, or any pixel brighter than mid-grey, is the hole)
    -> (1, 1, size, size), resized with the nearest pixel so it stays binary."""
    from PIL import Image  # only here: the rest of this module is tensors
    small = np.asarray(gray.convert("L").resize((size, size), Image.NEAREST))
    return torch.from_numpy(small > 127).float().view(1, 1, size, size)
