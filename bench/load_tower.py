"""Peak memory while loading a large text tower in bfloat16, against the size of its bf16 weights:
T5-XXL's encoder (Emu's second tower) or XLM-R-large with M-CLIP's head (Kandinsky 2.1's).

    python bench/load_tower.py --dir /tmp/t5-xxl-synthetic               # writes ~19 GB once, then measures
    python bench/load_tower.py --dir /tmp/xlmr-synthetic --tower xlmr    # ~2.1 GB
    python bench/load_tower.py --dir /tmp/t5-toy --preset toy            # the same at toy scale, in seconds

The checkpoint is synthetic but has the real shapes and layout (google/t5-v1_1-xxl's encoder keys, or
kandinsky-2-1's text_encoder/ keys), float32 as published, in shards of --shard-gb with a
model.safetensors.index.json. It is written lazily, one shard in memory at a time. Each load then runs
in a fresh process, which reports its peak resident memory (VmHWM):
  ours       emu's loader (load_t5_encoder, load_xlmr): empty bf16 model, then one tensor at a time with plain reads
  reference  the same empty bf16 model filled through the safetensors library's memory-mapped
             safe_open, shard by shard (what a straightforward loader does)
The ratio to report is ours / bf16 weight bytes; the reference shows what the plain reads save.
"""
import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emu.text.hf import empty_model  # noqa: E402
from emu.text.t5 import T5_PRESETS, T5Encoder, build_toy_t5_tokenizer, load_t5_encoder, t5_key_map  # noqa: E402
from emu.text.xlmr import XLMR_PRESETS, XLMRTextModel, build_toy_xlmr_tokenizer, load_xlmr, xlmr_key_map  # noqa: E402


@dataclass(frozen=True)
class Tower:
    """What the benchmark needs of a tower: its presets, model class, key map, loader, a tokenizer
    builder and the config.json entries that name its architecture."""
    presets: dict
    model: type
    key_map: object
    load: object
    tokenizer: object
    architecture: dict
    default: str


TOWERS = {
    "t5": Tower(T5_PRESETS, T5Encoder, t5_key_map, load_t5_encoder, build_toy_t5_tokenizer,
                {"architectures": ["T5EncoderModel"], "model_type": "t5"}, "t5-v1_1-xxl"),
    "xlmr": Tower(XLMR_PRESETS, XLMRTextModel, xlmr_key_map, load_xlmr, build_toy_xlmr_tokenizer,
                  {"architectures": ["MultilingualCLIP"], "model_type": "xlm-roberta"}, "xlm-roberta-large-vit-l-14"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where the synthetic checkpoint is (or will be) written")
    p.add_argument("--tower", default="t5", choices=sorted(TOWERS), help="which tower")
    p.add_argument("--preset", default=None, help="its shapes: toy, or (the default) the published model's")
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size of the synthetic checkpoint")
    p.add_argument("--child", choices=["ours", "reference", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.preset = args.preset or TOWERS[args.tower].default
    if args.preset not in TOWERS[args.tower].presets:
        p.error(f"--preset {args.preset}: the {args.tower} tower has {', '.join(sorted(TOWERS[args.tower].presets))}")
    return args


def write_synthetic_checkpoint(directory, tower, preset, shard_bytes):
    """config.json, tokenizer.json and float32 shards with the tower's real keys and shapes."""
    directory.mkdir(parents=True, exist_ok=True)
    config = tower.presets[preset]
    with torch.device("meta"):
        model = tower.model(config)
    tokenizer = tower.tokenizer(["a photo of a cat on a sofa", "two dogs in the snow"] * 8, vocab_size=64)
    config_dict = {**tower.architecture, "torch_dtype": "float32", **asdict(config)}
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    tokenizer.save(str(directory / "tokenizer.json"))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    keys, written = [], set()
    for theirs, ours in tower.key_map(config).items():
        if ours not in written:  # a tied weight once, under its first name (T5's "shared.weight")
            keys.append((theirs, shapes[ours]))
            written.add(ours)
    shards, current, size = [], {}, 0
    gen = torch.Generator().manual_seed(0)

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, str(directory / name), metadata={"format": "pt"})
        shards.append((name, list(current)))

    for key, shape in keys:
        nbytes = 4 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            flush()
            current, size = {}, 0
        current[key] = torch.empty(shape).uniform_(-0.05, 0.05, generator=gen)
        size += nbytes
    flush()
    total = len(shards)
    weight_map = {}
    for name, shard_keys in shards:
        final = name.replace(".safetensors", f"-of-{total:05d}.safetensors")
        (directory / name).replace(directory / final)
        weight_map.update({k: final for k in shard_keys})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def load_reference(directory, tower, preset):
    """An empty bf16 tower filled through safetensors' memory-mapped reader, shard by shard."""
    model = empty_model(tower.model, tower.presets[preset], torch.bfloat16, "cpu")
    key_map, params = tower.key_map(model.config), dict(model.named_parameters())
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    with torch.no_grad():
        for shard in sorted(set(weight_map.values())):
            with safe_open(str(directory / shard), framework="pt") as f:
                for key in f.keys():
                    params[key_map[key]].copy_(f.get_tensor(key))
    return model


def peak_rss():
    """This process's peak resident memory in bytes (VmHWM; ru_maxrss would include the parent's
    peak, which Linux carries across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(args):
    t0 = time.time()
    if args.child == "baseline":
        print(json.dumps({"peak": peak_rss()}))
        return
    tower = TOWERS[args.tower]
    if args.child == "ours":
        model, _ = tower.load(args.dir, dtype=torch.bfloat16)
    else:
        model = load_reference(Path(args.dir), tower, args.preset)
    seconds = time.time() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = peak_rss()
    print(json.dumps({"peak": peak, "weights": weights, "seconds": seconds}))


def measure(args, which):
    out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--tower", args.tower, "--preset", args.preset,
                          "--child", which],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def baseline_rss():
    """Resident memory of a process that has only imported torch and emu: not the loader's doing."""
    out = subprocess.run([sys.executable, __file__, "--dir", "-", "--child", "baseline"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def main(args):
    directory = Path(args.dir)
    if not (directory / "model.safetensors.index.json").is_file():
        t0 = time.time()
        write_synthetic_checkpoint(directory, TOWERS[args.tower], args.preset, int(args.shard_gb * 2**30))
        size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        print(f"wrote {size / 2**30:.2f} GiB of float32 shards to {directory} in {time.time() - t0:.0f} s")
    print_results(baseline_rss(), {which: measure(args, which) for which in ("ours", "reference")})


def print_results(base, results):
    """The peaks of {"ours": ..., "reference": ...} (each {"peak", "weights", "seconds"}) against the bf16
    weights, beside `base`, the resident memory of a process that has only imported torch and emu."""
    print(f"a process with torch and emu imported: {base / 2**30:.2f} GiB resident")
    weights = results["ours"]["weights"]
    print(f"bf16 weights: {weights / 2**30:.2f} GiB")
    for which, r in results.items():
        print(f"{which:9s}  peak {r['peak'] / 2**30:6.2f} GiB  = {r['peak'] / weights:.3f} x bf16 weights  "
              f"({(r['peak'] - base) / weights:.3f} x without the baseline)  load {r['seconds']:.1f} s")
    print(f"ours / reference peak: {results['ours']['peak'] / results['reference']['peak']:.3f}")


if __name__ == "__main__":
    arguments = parse_args()
    child(arguments) if arguments.child else main(arguments)
