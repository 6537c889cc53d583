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

# The share of an inpainting decoder's training masks that are the whole image (pretrain.py --whole-masks):
# the only masks where the text alone says where things go. With one in eight (the share before) the toy
# editor's decoder placed 46% of its groups where the text says, with a half 99.5%, and inpainted better
# too; trained on whole images alone, the square one places 98% (README, "The demo's editor").
INPAINT_WHOLE = 1 / 2
INPAINT_WHOLE_BEFORE = 1 / 8  # what checkpoints from before --whole-masks were trained with


def random_masks(batch, height, width, generator=None, device="cpu", whole=INPAINT_WHOLE):
    """Training masks: for each image a random mix of rectangles and thick brush strokes, or
    (a `whole` share of the time, a half by default) the whole image, so the model also learns to
    draw from nothing, or a border to outpaint (one in seven of the rest). The proportions are ours;
    the paper gives none.

    :return: (B, 1, H, W) float, 1 in the hole.
    """
    masks = torch.zeros(batch, 1, height, width, device=device)
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)
    for i in range(batch):
        kind = rand(1).item()
        if kind < whole:  # everything: plain text to image
            masks[i] = 1
        elif kind < whole + (1 - whole) / 7:  # a border: outpainting
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


def outpaint_window(images, left, top, width, height):
    """Place a window of width x height pixels with its top-left corner at (left, top), in the images'
    own pixel coordinates: it may reach past their edges or lie partly off them. The images grow to a
    canvas that covers them and the window; the window is what a model draws, its part off the images
    the hole (Kandinsky's demo outpaints by sliding such a window along the picture).

    :param images: (B, 3, H, W) in [-1, 1].
    :return: (canvas (B, 3, H', W') with the images in place and grey (0) everywhere else,
              hole (B, 1, H', W'), 1 where the images are not,
              the window (x, y, width, height) in the canvas's coordinates).
    """
    H, W = images.shape[-2:]
    x0, y0 = min(0, left), min(0, top)  # the canvas's corners, in the images' coordinates
    x1, y1 = max(W, left + width), max(H, top + height)
    pad = (-x0, x1 - W, -y0, y1 - H)  # left, right, top, bottom
    canvas = F.pad(images, pad, value=0.0)
    hole = F.pad(torch.zeros_like(images[:, :1]), pad, value=1.0)
    return canvas, hole, (left - x0, top - y0, width, height)


def window_problem(image_width, image_height, left, top, width, height, multiple):
    """Why an outpaint window cannot be drawn on an image of that size, as what the window "must" or "does"
    ("must overlap the picture..."); None if it can."""
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        return f"must have sides that are positive multiples of {multiple} (it is {width}x{height})"
    if left >= image_width or top >= image_height or left + width <= 0 or top + height <= 0:
        return "must overlap the picture, or nothing guides what it draws"
    if 0 <= left and 0 <= top and left + width <= image_width and top + height <= image_height:
        return "lies inside the picture; outpainting draws past its edges"
    return None


def crop_window(images, window):
    """(B, C, H, W) -> (B, C, height, width): the window (x, y, width, height) of outpaint_window."""
    x, y, width, height = window
    return images[..., y:y + height, x:x + width]


def place_window(canvas, drawn, window):
    """The canvas (B, 3, H', W') with the window's pixels replaced by `drawn` (B, 3, height, width)."""
    x, y, width, height = window
    out = canvas.clone()
    out[..., y:y + height, x:x + width] = drawn
    return out


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
    """(1, 1, H, W) mask of a box given as fractions of the image, (left, top, right, bottom); `size` is
    one side (a square) or (height, width)."""
    height, width = (size, size) if isinstance(size, int) else size
    left, top, right, bottom = box
    if not 0 <= left < right <= 1 or not 0 <= top < bottom <= 1:
        raise ValueError(f"a box is left,top,right,bottom with 0 <= left < right <= 1 and 0 <= top < bottom <= 1, not {box}")
    mask = torch.zeros(1, 1, height, width)
    mask[..., round(top * height):max(round(bottom * height), round(top * height) + 1),
         round(left * width):max(round(right * width), round(left * width) + 1)] = 1
    return mask


def mask_from_image(gray, size):
    """A mask drawn as an image (a PIL image; white, or any pixel brighter than mid-grey, is the hole)
    -> (1, 1, H, W), resized with the nearest pixel so it stays binary; `size` is one side or (height, width)."""
    from PIL import Image  # only here: the rest of this module is tensors
    height, width = (size, size) if isinstance(size, int) else size
    small = np.asarray(gray.convert("L").resize((width, height), Image.NEAREST))
    return torch.from_numpy(small > 127).float().view(1, 1, height, width)
