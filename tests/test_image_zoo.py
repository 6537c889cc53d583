"""Every kind of image file a web crawl meets: each is converted to the right RGB or refused with a reason."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from emu.datasets.folders import BadImage, load_image, open_rgb

RED, BLUE = (255, 0, 0), (0, 0, 255)


def rgb_of(path, size=8):
    """The loaded image as (size, size, 3) uint8."""
    x = load_image(str(path), size)
    return ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def test_cmyk_jpeg_grayscale_and_one_pixel_images_come_out_as_their_colours(tmp_path):
    Image.new("RGB", (20, 20), RED).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.new("L", (20, 20), 200).save(tmp_path / "gray.png")
    Image.new("RGB", (1, 1), BLUE).save(tmp_path / "one.png")
    cmyk = rgb_of(tmp_path / "cmyk.jpg").reshape(-1, 3).mean(0)
    assert cmyk[0] > 240 and cmyk[1] < 15 and cmyk[2] < 15
    assert (rgb_of(tmp_path / "gray.png") == 200).all()
    assert (rgb_of(tmp_path / "one.png") == np.array(BLUE, dtype=np.uint8)).all()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((10, 10), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")  # 32896 = 128 * 257
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert (rgb_of(tmp_path / "deep.png") == 128).all()


def test_transparency_is_laid_over_white(tmp_path):
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0] + list(RED) + [0] * (256 * 3 - 6))
    palette.paste(0, (0, 0, 10, 5))  # top half: index 0, the transparent one (black underneath)
    palette.save(tmp_path / "palette.png", transparency=0)
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    rgba.save(tmp_path / "rgba.png")
    image = np.asarray(open_rgb(str(tmp_path / "palette.png")))
    assert (image[:5] == 255).all() and (image[5:] == np.array(RED, dtype=np.uint8)).all()
    assert (np.asarray(open_rgb(str(tmp_path / "rgba.png"))) == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    stored.save(tmp_path / "sideways.jpg", exif=exif.tobytes(), quality=95)
    shown = np.asarray(open_rgb(str(tmp_path / "sideways.jpg")), dtype=int)
    assert shown.shape == (40, 20, 3)  # upright: taller than wide
    top, bottom = shown[:15].reshape(-1, 3).mean(0), shown[25:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), RED), Image.new("RGB", (10, 10), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    assert (rgb_of(tmp_path / "anim.gif") == np.array(RED, dtype=np.uint8)).all()


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_broken_files_are_refused_with_their_reason(tmp_path):
    good_png = png_bytes(Image.new("RGB", (64, 64), RED))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    cases = {"zero.png": (b"", "empty file"), "junk.png": (b"this is not an image" * 10, "unknown format"),
             "cut.png": (good_png[:len(good_png) // 2], "truncated or corrupt"),
             "cut.jpg": (buf.getvalue()[:len(buf.getvalue()) // 2], "truncated or corrupt")}
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImage) as err:
            load_image(str(tmp_path / name), 8)
        assert err.value.reason == reason, name
        assert str(err.value).startswith(f"{tmp_path / name}: not a readable image: {reason}")
        assert "\n" not in str(err.value)
    with pytest.raises(BadImage) as err:
        load_image(str(tmp_path / "absent.png"), 8)
    assert err.value.reason == "file not found"


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    # A real 64x64 PNG whose header is rewritten to claim 100000 x 100000 pixels (10 billion): a
    # decoder that trusted it would allocate 30 GB.
    data = bytearray(png_bytes(Image.new("RGB", (64, 64), RED)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", 100_000, 100_000)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with pytest.raises(BadImage, match=r"bomb\.png: too many pixels \(.*10000000000 pixels.*refused before decoding") as err:
        load_image(str(tmp_path / "bomb.png"), 8)
    assert err.value.reason == "too many pixels"
    # the limit is a parameter: an honest 64x64 image is refused under a 1000-pixel limit
    (tmp_path / "small.png").write_bytes(png_bytes(Image.new("RGB", (64, 64), RED)))
    with pytest.raises(BadImage, match=r"small\.png: too many pixels \(64x64 is over 1000; refused before decoding\)"):
        load_image(str(tmp_path / "small.png"), 8, max_pixels=1000)
    assert rgb_of(tmp_path / "small.png").shape == (8, 8, 3)
