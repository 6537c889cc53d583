"""A published Stable Diffusion folder read into our U-Net, autoencoder and CLIP (emu/variants/stable_diffusion.py),
against diffusers and transformers on small random checkpoints in the published layout."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from emu import EmuError
from emu.checkpoint import load_checkpoint
from emu.curation.funnel import cached_embeddings, read_store
from emu.curation.heads import load_head
from emu.datasets.folders import to_uint8
from emu.diffusion import GaussianDiffusion, guided_images
from emu.pipeline import read_training_checkpoint
from emu.models.unet import UNet
from emu.text.clip import CLIP_BOS, CLIP_EOS, clip_clean, clip_preprocess, load_clip_text, load_clip_vision
from emu.text.encoder import TextEmbedding
from emu.text.hf import tokenize
from emu.variants.stable_diffusion import (load_sd_unet, load_sd_vae, load_stable_diffusion, unet_config_from_diffusers,
                                          unet_key_map)
from launch import run, script

diffusers = pytest.importorskip("diffusers")  # a test-only reference (requirements-test.txt)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Stable Diffusion v1's U-Net, shrunk: the same block types, 8 groups instead of 32, 4 heads instead of 8
V1 = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
          cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
# v2: linear projections around the transformer and one head width (16) at every level
V2 = dict(V1, use_linear_projection=True, attention_head_dim=(2, 4, 4))


def published_unet(tmp_path, config, seed=0, fp16=False, shards=False, std=0.05):
    """A random UNet2DConditionModel saved as diffusers saves it; every weight random, the zero-initialised too."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    folder = tmp_path / "unet"
    if fp16:  # the published half-precision copy: float16 tensors in diffusion_pytorch_model.fp16.safetensors
        model.half().save_pretrained(folder, variant="fp16")
        return model.float(), folder  # the reference holds the rounded weights, as ours will
    model.save_pretrained(folder, max_shard_size="200KB" if shards else "10GB")
    return model, folder


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([3, 811])[:batch]
    context = torch.randn(batch, 7, 24, generator=g)
    # Stable Diffusion attends to all 77 positions, padding included: every mask entry is True
    text = TextEmbedding(clip=context, clip_mask=torch.ones(batch, 7, dtype=torch.bool), t5=torch.zeros(batch, 0, 1),
                         t5_mask=torch.zeros(batch, 0, dtype=torch.bool), pooled=torch.zeros(batch, 0))
    return x, t, context, text


@pytest.mark.parametrize("config", [V1, V2], ids=["v1", "v2"])
def test_the_published_unet_gives_diffusers_numbers(tmp_path, config):
    reference, folder = published_unet(tmp_path, config)
    ours = load_sd_unet(folder)
    assert ours.cfg.emb_add and ours.clip_proj is not None and ours.t5_proj is None and ours.pooled_proj is None
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    x, t, context, text = inputs()
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, text)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_fp16_copies_and_shards_load_and_a_wrong_folder_is_a_one_line_error(tmp_path):
    reference, folder = published_unet(tmp_path / "half", V1, fp16=True)
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    ours = load_sd_unet(folder, dtype=torch.float32)
    x, t, context, text = inputs()
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=context).sample
        assert (ours(x, t, text) - want).abs().max() <= 1e-4 * want.abs().max()
    reference, sharded = published_unet(tmp_path / "shards", V1, seed=2, shards=True)
    assert len(list(sharded.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=context).sample
        assert (load_sd_unet(sharded)(x, t, text) - want).abs().max() <= 1e-4 * want.abs().max()
    config = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "time_embedding_type": "fourier"}))
    with pytest.raises(EmuError, match=r"config.json: time_embedding_type 'fourier' is not supported"):
        load_sd_unet(bad)
    (bad / "config.json").write_text(json.dumps({**config, "up_block_types": ["UpBlock2D"] * 3}))
    with pytest.raises(EmuError, match="are not Stable Diffusion's mirrored"):
        load_sd_unet(bad)
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(EmuError, match="pickled checkpoints are not loaded"):
        load_sd_unet(bad)
    weights = {k: v for k, v in reference.state_dict().items() if "conv_out" not in k}
    save_file({k: v.contiguous() for k, v in weights.items()}, bad / "diffusion_pytorch_model.safetensors")
    with pytest.raises(EmuError, match=r"missing keys \['conv_out.bias', 'conv_out.weight'\]"):
        load_sd_unet(bad)


def test_every_published_key_has_one_of_ours():
    model = diffusers.UNet2DConditionModel(**V1)
    key_map = unet_key_map(UNet(unet_config_from_diffusers(dict(V1), "config.json")))
    assert sorted(key_map) == sorted(model.state_dict())
    assert len(set(key_map.values())) == len(key_map)
    assert key_map["up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"] == "up.6.attn.blocks.0.cross_attn.k.weight"
    assert key_map["down_blocks.0.downsamplers.0.conv.weight"] == "down.2.conv.weight"
    assert key_map["mid_block.resnets.1.time_emb_proj.bias"] == "mid.1.res.emb.bias"


# Stable Diffusion's VAE, shrunk: 3 levels (4x downsampling) of 32 and 64 channels, 8 groups
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
           scaling_factor=0.18215)


def published_vae(tmp_path, seed=0):
    """A random AutoencoderKL saved as diffusers saves it in `tmp_path`/vae."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**VAE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "vae")
    return model


def test_the_published_vae_encodes_and_decodes_as_diffusers_does(tmp_path):
    reference = published_vae(tmp_path)
    ours = load_sd_vae(tmp_path / "vae")
    assert float(ours.scale_factor) == pytest.approx(0.18215) and ours.downsample_factor == 4
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = reference.encode(images).latent_dist
        mean, logvar = ours.posterior(images)
        torch.testing.assert_close(mean, posterior.mean, rtol=0, atol=1e-4 * float(posterior.mean.abs().max()))
        torch.testing.assert_close(logvar, posterior.logvar, rtol=0, atol=1e-4 * float(posterior.logvar.abs().max()))
        z = ours.encode(images)  # the U-Net's latents: the mean times the scaling factor, as SD's pipelines scale them
        torch.testing.assert_close(z, posterior.mean * 0.18215, rtol=0, atol=1e-4 * float(z.abs().max()))
        want = reference.decode(z / 0.18215).sample
        torch.testing.assert_close(ours.decode(z), want, rtol=0, atol=1e-4 * float(want.abs().max()))
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "use_quant_conv": False}))
    with pytest.raises(EmuError, match="use_quant_conv False is not supported"):
        load_sd_vae(tmp_path / "vae")


def published_text_side(tmp_path, width=32, hidden_act="quick_gelu", layers=2):
    """A random bare CLIPTextModel in text_encoder/ and the original tokenizer's files in tokenizer/, laid out
    as Stable Diffusion v1.5 publishes them (transformers 4's key names, which transformers 5 no longer writes);
    returns (the reference model, transformers' CLIPTokenizer of those files)."""
    transformers = pytest.importorskip("transformers")
    regex = pytest.importorskip("regex")
    from test_tokenizers import CAPTIONS, train_clip_bpe
    vocab, merges = train_clip_bpe(regex, CAPTIONS, num_merges=150)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                                         hidden_act=hidden_act,
                                         bos_token_id=vocab[CLIP_BOS], eos_token_id=vocab[CLIP_EOS], pad_token_id=vocab[CLIP_EOS])
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(config).eval()
    reference.config.save_pretrained(tmp_path / "text_encoder")
    save_file({f"text_model.{k}": v.contiguous() for k, v in reference.state_dict().items()},
              tmp_path / "text_encoder" / "model.safetensors")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                                        encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer(str(tmp_path / "tokenizer" / "vocab.json"), str(tmp_path / "tokenizer" / "merges.txt"),
                                           model_max_length=77)
    return reference, tokenizer


def test_the_published_text_encoder_loads_without_a_projection_beside_its_tokenizer(tmp_path):
    """Stable Diffusion's text_encoder/ is a bare CLIPTextModel (no text projection), its tokenizer/ the
    original vocab.json and merges.txt: ids as transformers' CLIPTokenizer gives them, states as its model."""
    reference, theirs = published_text_side(tmp_path)
    with pytest.raises(EmuError, match="missing keys \\['text_projection.weight'\\]"):
        load_clip_text(tmp_path / "text_encoder", dtype=torch.float32)  # the towers Emu conditions on have one
    model, tokenizer = load_clip_text(tmp_path / "text_encoder", dtype=torch.float32, projection=False)
    prompts = ["a red circle on the left", "two blue squares at the top on a white background", ""]
    ids = tokenize(tokenizer, prompts, clean=clip_clean)[0]
    assert ids.tolist() == theirs(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    with torch.no_grad():
        want = reference(ids)
        hidden, pooled = model(ids)
    torch.testing.assert_close(hidden, want.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, want.pooler_output, rtol=0, atol=1e-5)


def test_v2s_text_encoder_is_its_penultimate_layer_as_published(tmp_path):
    """Stable Diffusion 2 conditions on OpenCLIP's penultimate layer (final layer norm applied); its published
    text_encoder/ holds the tower cut to that layer (23 of ViT-H's 24, GELU), so reading every layer the
    config names gives it. Here: a 3-layer GELU tower published as its first 2 layers."""
    full, _ = published_text_side(tmp_path / "full", hidden_act="gelu", layers=3)
    published_text_side(tmp_path / "v2", hidden_act="gelu", layers=2)
    cut = {f"text_model.{k}": v.contiguous() for k, v in full.state_dict().items() if ".layers.2." not in k}
    save_file(cut, tmp_path / "v2" / "text_encoder" / "model.safetensors")  # the 3-layer tower's first 2 layers
    model, tokenizer = load_clip_text(tmp_path / "v2" / "text_encoder", dtype=torch.float32, projection=False)
    ids = tokenize(tokenizer, ["a red circle on the left", ""], clean=clip_clean)[0]
    with torch.no_grad():
        hidden, _ = model(ids)
        states = full(ids, output_hidden_states=True)
    penultimate = getattr(full, "text_model", full).final_layer_norm(states.hidden_states[-2])  # transformers 5: no text_model
    torch.testing.assert_close(hidden, penultimate, rtol=0, atol=1e-5)
    assert (hidden - states.last_hidden_state).abs().max() > 1e-2  # not the last layer's


def published_folder(tmp_path):
    """A small random Stable Diffusion v1 folder laid out as v1.5 is published, and diffusers' pipeline of the same parts."""
    text_encoder, tokenizer = published_text_side(tmp_path, width=24)
    unet, _ = published_unet(tmp_path, V1, std=0.2)  # large enough weights that the noise prediction matters
    vae = published_vae(tmp_path, seed=3)
    # DDIM with the timesteps ours takes ("trailing") and a clean last step
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                        set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    return pipe


def test_a_whole_seeded_sample_is_the_diffusers_pipelines(tmp_path):
    pipe = published_folder(tmp_path)
    unet, vae, text_encoder, diffusion = load_stable_diffusion(tmp_path)
    prompts, seeds = ["a red circle on the left", "two blue squares"], [7, 8]
    text, uncond = text_encoder.encode(prompts), text_encoder.encode([""] * 2)
    with torch.no_grad():
        ours = guided_images(unet, vae, diffusion, text, uncond, seeds, (64, 64), 5.0, 10, "ddim", 0.0)
        # the same start noise: guided_images draws each image's from its seed alone
        noise = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
        theirs = pipe(prompts, num_inference_steps=10, guidance_scale=5.0, latents=noise, output_type="pt",
                      height=64, width=64).images * 2 - 1  # the pipeline's [0, 1] back to [-1, 1]
        # the test can tell samplers apart: the same model with other timesteps gives another image
        other = guided_images(unet, vae, GaussianDiffusion(spacing="linspace"), text, uncond, seeds, (64, 64), 5.0, 10, "ddim", 0.0)
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    error = (ours.clamp(-1, 1) - theirs).abs().max()
    assert error <= 1e-4 * theirs.abs().max() and (other.clamp(-1, 1) - theirs).abs().max() > 100 * error


def test_sample_py_draws_from_a_published_folder(tmp_path):
    pipe = published_folder(tmp_path / "sd")
    run("sample.py", "--base", f"{tmp_path}/sd", "--prompt", "a red circle on the left", "--n", "1", "--seed", "7",
        "--steps", "10", "--cfg", "5", "--out", f"{tmp_path}/samples")
    image = Image.open(f"{tmp_path}/samples/0000.png")
    assert image.size == (64, 64) and image.text["checkpoint"] == f"{tmp_path}/sd"  # sample_size 16 latents, 4x up
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = pipe(["a red circle on the left"], num_inference_steps=10, guidance_scale=5.0, latents=noise,
                      output_type="np", height=64, width=64).images[0]
    assert np.abs(np.asarray(image, dtype=np.float64) - np.round(theirs * 255)).max() <= 1  # the same picture


def test_the_editor_serves_a_published_folder_and_its_commands_redraw_bit_for_bit(tmp_path):
    """`sample.py serve --base DIR`: text to image at 16:9 on Stable Diffusion's published layout, drawn
    as the `sample.py --base` command it records draws it."""
    from test_editor import Editor, redraw
    published_folder(tmp_path / "sd")
    editor = Editor("unused", tmp_path / "editor", "--base", f"{tmp_path}/sd")
    try:
        _, _, data = editor.request("GET", "/api/config")
        config = json.loads(data)
        assert config["modes"] == ["text"] and config["aspects"]["16:9"] == [80, 48]  # 64-pixel squares, sides in 16s
        image_id = editor.post("/api/generate", {"mode": "text", "prompt": "a red circle", "aspect": "16:9", "seed": 3,
                                                 "steps": 4})["id"]
        assert editor.wait(image_id)["state"] == "done"
        image = editor.image(image_id)
        assert image.size == (80, 48) and f"--base {tmp_path}/sd" in image.text["command"]
        assert np.array_equal(np.asarray(image), redraw(image.text["command"], tmp_path / "redraw"))
    finally:
        editor.stop()


def write_needles(folder, n=10, size=64):
    """`n` smooth image + caption pairs: a curated set to quality-tune on."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        image = np.stack([128 + 90 * np.sin(xx / (4 + i) + c) * np.cos(yy / (5 + c)) for c in range(3)], -1)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a photograph of waves number {i}\n")


def test_qtune_tunes_a_published_folder_and_sample_py_draws_the_tuned_unet_through_the_base(tmp_path):
    published_folder(tmp_path / "sd")
    write_needles(tmp_path / "needles")
    out = tmp_path / "qtune"
    run("qtune.py", "--base", f"{tmp_path}/sd", "--data", f"{tmp_path}/needles", "--curate-top", "0", "--caption-field", "",
        "--holdout", "2", "--iters", "4", "--bs", "4", "--eval-every", "2", "--warmup", "1", "--lr", "3e-3", "--ema-decay", "0.5",
        "--out", str(out))
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["args"]["base"] == f"{tmp_path}/sd" and ckpt["args"]["image_size"] == 64  # the base's sample_size x 4
    assert ckpt["step"] == 4 and ckpt["args"]["ae"] is None and ckpt["args"]["clip"] is None
    base_unet, vae, text_encoder, diffusion = load_stable_diffusion(tmp_path / "sd")
    tuned = UNet(base_unet.cfg)
    tuned.load_state_dict(ckpt["ema"])
    moved = max((tuned.state_dict()[k] - v).abs().max().item() for k, v in base_unet.state_dict().items())
    assert moved > 0  # the U-Net was tuned; nothing but it is saved
    assert set(ckpt["ema"]) == set(base_unet.state_dict())
    # sample.py reads the tuned U-Net from the checkpoint and everything else from the base folder
    run("sample.py", "--ckpt", str(out / "ckpt.pt"), "--prompt", "a photograph of waves", "--n", "1", "--seed", "7",
        "--steps", "10", "--cfg", "5", "--out", f"{tmp_path}/samples")
    image = np.asarray(Image.open(f"{tmp_path}/samples/0000.png"))
    text, uncond = text_encoder.encode(["a photograph of waves"]), text_encoder.encode([""])
    with torch.no_grad():
        expected = [to_uint8(guided_images(u.eval(), vae, diffusion, text, uncond, [7], (64, 64), 5.0, 10, "ddim", 0.0).clamp(-1, 1))[0]
                    for u in (tuned, base_unet)]
    assert image.shape == (64, 64, 3) and np.array_equal(image, expected[0])
    assert np.abs(expected[1].astype(int) - expected[0]).max() > 2  # the untuned base draws another picture


@pytest.mark.slow
def test_qtune_tunes_a_published_folder_on_two_ranks_sharded_or_replicated_and_resumes_bitwise(tmp_path):
    """torchrun, 2 processes over gloo. FSDP: 2 iterations + resume + 2 equal 4 in one go (weights, EMA,
    early-stopping state), each rank writing its pieces into ckpt-<step>/, with whole best.pt and ckpt.pt
    for sample.py. DDP: the replicas agree, and take the steps FSDP takes (the same global batch of 4)."""
    published_folder(tmp_path / "sd")
    write_needles(tmp_path / "needles")
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "qtune.py"]
    common = ["--base", f"{tmp_path}/sd", "--data", f"{tmp_path}/needles", "--curate-top", "0", "--caption-field", "",
              "--holdout", "2", "--bs", "4", "--eval-every", "2", "--warmup", "1", "--lr", "3e-3", "--ema-decay", "0.5",
              "--patience", "10"]
    out = run(*launch, *common, "--fsdp", "--iters", "4", "--out", f"{tmp_path}/straight")
    assert "2 rank(s), sharded" in out and "iteration cap at iteration 4" in out
    run(*launch, *common, "--fsdp", "--iters", "2", "--out", f"{tmp_path}/split")
    out = run(*launch, *common, "--fsdp", "--iters", "4", "--out", f"{tmp_path}/split", "--resume", "auto")
    assert f"resumed from {tmp_path}/split/ckpt-000000002 at iteration 2" in out
    a, b = (read_training_checkpoint(f"{tmp_path}/{name}/ckpt-000000004") for name in ("straight", "split"))
    assert a["step"] == b["step"] == 4 and a["early_stop"] == b["early_stop"] and len(b["gens"]) == 2
    whole = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) and torch.equal(whole[key][k], b[key][k]) for k in a[key]), key
    best = load_checkpoint(tmp_path / "split" / "best.pt")
    assert "opt" not in best and best["step"] == b["early_stop"]["best_step"]
    run("sample.py", "--ckpt", f"{tmp_path}/split/best.pt", "--prompt", "waves", "--n", "1", "--steps", "2",
        "--out", f"{tmp_path}/samples")
    assert Image.open(f"{tmp_path}/samples/0000.png").size == (64, 64)
    out = run(*launch, *common, "--iters", "2", "--out", f"{tmp_path}/ddp")
    assert "the replicas' weights agree" in out
    ddp, fsdp = load_checkpoint(tmp_path / "ddp" / "ckpt.pt"), read_training_checkpoint(f"{tmp_path}/split/ckpt-000000002")
    base = load_sd_unet(tmp_path / "sd" / "unet").state_dict()
    difference = sum((ddp["model"][k] - v).abs().sum() for k, v in fsdp["model"].items())
    update = sum((base[k] - v).abs().sum() for k, v in fsdp["model"].items())
    assert 0 < difference < 1e-3 * update, (difference, update)


def test_qtune_exports_the_tuned_unet_as_a_folder_diffusers_reads(tmp_path):
    """--export writes best.pt's EMA U-Net under the published names and shapes (v1's 1x1 convolutions),
    beside the base's other parts: our loader reads it back bit for bit, diffusers computes what ours does."""
    published_folder(tmp_path / "sd")
    write_needles(tmp_path / "needles")
    out, exported = tmp_path / "qtune", tmp_path / "exported"
    run("qtune.py", "--base", f"{tmp_path}/sd", "--data", f"{tmp_path}/needles", "--curate-top", "0", "--caption-field", "",
        "--holdout", "2", "--iters", "4", "--bs", "4", "--eval-every", "2", "--warmup", "1", "--lr", "3e-3",
        "--ema-decay", "0.5", "--patience", "10", "--out", str(out), "--export", str(exported))
    best = load_checkpoint(out / "best.pt")
    unet, _, _, _ = load_stable_diffusion(exported)
    assert best["step"] > 0 and all(torch.equal(v, best["ema"][k]) for k, v in unet.state_dict().items())
    base_unet = load_sd_unet(tmp_path / "sd" / "unet")
    assert any(not torch.equal(v, base_unet.state_dict()[k]) for k, v in unet.state_dict().items())
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (exported / part).exists()
    reference = diffusers.UNet2DConditionModel.from_pretrained(exported / "unet").eval()
    x, t, context, text = inputs()
    with torch.no_grad():
        want = reference(x, t, encoder_hidden_states=context).sample
        got = unet(x, t, text)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    proc = script("qtune.py", "--base", f"{tmp_path}/sd", "--data", f"{tmp_path}/needles", "--export", str(exported))
    assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    # the tuned model against its base, pair by pair, for people to rate (no toy judges on real models)
    (tmp_path / "prompts.txt").write_text("a photograph of waves\nwaves at dusk\n")
    run("eval_pairs.py", "--a", str(out / "best.pt"), "--b", f"{tmp_path}/sd", "--judges", "none", "--prompts",
        f"{tmp_path}/prompts.txt", "--steps", "10", "--out", f"{tmp_path}/eval")
    run("sample.py", "--base", f"{tmp_path}/sd", "--prompt", "waves at dusk", "--n", "1", "--seed", "1", "--steps", "10",
        "--out", f"{tmp_path}/base-samples")
    run("sample.py", "--ckpt", str(out / "best.pt"), "--prompt", "waves at dusk", "--n", "1", "--seed", "1", "--steps", "10",
        "--out", f"{tmp_path}/tuned-samples")
    pixels = {name: np.asarray(Image.open(tmp_path / name)) for name in
              ("eval/images/0001-a.png", "eval/images/0001-b.png", "base-samples/0000.png", "tuned-samples/0000.png")}
    assert np.array_equal(pixels["eval/images/0001-b.png"], pixels["base-samples/0000.png"])  # B: the base folder
    assert np.array_equal(pixels["eval/images/0001-a.png"], pixels["tuned-samples/0000.png"])  # A: the tuned U-Net
    assert not np.array_equal(pixels["eval/images/0001-a.png"], pixels["eval/images/0001-b.png"])


def test_qtune_base_flags_that_do_not_apply_are_one_line_errors(tmp_path):
    published_folder(tmp_path / "sd")
    write_needles(tmp_path / "needles")
    common = ["--data", f"{tmp_path}/needles", "--curate-top", "0", "--caption-field", "", "--out", f"{tmp_path}/q"]
    for argv, message in [(["--base", f"{tmp_path}/sd", "--arch", "muse"], "--arch muse does not apply"),
                          (["--base", f"{tmp_path}/sd", "--image-size", "40"], "--image-size 40: "),
                          (["--base", f"{tmp_path}/nowhere"], "not a Stable Diffusion folder"),
                          (["--image-size", "64"], "--image-size is for --base"),
                          (["--export", f"{tmp_path}/e"], "writes a tuned --base folder; give --base")]:
        proc = script("qtune.py", *argv, *common)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def published_safety_checker(folder, flag_like=None):
    """A random StableDiffusionSafetyChecker in `folder`, its weights under the names v1.5 publishes
    (transformers 4's "vision_model.vision_model.*"). With `flag_like` (images, (B, 3, 32, 32) in [0, 1]),
    the first concept is set at the first image's embedding, so that the checker flags that image."""
    transformers = pytest.importorskip("transformers")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                           patch_size=8, hidden_act="quick_gelu"), projection_dim=16)
    torch.manual_seed(5)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        for p in checker.parameters():
            if p.dim() > 1:  # the matrices; the norms stay as they start, or every image gets one embedding
                p.normal_(0, 0.2)
        checker.concept_embeds_weights.fill_(1.0)  # a cosine similarity never passes 1 ...
        checker.special_care_embeds_weights.fill_(1.0)
        if flag_like is not None:  # ... but this one is the first image's own embedding, with a threshold
            emb = nn.functional.normalize(reference_embeddings(checker, flag_like), dim=-1)  # halfway to the nearest other
            checker.concept_embeds[0] = emb[0]
            checker.concept_embeds_weights[0] = (1 + (emb[1:] @ emb[0]).max()) / 2
    checker.config.architectures = ["StableDiffusionSafetyChecker"]  # as the published config.json names it
    checker.config.save_pretrained(folder)
    save_file({("vision_model." if k.startswith("vision_model.") else "") + k: v.contiguous()
               for k, v in checker.state_dict().items()}, folder / "model.safetensors")
    return checker


def clip_input(images):
    """Images in [0, 1] as the pipeline's feature extractor gives them to the checker (CLIP's published mean and std)."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return (images - mean) / std


def reference_embeddings(checker, images):
    """What the published checker compares with its concepts: the projected pooled output of its image tower."""
    with torch.no_grad():
        return checker.visual_projection(checker.vision_model(clip_input(images)).pooler_output)


def test_the_funnel_embeds_with_the_bases_image_tower_and_drops_what_its_safety_checker_flags(tmp_path):
    """--base DIR: the funnel's CLIP stages read the CLIP image tower of DIR/safety_checker (the embeddings
    are transformers' to 1e-5), and --unsafe-head DIR/safety_checker drops exactly the images diffusers'
    checker flags. Without the text projection the CLIP score cannot be had: a one-line error says so."""
    published_folder(tmp_path / "sd")
    (tmp_path / "haystack").mkdir()
    rng, keys = np.random.default_rng(0), [f"{i:03d}" for i in range(6)]
    for key in keys:  # distinct pictures, which a small random image tower tells apart
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "haystack" / f"{key}.png")
        (tmp_path / "haystack" / f"{key}.txt").write_text(f"a photograph number {key}\n")
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "haystack" / f"{k}.png"))).permute(2, 0, 1)
                          for k in keys]).float() / 255
    checker = published_safety_checker(tmp_path / "sd" / "safety_checker", flag_like=images)
    tower = load_clip_vision(tmp_path / "sd" / "safety_checker", dtype=torch.float32)
    with torch.no_grad():
        _, ours = tower(clip_preprocess(images * 2 - 1, 32))
    want = reference_embeddings(checker, images)
    assert (ours - want).abs().max() <= 1e-5 * want.abs().max()
    _, flagged = checker(clip_input(images), images.clone())
    assert flagged == [True] + [False] * 5
    assert load_head(str(tmp_path / "sd" / "safety_checker"))(ours).tolist() == [float(f) for f in flagged]

    out = tmp_path / "curate"
    proc = script("data/curate.py", "--data", f"{tmp_path}/haystack", "--base", f"{tmp_path}/sd", "--out", str(out),
                  "--unsafe-head", f"{tmp_path}/sd/safety_checker", "--clusters", "2", "--per-cluster", "2")
    assert proc.returncode == 0, proc.stderr
    assert "| offensive | 6 | 5 | 1 |" in proc.stdout and "| balance | 5 | 3 | 2 |" in proc.stdout
    with read_store(out) as conn:  # what the balance stage clustered: the base's embeddings of the images
        stored = cached_embeddings(conn, keys)
    assert all((torch.from_numpy(stored[k]) - ours[i]).abs().max() <= 1e-5 * want.abs().max() for i, k in enumerate(keys))
    why = script("data/curate.py", "why", "--out", str(out), keys[0]).stdout
    assert "dropped at offensive: flagged by the safety checker's concepts" in why
    for argv, message in [(["--base", f"{tmp_path}/sd", "--clip-min", "0.2"], "--clip-min needs CLIP's text projection"),
                          (["--base", f"{tmp_path}/haystack"], "not a Stable Diffusion folder")]:
        proc = script("data/curate.py", "--data", f"{tmp_path}/haystack", "--out", f"{tmp_path}/other", *argv)
        err = proc.stderr.strip()
        assert proc.returncode != 0 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    (tmp_path / "sd" / "safety_checker" / "config.json").unlink()
    proc = script("data/curate.py", "--data", f"{tmp_path}/haystack", "--out", f"{tmp_path}/other", "--base", f"{tmp_path}/sd")
    assert proc.returncode != 0 and "no safety_checker/" in proc.stderr and "Traceback" not in proc.stderr
