"""Real photographs for the experiments that need them (Table 1's autoencoders), each with its licence.

Nothing is downloaded when an experiment runs. Each source is a package installed beforehand, and
each photograph's licence is read from what that package states, then kept beside the image:

  skimage   the photographs in scikit-image's wheel (skimage/data), public domain or CC0 (the licences
            are scikit-image's, from skimage/data/_fetchers.py, written below):
                pip install --no-deps scikit-image==0.26.0      # the files are read, never imported
  mate      Debian's mate-backgrounds, its nature/ folder: twelve photographs, GPL-2+, each author named
            in /usr/share/doc/mate-backgrounds/copyright (Debian's machine-readable format);
  plasma    Debian's plasma-workspace-wallpapers: the eleven of its wallpapers that are photographs (the
            rest are drawings), LGPL-3 or CC-BY-SA-4.0, author and licence in each metadata.json.

    sudo apt-get install mate-backgrounds plasma-workspace-wallpapers
    # or, without root, unpacked under any folder given as --debian-root:
    apt-get download mate-backgrounds plasma-workspace-wallpapers
    for deb in *.deb; do dpkg-deb -x "$deb" debian-photos; done

A photograph's name is "source/file" (e.g. "mate/LadyBird.jpg"): unique across sources, and what
`--heldout` lists.
"""
import fnmatch
import importlib.util
import json
import os
import re
from dataclasses import dataclass

SOURCES = ("skimage", "mate", "plasma")

INSTALL = {
    "skimage": "pip install --no-deps scikit-image==0.26.0",
    "mate": "apt-get install mate-backgrounds, or unpack its .deb under --debian-root",
    "plasma": "apt-get install plasma-workspace-wallpapers, or unpack its .deb under --debian-root",
}

# scikit-image's bundled photographs (the rest of skimage/data are drawings, scans and test patterns)
SKIMAGE = {
    "astronaut.png": "public domain (NASA)", "rocket.jpg": "public domain (SpaceX)",
    "hubble_deep_field.jpg": "public domain (NASA)", "retina.jpg": "CC0", "ihc.png": "no known copyright restrictions",
    "camera.png": "CC0 (Lav Varshney)", "brick.png": "CC0 (CC0Textures)", "grass.png": "CC0 (CC0Textures)",
    "gravel.png": "CC0 (CC0Textures)", "chelsea.png": "CC0 (Stefan van der Walt)", "coffee.png": "CC0 (Rachel Michetti)",
}
MATE_FOLDER = "usr/share/backgrounds/mate"  # the package's files, relative to the root it is installed under
MATE_COPYRIGHT = "usr/share/doc/mate-backgrounds/copyright"
PLASMA_FOLDER = "usr/share/wallpapers"
# plasma-workspace-wallpapers' photographs, looked at one by one; its other wallpapers are drawn
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                 "OneStandsOut", "Path", "Shell", "summer_1am")

# Held out by default: eight photographs of every source and kind (an animal, an object, an insect, a sky,
# a texture, still life, a harbour at dusk, black-and-white architecture).
HELDOUT = ("skimage/chelsea.png", "skimage/coffee.png", "mate/LadyBird.jpg", "mate/Storm.jpg", "mate/Wood.jpg",
           "plasma/ColorfulCups", "plasma/EveningGlow", "plasma/Grey")


@dataclass(frozen=True)
class Photo:
    name: str     # "source/file"
    path: str     # the image file
    licence: str  # as its package states it, with the author where it names one


def not_installed(source, path):
    return SystemExit(f"{path}: not found; the {source} photographs need `{INSTALL[source]}`")


def skimage_photos():
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SystemExit(f"skimage: not installed; the skimage photographs need `{INSTALL['skimage']}`")
    folder = os.path.join(os.path.dirname(spec.origin), "data")
    photos = [Photo(f"skimage/{name}", os.path.join(folder, name), licence) for name, licence in SKIMAGE.items()]
    for photo in photos:
        if not os.path.isfile(photo.path):
            raise not_installed("skimage", photo.path)
    return photos


def debian_copyright(path):
    """The stanzas of a machine-readable debian/copyright file, as (file patterns, "License (Copyright)")."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:  # a continuation line
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Files" in fields and "License" in fields:
            holders = re.sub(r"\s*<[^>]*>\S*", "", fields.get("Copyright", ""))  # without e-mail addresses
            holders = re.sub(r"\s+", " ", holders).strip()
            stanzas.append((fields["Files"].split(), f"{fields['License'].split()[0]} ({holders})" if holders
                            else fields["License"].split()[0]))
    return stanzas


def mate_photos(root):
    folder, copyright_file = os.path.join(root, MATE_FOLDER, "nature"), os.path.join(root, MATE_COPYRIGHT)
    for path in (folder, copyright_file):
        if not os.path.exists(path):
            raise not_installed("mate", path)
    stanzas = debian_copyright(copyright_file)
    photos = []
    for name in sorted(os.listdir(folder)):
        if not name.lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        relative = f"nature/{name}"
        matches = [licence for patterns, licence in stanzas if any(fnmatch.fnmatchcase(relative, p) for p in patterns)]
        if not matches:
            raise SystemExit(f"{copyright_file}: no licence given for {relative}")
        photos.append(Photo(f"mate/{name}", os.path.join(folder, name), matches[-1]))  # the last match rules (DEP-5)
    return photos


def plasma_photos(root):
    photos = []
    for name in PLASMA_PHOTOS:
        wallpaper = os.path.join(root, PLASMA_FOLDER, name)
        metadata = os.path.join(wallpaper, "metadata.json")
        if not os.path.isfile(metadata):
            raise not_installed("plasma", metadata)
        try:
            with open(metadata, encoding="utf-8") as f:
                plugin = json.load(f)["KPlugin"]
            authors = ", ".join(author["Name"] for author in plugin.get("Authors", []))
            licence = plugin["License"] + (f" ({authors})" if authors else "")
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{metadata}: no licence in it ({type(e).__name__}: {e})")
        images = os.path.join(wallpaper, "contents", "images")
        sizes = []
        for file in os.listdir(images) if os.path.isdir(images) else []:
            size = re.fullmatch(r"(\d+)x(\d+)\.(jpg|jpeg|png)", file)
            if size:
                sizes.append((int(size[1]) * int(size[2]), file))
        if not sizes:
            raise SystemExit(f"{images}: no WxH.jpg or WxH.png image in it")
        photos.append(Photo(f"plasma/{name}", os.path.join(images, max(sizes)[1]), licence))  # the largest
    return photos


def find_photos(sources=SOURCES, debian_root="/"):
    """Every photograph of `sources`, each with its licence; a one-line SystemExit naming what to install
    when a source is missing."""
    photos = []
    for source in sources:
        if source not in SOURCES:
            raise SystemExit(f"unknown photograph source {source!r} (known: {', '.join(SOURCES)})")
        photos += {"skimage": skimage_photos, "mate": lambda: mate_photos(debian_root),
                   "plasma": lambda: plasma_photos(debian_root)}[source]()
    return photos
