"""Peak memory while loading Stable Diffusion v1.5's U-Net (860M parameters) in bfloat16 through emu's
loader (emu.variants.stable_diffusion.load_sd_unet), against the size of its bf16 weights.

    python bench/load_sd_unet.py --dir /tmp/sd15-unet-synthetic              # writes 3.2 GiB once, then measures
    python bench/load_sd_unet.py --dir /tmp/sd-unet-toy --preset toy         # the same at toy scale, in seconds

The folder is synthetic but has the published unet/'s layout: v1.5's config.json entries, every key and
shape of diffusion_pytorch_model.safetensors (one float32 file, as published; v1's 1x1-convolution
projections included). Each load runs in a fresh process, which reports its peak resident memory:
  ours       load_sd_unet: an empty bf16 U-Net, then one tensor at a time with plain reads
  reference  the same empty bf16 U-Net filled through the safetensors library's memory-mapped safe_open
The ratio to report is ours / bf16 weight bytes (the goal: at most 1.2); a process that has only
imported torch and emu is measured too, since its resident memory is not the loader's doing.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from emu.models.unet import UNet  # noqa: E402
from emu.text.hf import empty_model  # noqa: E402
from emu.variants.stable_diffusion import load_sd_unet, unet_config_from_diffusers, unet_key_map  # noqa: E402
from load_tower import peak_rss, print_results  # noqa: E402  (bench/load_tower.py)

# runwayml/stable-diffusion-v1-5's unet/config.json, the entries that shape the network
SD15 = {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
        "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
        "use_linear_projection": False}
PRESETS = {"sd-v1-5": SD15, "toy": dict(SD15, block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, norm_num_groups=8)}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where the synthetic unet/ folder is (or will be) written")
    p.add_argument("--preset", default="sd-v1-5", choices=sorted(PRESETS), help="its shapes")
    p.add_argument("--child", choices=["ours", "reference", "baseline"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def empty_unet(directory, dtype):
    """An uninitialised U-Net of the folder's config, and {published key: our name}."""
    raw = json.loads((directory / "config.json").read_text())
    model = empty_model(UNet, unet_config_from_diffusers(raw, directory / "config.json"), dtype, "cpu")
    return model, unet_key_map(model)


def write_synthetic_unet(directory, raw):
    """config.json and one float32 file with every published key and shape."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    with torch.device("meta"):
        model = UNet(unet_config_from_diffusers(raw, directory / "config.json"))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    gen, tensors = torch.Generator().manual_seed(0), {}
    for key, ours in unet_key_map(model).items():
        shape = shapes[ours]
        if not raw["use_linear_projection"] and key.endswith(("proj_in.weight", "proj_out.weight")) and len(shape) == 2:
            shape = (*shape, 1, 1)  # v1 publishes the transformers' projections as 1x1 convolutions
        tensors[key] = torch.empty(shape).uniform_(-0.05, 0.05, generator=gen)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})


def load_reference(directory):
    """The empty bf16 U-Net filled through safetensors' memory-mapped reader."""
    model, key_map = empty_unet(directory, torch.bfloat16)
    params = dict(model.named_parameters())
    with torch.no_grad(), safe_open(str(directory / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            target = params[key_map[key]]
            target.copy_(f.get_tensor(key).reshape(target.shape))
    return model


def child(args):
    if args.child == "baseline":
        print(json.dumps({"peak": peak_rss()}))
        return
    t0 = time.time()
    model = load_sd_unet(args.dir, dtype=torch.bfloat16) if args.child == "ours" else load_reference(Path(args.dir))
    seconds = time.time() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": peak_rss(), "weights": weights, "seconds": seconds,
                      "parameters": sum(p.numel() for p in model.parameters())}))


def measure(args, which):
    out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--preset", args.preset, "--child", which],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(args):
    directory = Path(args.dir)
    if not (directory / WEIGHTS).is_file():
        t0 = time.time()
        write_synthetic_unet(directory, PRESETS[args.preset])
        print(f"wrote {(directory / WEIGHTS).stat().st_size / 2**30:.2f} GiB of float32 weights to {directory} "
              f"in {time.time() - t0:.0f} s")
    results = {which: measure(args, which) for which in ("ours", "reference")}
    print(f"{results['ours']['parameters'] / 1e6:.0f}M parameters")
    print_results(measure(args, "baseline")["peak"], results)


if __name__ == "__main__":
    arguments = parse_args()
    child(arguments) if arguments.child else main(arguments)
