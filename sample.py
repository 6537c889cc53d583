"""Generate images from prompts with a trained model.

Each image is written as a PNG whose metadata records the prompt, seed, guidance scale and rescale, sampler
and checkpoint, so any image can be regenerated; a grid of all of them is written beside.

    python sample.py --prompt "two red circles on the left on a teal background"
    python sample.py --ckpt runs/pretrain/ckpt.pt --prompts data/prompts/toy.tsv --cfg 5
    python sample.py --base /weights/stable-diffusion-v1-5 --prompt "a photo of a cat" --cfg 7.5 --steps 50

--base reads a published Stable Diffusion folder into emu's own U-Net, autoencoder and CLIP
(emu/variants/stable_diffusion.py); with DDIM it gives the images diffusers' pipeline gives from the
same weights, noise and "trailing" timesteps.

In the toy world, --accuracy runs/judges/attributes.pt also prints how often the images show what
their prompts state (emu/evaluation/accuracy.py), read by the judges' attribute classifier.

Kandinsky's decoder (pretrain.py --arch kandinsky) has the paper's other modes too (emu/variants/kandinsky.py):

    python sample.py --ckpt runs/kandinsky/decoder/ckpt.pt --prompt "..."          # text -> prior -> image
    python sample.py --ckpt ... --mode variations --image photo.png               # new images like it
    python sample.py --ckpt ... --mode fusion --image a.png --image b.png --mix 0.7,0.3
    python sample.py --ckpt ... --mode fusion --image a.png --prompt "..."         # image and text fusion
    python sample.py --ckpt runs/kandinsky/inpaint/ckpt.pt --mode inpaint --image photo.png --box 0.25,0.25,0.75,0.75
    python sample.py --ckpt runs/kandinsky/inpaint/ckpt.pt --mode outpaint --image photo.png --extend 0,0,16,16

Inpainting fills the hole (a --box, or a --mask image whose white is the hole) following --prompt
through the prior, or, with no prompt, following the rest of the image (its CLIP embedding).
Inpainting and outpainting keep the image's size when the model can draw it. Outpainting extends the
canvas by --extend top,bottom,left,right pixels and fills the new border, or draws a --window
left,top,width,height placed partly off the image (as the demo's sliding window does) and grows the
image to cover it.

The demo's editor puts every mode on a local page, for one model (emu/demo/editor.py; each image it draws
records the sample.py command that draws it again, bit for bit):

    python sample.py serve --ckpt runs/kandinsky/editor/ckpt.pt    # then open http://127.0.0.1:8001
"""
import argparse
import os
import sys

import torch

from emu import EmuError
from emu.arch import ARCHS, LATENT_ARCHS, image_multiple
from emu.datasets.buckets import RATIOS, bucket_by_name, fit_to_bucket, make_buckets
from emu.datasets.folders import BadFile, from_pil, load_image, make_grid, open_rgb, read_prompts, save_png, to_uint8
from emu.demo.editor import EditorServer, read_styles
from emu.diffusion import GUIDANCE_RESCALE
from emu.evaluation.accuracy import accuracy_markdown, accuracy_table, prompt_hits
from emu.evaluation.faithfulness import load_classifier
from emu.evaluation.metrics import seed_variety
from emu.pipeline import TextToImage
from emu.variants.inpaint import box_mask, crop_window, mask_from_image, outpaint_window, place_window, window_problem
from emu.variants.kandinsky import fuse_embeddings

MODES = ("text", "variations", "fusion", "inpaint", "outpaint")


def add_model_flags(p, ckpt="runs/qtune/best.pt"):
    """The flags that choose and load the model, for drawing and for the editor."""
    p.add_argument("--ckpt", default=ckpt, help="training checkpoint (pretrain.py or qtune.py)")
    p.add_argument("--arch", default=None, choices=sorted(ARCHS),
                   help="the architecture the checkpoint must hold (default: the one it records)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA weights or the raw training weights")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="a published Stable Diffusion v1 folder (diffusers layout: unet/, vae/, text_encoder/, tokenizer/, "
                        "scheduler/) to sample instead of --ckpt, in emu's own modules")
    p.add_argument("--prior", default=None, help="Kandinsky's decoder: the image prior (default: the one it was trained beside)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts", default=None, help="file of prompts: one per line, or a PartiPrompts-style .tsv")
    p.add_argument("--n", type=int, default=4, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-rescale", type=float, default=None, metavar="PHI",
                   help="guidance rescale (Lin et al. 2024) in [0, 1], 0 = plain guidance; default: the model's own, "
                        f"{GUIDANCE_RESCALE} for emu's latent models, 0 for a published Stable Diffusion U-Net (as "
                        "diffusers samples it), the pixel cascade and Muse")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (diffusion) or decoding steps (MaskGIT)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (deterministic at eta 0) or DDPM ancestral")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 deterministic, 1 ~ DDPM)")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="the images' size in pixels, e.g. 48x24 (default: the training resolution, square); the latent "
                        "models (--arch ldm, kandinsky) draw any size whose sides their U-Net can halve")
    p.add_argument("--aspect", default=None, choices=[name for name, _, _ in RATIOS],
                   help="an aspect ratio (width:height) at about the training resolution's pixel count "
                        "(emu.datasets.buckets.make_buckets), instead of --size")
    p.add_argument("--mode", default="text", choices=MODES, help="text to image, or (Kandinsky's decoder) one of its image modes")
    p.add_argument("--image", action="append", help="variations, inpaint, outpaint: the input image; fusion: an image "
                                                    "to fuse (repeat the flag)")
    p.add_argument("--mix", default=None, help="fusion: comma-separated weights of the images, then the prompt (default equal)")
    p.add_argument("--box", default=None, help="inpaint: the hole, left,top,right,bottom as fractions of the image")
    p.add_argument("--mask", default=None, help="inpaint: the hole drawn as an image, white where to paint")
    p.add_argument("--extend", default=None, help="outpaint: pixels to add on each side, top,bottom,left,right")
    p.add_argument("--window", default=None, help="outpaint: the window to draw, left,top,width,height in the image's pixels, "
                                                  "partly off the image (the image grows to cover it)")
    p.add_argument("--accuracy", default=None, metavar="CLASSIFIER",
                   help="toy world: also print how often the images show what their prompts state, read by this attribute "
                        "classifier (eval_pairs.py's --judge file, e.g. runs/judges/attributes.pt)")
    p.add_argument("--out", default="runs/samples", help="output directory")
    args = p.parse_args(argv)
    check_mode_flags(args)  # before any model is loaded
    return args


def parse_serve_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py serve", description="The demo's image editor in the browser "
                                "(emu/demo/editor.py): every mode of sample.py on one page, for one model.")
    add_model_flags(p, ckpt="runs/kandinsky/editor/ckpt.pt")  # what `bash toy.sh editor` trains
    p.add_argument("--out", default="runs/editor", help="where every image and job is written, as soon as it exists")
    p.add_argument("--styles", default="data/styles.tsv", help="the style selector's file: name<TAB>prompt suffix per line")
    p.add_argument("--cfg", type=float, default=5.0, help="the page's default guidance scale")
    p.add_argument("--steps", type=int, default=25, help="the page's default number of sampling steps")
    p.add_argument("--max-steps", type=int, default=100, help="the most sampling steps a request may ask for")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (anything but loopback exposes the model)")
    p.add_argument("--port", type=int, default=8001)
    return p.parse_args(argv)


def main(args):
    classifier = load_classifier(args.accuracy) if args.accuracy else None  # a wrong file fails before sampling
    model = load_model(args)
    args.cfg_rescale = model.cfg_rescale if args.cfg_rescale is None else args.cfg_rescale  # recorded in each PNG
    size = image_size(args, model)
    if classifier is not None and size and min(size) < classifier.size // 2:
        raise EmuError(f"--size {size[0]}x{size[1]}: the attribute classifier reads sides of at least {classifier.size // 2}")
    jobs, images = draw(args, model)
    os.makedirs(args.out, exist_ok=True)
    for k, ((prompt, seed), image) in enumerate(zip(jobs, images)):
        save_png(os.path.join(args.out, f"{k:04d}.png"), image, image_metadata(args, prompt, seed))
    prompts = list(dict.fromkeys(p for p, _ in jobs))
    save_png(os.path.join(args.out, "grid.png"), make_grid(images, ncol=args.n), {"prompts": " | ".join(prompts), "checkpoint": args.ckpt})
    print(f"wrote {len(images)} images and grid.png to {args.out}")
    if args.n > 1:
        variety = seed_variety(images, args.n)
        print(f"variety over seeds: two images of one prompt differ by {variety['seeds']:.3f} RMS (pixels in [0, 1])"
              + (f", the first images of two prompts by {variety['prompts']:.3f}" if variety["prompts"] is not None else ""))
    if classifier is not None:
        table = accuracy_table(prompt_hits(classifier, images, [p for p, _ in jobs]), seed=args.seed)
        print(f"prompt accuracy, read by {args.accuracy}:\n" + accuracy_markdown({args.ckpt: table}))


def load_model(args):
    """The model of --ckpt, or of a published --base folder."""
    if args.base:  # a public base model: its folder stands where the checkpoint would
        model, args.ckpt = TextToImage.from_stable_diffusion(args.base, device=args.device), args.base
        return model
    return TextToImage.from_checkpoint(args.ckpt, device=args.device, weights=args.weights, arch=args.arch, prior=args.prior)


def draw(args, model, callback=None):
    """Every image the flags ask for: ([(prompt, seed)], (N, H, W, 3) uint8). The editor
    (`sample.py serve`) draws through this too, from the command it records with each image.

    :param callback: TextToImage.generate's (one call per sampling step; raising stops the drawing).
    """
    prompts = list(args.prompt or []) + ([p for p, _ in read_prompts(args.prompts)] if args.prompts else [])
    if not prompts and args.mode == "text":
        prompts = ["two red circles on the left on a teal background", "a yellow square in the center on a black background"]
    if args.mode != "text" and model.arch.name != "kandinsky":
        raise EmuError(f"--mode {args.mode} needs Kandinsky's decoder (pretrain.py --arch kandinsky); {args.ckpt} is --arch {model.arch.name}")
    size = image_size(args, model)  # (width, height), or None for the training resolution
    # every mode comes down to prompts, and for the image modes one image embedding or inpainting input per prompt
    prompts, image_embeds, inpaint, outpaint = mode_inputs(args, model, prompts)
    rows = [i for i in range(len(prompts)) for _ in range(args.n)]  # each prompt n times, seeds seed, seed+1, ...
    jobs = [(prompts[i], args.seed + k % args.n) for k, i in enumerate(rows)]
    images = model.generate([p for p, _ in jobs], [s for _, s in jobs], args.cfg, args.steps, args.sampler, args.eta,
                            image_embeds=None if image_embeds is None else image_embeds[rows],
                            inpaint=None if inpaint is None else (inpaint[0][rows], inpaint[1][rows]), size=size,
                            callback=callback, cfg_rescale=args.cfg_rescale)
    if outpaint is not None:  # the drawn window goes back on the grown canvas
        canvas, window = outpaint
        images = place_window(canvas.expand(len(images), -1, -1, -1), images, window)
    return jobs, to_uint8(images)


def image_metadata(args, prompt, seed):
    """What a PNG records of how it was drawn (PNG text chunks)."""
    meta = {"prompt": prompt, "seed": seed, "cfg": args.cfg, "cfg_rescale": args.cfg_rescale, "steps": args.steps, "sampler": args.sampler,
            "eta": args.eta, "checkpoint": args.ckpt, "weights": args.weights, "mode": args.mode}
    meta.update({k: str(getattr(args, k)) for k in ("image", "mix", "box", "mask", "extend", "window", "size", "aspect")
                 if getattr(args, k)})
    return meta


def image_size(args, model):
    """(width, height) from --size or --aspect, checked against what the model can draw; None without them."""
    if args.size and args.aspect:
        raise EmuError("give --size or --aspect, not both")
    if not (args.size or args.aspect):
        return None
    if args.mode in ("inpaint", "outpaint"):
        raise EmuError(f"--size and --aspect are for drawing new images; --mode {args.mode} keeps its image's size "
                       f"(outpaint: --extend or --window)")
    if model.arch.name not in LATENT_ARCHS:
        raise EmuError(f"--size and --aspect are for the latent models (--arch ldm, kandinsky): --arch {model.arch.name} "
                       f"draws square images only")
    multiple = image_multiple(model.model, model.ae)
    if args.aspect:
        bucket = bucket_by_name(args.aspect, make_buckets(model.image_size, multiple))
        return bucket.width, bucket.height
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise EmuError(f"--size {args.size}: give WIDTHxHEIGHT in pixels, e.g. 48x24") from None
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise EmuError(f"--size {args.size}: each side must be a positive multiple of {multiple} pixels for this model")
    return width, height


def check_mode_flags(args):
    """Each mode's inputs are given and no other mode's: one line naming what is wrong."""
    wanted = {"text": (), "variations": ("image",), "fusion": ("image",), "inpaint": ("image",), "outpaint": ("image",)}
    allowed = {"text": (), "variations": ("image",), "fusion": ("image", "mix"), "inpaint": ("image", "box", "mask"),
               "outpaint": ("image", "extend", "window")}
    for flag in ("image", "mix", "box", "mask", "extend", "window"):
        if getattr(args, flag) and flag not in allowed[args.mode]:
            raise EmuError(f"--{flag} is not for --mode {args.mode}")
    for flag in wanted[args.mode]:
        if not getattr(args, flag):
            raise EmuError(f"--mode {args.mode} needs --{flag}")
    if args.mode == "inpaint" and bool(args.box) == bool(args.mask):
        raise EmuError("--mode inpaint needs the hole as either --box or --mask")
    if args.mode == "outpaint" and bool(args.extend) == bool(args.window):
        raise EmuError("--mode outpaint needs either --extend or --window")
    if args.accuracy and args.mode != "text":
        raise EmuError(f"--accuracy measures text to image; --mode {args.mode} has no prompt to check every image against")
    if args.mode in ("variations", "inpaint", "outpaint") and len(args.image) != 1:
        raise EmuError(f"--mode {args.mode} takes one --image, not {len(args.image)}")


def numbers(flag, text, count=None, kind=float):
    """A comma-separated flag value as numbers, or EmuError naming the flag."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise EmuError(f"--{flag} {text}: not comma-separated numbers") from None
    if count is not None and len(values) != count:
        raise EmuError(f"--{flag} {text}: {count} numbers expected, got {len(values)}")
    return values


def read_image(path, size):
    """An input image as (1, 3, size, size) in [-1, 1] (shorter side resized, centre cropped)."""
    try:
        return load_image(path, size)[None]
    except BadFile as e:
        raise EmuError(f"--image {e}") from None


def read_canvas(path, model):
    """The image to inpaint or outpaint, (1, 3, H, W) in [-1, 1]: at its own size when the model can draw
    it (both sides multiples of what its U-Net halves), as every image the model or the editor made is;
    otherwise fitted (resized and centre-cropped) to the aspect bucket nearest its shape."""
    multiple = image_multiple(model.model, model.ae)
    try:
        im = open_rgb(path)
    except BadFile as e:
        raise EmuError(f"--image {e}") from None
    width, height = im.size
    if width % multiple or height % multiple:
        return fit_to_bucket(im, make_buckets(model.image_size, multiple))[None]
    return from_pil(im)[None]


def mode_inputs(args, model, prompts):
    """(prompts, image embeddings (P, E) or None, (images, masks) or None, (canvas, window) or None), one
    row per prompt.

    variations: the image's CLIP embedding, decoded with new noise (prompts optional: they join the text
    conditioning). fusion: the weighted mix (emu.variants.kandinsky.fuse_embeddings) of the images' embeddings and,
    with a prompt, the prior's embedding of it. inpaint/outpaint: the image and the hole; the prompt
    steers the fill through the prior, or with no prompt the image's own embedding does. Outpainting
    draws a window (--window, or with --extend the whole grown canvas) and returns the canvas to put it on.
    """
    if args.mode == "text":
        return prompts, None, None, None
    encoder = model.text_encoder
    if args.mode in ("variations", "fusion"):
        embeds = encoder.embed_images(torch.cat([read_image(path, model.image_size) for path in args.image]))  # (K, E)
    if args.mode == "variations":
        prompts = prompts or [""]
        return prompts, embeds.expand(len(prompts), -1), None, None
    if args.mode == "fusion":
        if len(prompts) > 1:
            raise EmuError("--mode fusion takes at most one --prompt")
        if prompts:  # image and text fusion: the prior's embedding of the prompt joins the mix
            embeds = torch.cat([embeds, encoder.encode(prompts).image.to(embeds.device)])
        if len(embeds) < 2:
            raise EmuError("--mode fusion needs two inputs: two --image, or an --image and a --prompt")
        mix = numbers("mix", args.mix, len(embeds)) if args.mix else [1.0] * len(embeds)
        return prompts or [""], fuse_embeddings(embeds, mix)[None], None, None
    image, outpaint = read_canvas(args.image[0], model), None  # (1, 3, H, W)
    if args.mode == "inpaint":
        canvas = image
        if args.box:
            mask = box_mask(tuple(image.shape[-2:]), numbers("box", args.box, 4))
        else:
            try:
                mask = mask_from_image(open_rgb(args.mask), tuple(image.shape[-2:]))
            except BadFile as e:
                raise EmuError(f"--mask {e}") from None
    else:  # outpaint: the image on a larger canvas; the window's part off the image is the hole
        canvas, mask, window = outpaint_inputs(args, model, image)
        outpaint = canvas, window
        canvas, mask = crop_window(canvas, window), crop_window(mask, window)
    prompts = prompts or [""]
    if prompts == [""]:  # no prompt: the rest of the image guides the fill
        given = encoder.embed_images(canvas * (1 - mask)).expand(len(prompts), -1)
    else:
        given = None  # the prior's embedding of each prompt
    n = len(prompts)
    return prompts, given, (canvas.expand(n, -1, -1, -1), mask.expand(n, -1, -1, -1)), outpaint


def outpaint_inputs(args, model, image):
    """outpaint_window's (canvas, hole, window) for --extend top,bottom,left,right (the window is the whole
    grown canvas) or --window left,top,width,height (in the image's pixels; it must reach off the image)."""
    H, W = image.shape[-2:]
    if args.extend:
        top, bottom, left, right = numbers("extend", args.extend, 4, int)
        if min(top, bottom, left, right) < 0:
            raise EmuError(f"--extend {args.extend}: pixels to add cannot be negative")
        flag, (left, top, width, height) = f"--extend {args.extend}", (-left, -top, W + left + right, H + top + bottom)
    else:
        flag, (left, top, width, height) = f"--window {args.window}", numbers("window", args.window, 4, int)
    problem = window_problem(W, H, left, top, width, height, image_multiple(model.model, model.ae))
    if problem:
        raise EmuError(f"{flag}: the window {problem}")
    return outpaint_window(image, left, top, width, height)


def serve(args):
    """The editor: one model, every mode it has, on a local page (emu/demo/editor.py). Each image is drawn
    by `draw` from the sample.py arguments recorded with it, so its command draws it again, bit for bit."""
    try:
        styles = read_styles(args.styles)
    except (OSError, ValueError) as e:
        raise EmuError(f"--styles {e}") from None
    model = load_model(args)
    if model.arch.name not in LATENT_ARCHS:
        raise EmuError(f"the editor draws with the latent models (--arch ldm, kandinsky); {args.ckpt} is --arch {model.arch.name}")
    modes = ["text"]
    if model.arch.name == "kandinsky":
        modes += ["variations", "fusion"] + (["inpaint", "outpaint"] if model.model.cfg.cond_channels else [])
    model_argv = (["--base", args.base] if args.base else ["--ckpt", args.ckpt, "--weights", args.weights]) + \
        (["--prior", args.prior] if args.prior else []) + ["--device", args.device]

    def redraw(argv, callback):
        job = parse_args(argv)
        [(prompt, seed)], images = draw(job, model, callback)
        return images[0], image_metadata(job, prompt, seed)

    server = EditorServer(args.out, redraw, model_argv, modes, model.image_size, image_multiple(model.model, model.ae),
                          styles, args.max_steps, {"cfg": args.cfg, "steps": args.steps}, args.host, args.port)
    if not server.loopback:
        print(f"warning: listening on {args.host}: anyone who can reach this address can draw with the model and read "
              f"every image in {args.out}", file=sys.stderr)
    print(f"the editor for {args.ckpt} ({', '.join(modes)}) on {server.base_url}; images go to {args.out}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["serve"]:
            serve(parse_serve_args(sys.argv[2:]))
        else:
            main(parse_args())
    except EmuError as e:
        raise SystemExit(f"error: {e}")
