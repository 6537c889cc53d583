"""The architectures behind --arch (emu/arch.py): their checkpoints, objectives and generation."""
import argparse
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from emu import EmuError
from emu.arch import ARCHS, resolve_arch_flags
from emu.models.autoencoder import PRESETS as AE_PRESETS, Autoencoder
from emu.models.first_stage import load_autoencoder, save_autoencoder
from emu.diffusion import GaussianDiffusion
from emu.variants.kandinsky import MoVQLatents
from emu.models.vq import VQ_PRESETS, VQTokenizer
from emu.variants.muse import MaskedTokens, muse_generate
from emu.pipeline import model_from_checkpoint, read_training_checkpoint
from emu.variants.pixel import CascadeDiffusion, PixelSpace, cascade_generate, resize
from emu.text.encoder import TextEmbedding, TextImageEmbedding
from emu.training.loop import make_optimizer, module_device, save_training_state, train_step, warmup_schedule

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOWERS = SimpleNamespace(clip_dim=16, t5_dim=24, pooled_dim=16, image_dim=12, xlmr=None)  # what arch.build reads of a text encoder
# every architecture at its toy preset, and Kandinsky's inpainting decoder
MODELS = sorted(ARCHS) + ["kandinsky-inpaint"]


def arch_and_preset(name):
    return ("kandinsky", "toy-inpaint") if name == "kandinsky-inpaint" else (name, "toy")


def text(batch, seed=0, length=5, arch="ldm"):
    """Random text conditioning; for Kandinsky's decoder, with a CLIP image embedding per row."""
    g = torch.Generator().manual_seed(seed)
    fields = dict(clip=torch.randn(batch, length, TOWERS.clip_dim, generator=g),
                  clip_mask=torch.ones(batch, length, dtype=torch.bool),
                  t5=torch.randn(batch, length, TOWERS.t5_dim, generator=g),
                  t5_mask=torch.ones(batch, length, dtype=torch.bool),
                  pooled=torch.randn(batch, TOWERS.pooled_dim, generator=g))
    if arch.startswith("kandinsky"):
        return TextImageEmbedding(**fields, image=torch.randn(batch, TOWERS.image_dim, generator=g))
    return TextEmbedding(**fields)


def first_stage(arch):
    if arch == "ldm":
        return Autoencoder(AE_PRESETS["toy"]).eval()
    if arch == "muse":
        return VQTokenizer(VQ_PRESETS["toy"]).eval()
    if arch.startswith("kandinsky"):
        return MoVQLatents(VQTokenizer(VQ_PRESETS["toy-movq"]).eval())
    return PixelSpace()


def build(name, seed=0):
    torch.manual_seed(seed)
    arch, preset = arch_and_preset(name)
    return ARCHS[arch].build(preset, first_stage(name), TOWERS)


def training_args(name, **overrides):
    arch, preset = arch_and_preset(name)
    schedule, prediction, gamma = ARCHS[arch].diffusion_defaults(preset)
    return argparse.Namespace(**{"arch": arch, "schedule": schedule, "timesteps": 1000, "prediction": prediction,
                                 "min_snr_gamma": gamma,
                                 "caption_dropout": 0.1, "noise_offset": 0.02, "precision": "fp32", "grad_clip": 1.0,
                                 "lr": 1e-3, "weight_decay": 0.0, "grad_accum": 1, **overrides})


def batch(arch, n=4, seed=0):
    """What each architecture trains on: latents, pixels, or token ids, for a batch of n images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        return first_stage(arch).encode(images)


@pytest.mark.parametrize("name", MODELS)
def test_a_training_checkpoint_records_the_architecture_and_rebuilds_its_model(name, tmp_path):
    model, arch = build(name), arch_and_preset(name)[0]
    opt = make_optimizer(model, training_args(name))
    save_training_state(tmp_path / "ckpt.pt", ARCHS[arch], model, model, opt, warmup_schedule(opt, 1), 0, torch.Generator(),
                        training_args(name))
    ckpt = read_training_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["arch"] == arch
    loaded_arch, loaded = model_from_checkpoint(ckpt, tmp_path / "ckpt.pt")
    assert loaded_arch is ARCHS[arch] and type(loaded) is type(model) and not loaded.training
    assert getattr(loaded, "cfg", None) == getattr(model, "cfg", None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_checkpoint_from_before_the_architectures_loads_as_latent_diffusion(tmp_path):
    """Checkpoints written before --arch existed have "unet_config" and no "arch"."""
    model = build("ldm")
    opt = make_optimizer(model, training_args("ldm"))
    save_training_state(tmp_path / "ckpt.pt", ARCHS["ldm"], model, model, opt, warmup_schedule(opt, 1), 0, torch.Generator(),
                        training_args("ldm"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["unet_config"] = ckpt.pop("model_config")
    del ckpt["arch"]
    arch, loaded = model_from_checkpoint(ckpt, "old.pt")
    assert arch.name == "ldm" and loaded.cfg == model.cfg
    del ckpt["unet_config"]
    with pytest.raises(EmuError, match="old.pt: not a training checkpoint of pretrain.py or qtune.py"):
        model_from_checkpoint(ckpt, "old.pt")


@pytest.mark.parametrize("arch", MODELS)
def test_micro_batches_add_up_to_the_whole_batch_for_every_objective(arch):
    """train_step draws every sample's randomness (timesteps, noise, augmentation, masks) for the whole
    batch, then splits it: --grad-accum 2 must give the loss and update of one batch, up to rounding."""
    x, cond = batch(arch), text(4, arch=arch)
    results = []
    for accum in (1, 2):
        model = build(arch).train()
        args = training_args(arch, grad_accum=accum)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # AdamW's first step would amplify rounding in tiny gradients
        loss = train_step(model, ARCHS[args.arch].objective(model, args), x, cond, text(1, seed=9, arch=arch), opt,
                          warmup_schedule(opt, 1), torch.Generator().manual_seed(3), args)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    (loss1, params1), (loss2, params2) = results
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params1, params2))
    assert any(not torch.equal(a, b) for a, b in zip(params1, build(arch).parameters()))  # it did learn


def test_the_cascade_loss_is_the_base_loss_plus_the_conditioned_upsampler_loss():
    model, diffusion = build("pixel"), GaussianDiffusion("cosine", 1000, "v")
    objective = CascadeDiffusion(diffusion, model.factor)
    images, cond = batch("pixel"), text(4)
    draws = objective.training_noise(images, 0.0, torch.Generator().manual_seed(1))
    assert draws["noise_low"].shape == (4, 3, 16, 16) and draws["noise"].shape == draws["aug_noise"].shape == (4, 3, 32, 32)
    with torch.no_grad():
        total = objective.training_loss(model, images, cond, **draws)
        low = resize(images, 16)
        base = diffusion.training_loss(model.base, low, cond, t=draws["t_low"], noise=draws["noise_low"])
        augmented = diffusion.q_sample(resize(low, 32), draws["t_aug"], draws["aug_noise"])
        up = F.mse_loss(model.upsampler(diffusion.q_sample(images, draws["t"], draws["noise"]), draws["t"], cond,
                                        cond=augmented, t_aug=draws["t_aug"]),
                        diffusion.target(images, draws["t"], draws["noise"]))
    assert total.item() == pytest.approx((base + up).item(), rel=1e-6)


def test_the_masked_objective_scores_only_the_masked_tokens():
    """A model that knows every visible token and is uniform over the K codes at masked ones has loss
    log K, whatever it says about the visible ones."""
    K, objective = 16, MaskedTokens(16)
    ids = torch.randint(0, K, (3, 4, 4), generator=torch.Generator().manual_seed(0))

    def model(inputs, _text):
        logits = torch.zeros(*inputs.flatten(1).shape, K)
        visible = inputs.flatten(1) != K
        logits[visible] = -100 * F.one_hot(inputs.flatten(1)[visible], K).float()  # wrong on purpose
        return logits

    draws = objective.training_noise(ids, generator=torch.Generator().manual_seed(1))
    assert draws["mask"].shape == (3, 16) and draws["mask"].any(dim=1).all()
    loss = objective.training_loss(model, ids, None, **draws)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=1e-6)


@pytest.mark.parametrize("arch", MODELS)
def test_held_out_checks_use_fixed_draws(arch):
    """check_loss (qtune's early stopping) gives the same number for the same model every time, and
    a different one once the weights change."""
    model, args = build(arch).eval(), training_args(arch)
    objective = ARCHS[args.arch].objective(model, args)
    x, cond = batch(arch), text(4, arch=arch)
    first = objective.check_loss(model, x, cond)
    assert objective.check_loss(model, x, cond) == first
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert objective.check_loss(model, x, cond) != first


def test_the_pixel_cascade_and_the_masked_transformer_generate_seeded_images():
    cond, uncond = text(2), text(2, seed=5)
    cascade = build("pixel").eval()
    diffusion = GaussianDiffusion("cosine", 1000, "v")
    one = cascade_generate(cascade, diffusion, cond, uncond, [3, 4], 32, steps=2)
    assert one.shape == (2, 3, 32, 32) and one.abs().max() <= 1
    assert torch.equal(one, cascade_generate(cascade, diffusion, cond, uncond, [3, 4], 32, steps=2))
    assert not torch.equal(one, cascade_generate(cascade, diffusion, cond, uncond, [5, 4], 32, steps=2))
    tokenizer, transformer = first_stage("muse"), build("muse").eval()
    images = muse_generate(transformer, tokenizer, cond, uncond, [3, 4], 32, steps=3)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert torch.equal(images, muse_generate(transformer, tokenizer, cond, uncond, [3, 4], 32, steps=3))


def test_the_vq_tokenizer_saves_and_loads_like_the_autoencoder(tmp_path):
    torch.manual_seed(0)
    tokenizer = VQTokenizer(dataclasses.replace(VQ_PRESETS["toy"], base_channels=8)).eval()
    save_autoencoder(tokenizer, tmp_path / "vq")
    loaded = load_autoencoder(tmp_path / "vq")
    assert isinstance(loaded, VQTokenizer) and loaded.cfg == tokenizer.cfg and not loaded.training
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(images), tokenizer.encode(images))
    (tmp_path / "vq" / "config.json").write_text('{"kind": "gan", "channel_mult": [1]}')
    with pytest.raises(EmuError, match="config.json: not a valid autoencoder config .*unknown kind 'gan'"):
        load_autoencoder(tmp_path / "vq")


def test_pixels_need_no_first_stage():
    ae = PixelSpace()
    images = torch.rand(2, 3, 8, 8)
    assert ae.encode(images) is images and ae.decode(images) is images and ae.downsample_factor == 1
    assert module_device(ae) == torch.device("cpu")


@pytest.mark.parametrize("argv, message", [
    (["--arch", "pixel", "--ae", "runs/ae"], "--ae runs/ae: --arch pixel works on pixels and has no autoencoder"),
    (["--arch", "ldm", "--preset", "imagen"], "--preset imagen: --arch ldm has presets emu, toy"),
    (["--arch", "muse", "--prediction", "v"],
     "--schedule, --prediction and --min-snr-gamma are for diffusion models, not --arch muse"),
    (["--arch", "muse", "--min-snr-gamma", "5"],
     "--schedule, --prediction and --min-snr-gamma are for diffusion models, not --arch muse"),
    (["--arch", "ldm", "--prior", "p.pt"], "--prior is for Kandinsky's decoder (--arch kandinsky), not --arch ldm"),
    (["--arch", "kandinsky", "--preset", "emu"],
     "--preset emu: --arch kandinsky has presets kandinsky, kandinsky-inpaint, toy, toy-inpaint"),
])
def test_flags_that_do_not_apply_to_an_architecture_are_refused(argv, message):
    p = argparse.ArgumentParser()
    for flag in ("--arch", "--ae", "--schedule", "--prediction", "--prior", "--min-snr-gamma"):
        p.add_argument(flag, default=None)
    p.add_argument("--preset", default="toy")
    with pytest.raises(EmuError) as e:
        resolve_arch_flags(p.parse_args(argv))
    assert str(e.value) == message


def test_each_architecture_fills_in_its_own_defaults():
    for arch, preset, expected in [("ldm", "toy", ("runs/ae", "scaled_linear", "v", 5.0)),
                                   ("ldm", "emu", ("runs/ae", "scaled_linear", "eps", 0.0)),
                                   ("pixel", "toy", (None, "cosine", "v", 0.0)), ("muse", "toy", ("runs/vq", None, None, None)),
                                   ("kandinsky", "toy", ("runs/movq", "scaled_linear", "v", 5.0)),
                                   ("kandinsky", "toy-inpaint", ("runs/movq", "scaled_linear", "v", 5.0)),
                                   ("kandinsky", "kandinsky", ("runs/movq", "scaled_linear", "eps", 0.0))]:
        args = argparse.Namespace(arch=arch, preset=preset, ae=None, schedule=None, prediction=None, prior=None,
                                  min_snr_gamma=None)
        resolve_arch_flags(args)
        assert (args.ae, args.schedule, args.prediction, args.min_snr_gamma) == expected
        assert args.prior == ("runs/prior/prior.pt" if arch == "kandinsky" else None)


def test_an_inpainting_objective_draws_the_share_of_whole_masks_its_run_was_trained_with():
    """The flag, from a script's arguments or a checkpoint's; a checkpoint from before the flag drew one
    whole-image mask in eight, which is not today's default of a half."""
    model = build("kandinsky-inpaint")
    objective = lambda args: ARCHS["kandinsky"].objective(model, args).whole
    assert objective(training_args("kandinsky-inpaint", whole_masks=0.3)) == 0.3
    assert objective(vars(training_args("kandinsky-inpaint", whole_masks=0.3))) == 0.3  # a checkpoint's args
    assert objective(vars(training_args("kandinsky-inpaint"))) == 1 / 8
    assert objective(argparse.Namespace(**vars(training_args("kandinsky-inpaint")))) == 1 / 8
