import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from emu import EmuError
from emu.models.autoencoder import (PRESETS, AELoss, Autoencoder, FourierFeatures, PatchDiscriminator,
                                    hinge_discriminator_loss)
from emu.models.first_stage import load_autoencoder, save_autoencoder
from emu.evaluation.metrics import psnr, ssim
from emu.models.nn import Downsample, Upsample
from emu.models.perceptual import PerceptualLoss
from launch import script


def small_config(**overrides):
    """The toy preset, narrower still, so tests run in milliseconds."""
    return dataclasses.replace(PRESETS["toy"], base_channels=8, **overrides)


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -----------------------------------------------------------------------------
# autoencoder

@pytest.mark.parametrize("latent_channels", [4, 8, 16])
@pytest.mark.parametrize("fourier", [True, False])
def test_latent_and_image_shapes(latent_channels, fourier):
    ae = Autoencoder(small_config(latent_channels=latent_channels, fourier=fourier))
    x = images()
    f = ae.downsample_factor
    assert f == 4
    z = ae.encode(x)
    assert z.shape == (2, latent_channels, 32 // f, 32 // f)
    assert ae.decode(z).shape == x.shape
    recon, mean, logvar = ae(x)
    assert recon.shape == x.shape and mean.shape == logvar.shape == z.shape


def test_emu_shaped_autoencoder_downsamples_by_8():
    ae = Autoencoder(small_config(channel_mult=PRESETS["emu"].channel_mult))
    assert ae.downsample_factor == 8
    assert ae.encode(images()).shape == (2, 16, 4, 4)


def test_shortcut_resampling_starts_from_average_pooling_and_nearest_upsampling():
    x = images(2, 8)
    down, up = Downsample(3, shortcut=True), Upsample(3, shortcut=True)
    for layer in (down, up):
        torch.nn.init.zeros_(layer.conv.weight), torch.nn.init.zeros_(layer.conv.bias)
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_linear_patch_path_alone_is_a_linear_patch_code():
    ae = Autoencoder(small_config(shortcuts=True, fourier=False)).eval()
    for net in (ae.encoder, ae.decoder):  # silence the deep path: only the patch path is left
        torch.nn.init.zeros_(net.conv_out.weight), torch.nn.init.zeros_(net.conv_out.bias)
    x = images(2)
    z = ae.encode(x)  # (2, 16, 8, 8): each latent is a linear function of its own 4x4 patch
    x2 = x.clone()
    x2[:, :, :4, :4] = 0.0  # change the top-left patch only
    changed = (ae.encode(x2) - z).abs().sum(dim=1) > 0
    assert changed[:, 0, 0].all() and changed.sum() == 2
    y = ae.decode(z)
    y2 = ae.decode(z + torch.nn.functional.one_hot(torch.tensor(0), 64).view(1, 1, 8, 8))
    assert ((y2 - y).abs().sum(dim=1) > 0).sum() <= 2 * 16 and (y2 - y)[:, :, 4:, 4:].abs().max() == 0


@pytest.mark.slow
def test_shortcuts_make_the_toy_autoencoder_learn_faster():
    from emu.datasets.toyworld import make_haystack
    data = torch.stack([torch.as_tensor(img).permute(2, 0, 1).float() / 127.5 - 1
                        for img, _, _ in make_haystack(64, seed=3)])
    results = {}
    for shortcuts in (False, True):
        torch.manual_seed(0)
        ae = Autoencoder(dataclasses.replace(PRESETS["toy"], shortcuts=shortcuts))
        opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
        for step in range(40):
            x = data[(8 * step) % 64:(8 * step) % 64 + 8]
            loss = (ae(x)[0] - x).abs().mean()
            opt.zero_grad(), loss.backward(), opt.step()
        with torch.no_grad():
            results[shortcuts] = psnr(ae.decode(ae.encode(data)).clamp(-1, 1), data).mean().item()
    assert results[True] > results[False] + 1.0, results


def test_encode_is_deterministic_and_scaled():
    ae = Autoencoder(small_config()).eval()
    x = images()
    z = ae.encode(x)
    assert torch.equal(z, ae.encode(x))  # the posterior mean, no sampling
    ae.scale_factor.fill_(0.5)
    assert torch.allclose(ae.encode(x), 0.5 * z)
    assert torch.allclose(ae.decode(ae.encode(x)), ae.decoder(z), atol=1e-5)  # decode undoes the scale


def test_fourier_features_are_fixed_and_seeded():
    ff = FourierFeatures(num_features=5, scale=1.0, seed=0)
    assert list(ff.parameters()) == [] and ff.state_dict() == {}
    x = images()
    y = ff(x)
    assert y.shape == (2, 3 + 2 * 5, 32, 32) and ff.out_channels == 13
    assert torch.equal(y[:, :3], x)  # the RGB input is kept alongside the sinusoids
    assert torch.equal(y, FourierFeatures(5, 1.0, seed=0)(x))
    assert not torch.allclose(y, FourierFeatures(5, 1.0, seed=1)(x))


def test_linear_patch_path_reads_the_pixels_not_the_fourier_features():
    """The patch path is a linear code of RGB: whatever the sinusoids say, it reads only the first 3 channels."""
    ae = Autoencoder(small_config(shortcuts=True, fourier=True)).eval()
    f = ae.downsample_factor
    assert ae.encoder.patch.in_channels == 3 * f * f and ae.encoder.conv_in.in_channels == ae.fourier.out_channels
    torch.nn.init.zeros_(ae.encoder.conv_out.weight), torch.nn.init.zeros_(ae.encoder.conv_out.bias)
    lifted = ae.fourier(images())
    scrambled = torch.cat([lifted[:, :3], torch.randn_like(lifted[:, 3:])], dim=1)
    with torch.no_grad():
        assert torch.equal(ae.encoder(lifted), ae.encoder(scrambled))


def test_fourier_transform_stays_fixed_in_training_and_is_rebuilt_bitwise_on_load(tmp_path):
    cfg = small_config(fourier=True, fourier_seed=3, fourier_scale=0.7)
    ae = Autoencoder(cfg)
    freqs = ae.fourier.freqs.clone()
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-2)
    recon, _, _ = ae(images())
    recon.square().mean().backward()
    opt.step()
    assert torch.equal(ae.fourier.freqs, freqs)  # not a parameter: the optimiser never touches it
    save_autoencoder(ae, tmp_path / "ae")
    loaded = load_autoencoder(tmp_path / "ae")
    assert torch.equal(loaded.fourier.freqs, freqs)  # rebuilt from the saved seed and scale, bit for bit
    assert torch.equal(freqs, FourierFeatures(cfg.fourier_features, 0.7, seed=3).freqs)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images()), ae.eval().encode(images()))


def test_fourier_transform_is_not_in_the_autoencoder_state_dict():
    ae = Autoencoder(small_config(fourier=True))
    assert not any(k.startswith("fourier") for k in ae.state_dict())
    assert "scale_factor" in ae.state_dict()


# -----------------------------------------------------------------------------
# saving and loading

def test_save_load_round_trip_gives_identical_decode(tmp_path):
    ae = Autoencoder(small_config()).eval()
    ae.scale_factor.fill_(0.7)
    save_autoencoder(ae, tmp_path / "ae")
    loaded = load_autoencoder(tmp_path / "ae")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.scale_factor.item() == pytest.approx(0.7)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), ae.encode(x))
        z = torch.randn(2, 16, 8, 8)
        assert torch.equal(loaded.decode(z), ae.decode(z))


def test_an_autoencoder_whose_patch_path_read_the_fourier_features_is_refused_in_one_line(tmp_path):
    from emu.checkpoint import load_weights, save_weights
    ae = Autoencoder(small_config(fourier=True, shortcuts=True))
    save_autoencoder(ae, tmp_path)
    state = load_weights(tmp_path / "model.safetensors")
    f2 = ae.downsample_factor ** 2
    state["encoder.patch.weight"] = torch.zeros(32, ae.fourier.out_channels * f2, 1, 1)  # as saved before the fix
    save_weights(tmp_path / "model.safetensors", state)
    with pytest.raises(EmuError, match=r"model.safetensors: its encoder's patch path reads the Fourier features too; .*"
                                       r"train it again with train_ae.py"):
        load_autoencoder(tmp_path)


def test_load_with_wrong_latent_channels_names_the_file(tmp_path):
    save_autoencoder(Autoencoder(small_config(latent_channels=16)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(EmuError, match=r"model\.safetensors: shape mismatch"):
        load_autoencoder(tmp_path)


def test_load_missing_pieces_name_the_file(tmp_path):
    with pytest.raises(EmuError, match=r"nope: autoencoder directory not found"):
        load_autoencoder(tmp_path / "nope")
    save_autoencoder(Autoencoder(small_config()), tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(EmuError, match=r"model\.safetensors: weights file not found"):
        load_autoencoder(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(EmuError, match=r"config\.json: autoencoder config not found"):
        load_autoencoder(tmp_path)


# -----------------------------------------------------------------------------
# losses

def test_hinge_discriminator_loss_on_known_logits():
    real = torch.tensor([2.0, 0.5])   # relu(1 - real) = [0, 0.5], mean 0.25
    fake = torch.tensor([-2.0, 0.5])  # relu(1 + fake) = [0, 1.5], mean 0.75
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_discriminator_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_patch_discriminator_gives_a_grid_of_logits():
    disc = PatchDiscriminator(3, channels=8, num_layers=2)
    assert disc(images()).shape == (2, 1, 6, 6)


def test_adversarial_terms_are_zero_before_disc_start():
    torch.manual_seed(0)
    ae = Autoencoder(small_config())
    loss_fn = AELoss(PatchDiscriminator(3, 8, 2), kl_weight=1e-6, disc_weight=0.5, disc_start=10)
    x = images()
    recon, mean, logvar = ae(x)
    last = ae.decoder.conv_out.weight
    loss, logs = loss_fn.generator_loss(x, recon, mean, logvar, last, step=9)
    assert logs["adv_weight"] == 0.0 and logs["gen"] == 0.0
    expected = (x - recon).abs().mean() + 1e-6 * 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    assert torch.allclose(loss, expected)
    assert loss_fn.discriminator_loss(x, recon, step=9).item() == 0.0
    _, logs = loss_fn.generator_loss(x, recon, mean, logvar, last, step=10)
    assert logs["adv_weight"] > 0.0
    assert loss_fn.discriminator_loss(x, recon, step=10).item() > 0.0


# -----------------------------------------------------------------------------
# perceptual loss

def write_random_perceptual_weights(path, drop=None, reshape=None):
    """A random-weight file in PerceptualLoss's documented layout (plus an ignored extra key)."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in PerceptualLoss().state_dict().items()}
    for k in state:
        if k.startswith("lin"):
            state[k] = state[k].abs()  # LPIPS's linear heads are non-negative
    state["classifier.0.weight"] = torch.zeros(2, 2)
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = torch.zeros(1)
    save_file(state, str(path))
    return path


def test_perceptual_loss_from_a_file_in_the_layout(tmp_path):
    path = write_random_perceptual_weights(tmp_path / "lpips.safetensors")
    loss = PerceptualLoss.from_file(path)
    assert not any(p.requires_grad for p in loss.parameters())
    assert sorted(k for k in loss.state_dict() if k.startswith("features"))[:2] == ["features.0.bias", "features.0.weight"]
    x, y = images(seed=0), images(seed=1)
    assert torch.equal(loss(x, x), torch.zeros(2))
    d = loss(x, y)
    assert d.shape == (2,) and (d > 0).all()


def test_perceptual_loss_gives_gradients_to_the_input(tmp_path):
    loss = PerceptualLoss.from_file(write_random_perceptual_weights(tmp_path / "lpips.safetensors"))
    y = images(seed=1).requires_grad_()
    loss(images(seed=0), y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_perceptual_loss_file_errors_name_the_file(tmp_path):
    with pytest.raises(EmuError, match=r"absent\.safetensors: weights file not found"):
        PerceptualLoss.from_file(tmp_path / "absent.safetensors")
    path = write_random_perceptual_weights(tmp_path / "no_lin.safetensors", drop="lin3.weight")
    with pytest.raises(EmuError, match=r"no_lin\.safetensors: .*missing 1: \['lin3.weight'\]"):
        PerceptualLoss.from_file(path)
    path = write_random_perceptual_weights(tmp_path / "bad.safetensors", reshape="features.28.weight")
    with pytest.raises(EmuError, match=r"bad\.safetensors: shape mismatch for features\.28\.weight"):
        PerceptualLoss.from_file(path)


# -----------------------------------------------------------------------------
# metrics

def test_identical_images_have_ssim_1_and_infinite_psnr():
    x = images(4)
    assert torch.allclose(ssim(x, x), torch.ones(4))
    assert torch.isinf(psnr(x, x)).all()


def test_psnr_of_a_constant_offset():
    x = images(3) * 0.8  # stays inside [-1, 1] after the offset
    y = x + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01, PSNR 20 dB
    assert torch.allclose(psnr(x, y), torch.full((3,), 20.0), atol=1e-3)


def test_ssim_decreases_with_noise():
    x = torch.nn.functional.avg_pool2d(images(2, size=64), 4, stride=1, padding=0)  # (2, 3, 61, 61), smooth
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    values = [ssim(x, (x + s * noise).clamp(-1, 1)) for s in (0.02, 0.1, 0.4)]
    assert (values[0] < 1).all() and (values[0] > values[1]).all() and (values[1] > values[2]).all()
    assert psnr(x, x + 0.02 * noise).mean() > psnr(x, x + 0.1 * noise).mean()



def test_ssim_of_constant_images_is_the_luminance_term():
    # Flat images have no variance and no covariance, so the contrast-structure factor is
    # (0 + C2) / (0 + C2) = 1 and SSIM reduces to (2ab + C1) / (a^2 + b^2 + C1) for the two grey levels.
    c1 = 0.01 ** 2
    for a, b in [(0.2, 0.7), (0.5, 0.5), (0.9, 0.1), (0.0, 1.0)]:
        x = torch.full((1, 3, 16, 16), 2 * a - 1, dtype=torch.float64)
        y = torch.full((1, 3, 16, 16), 2 * b - 1, dtype=torch.float64)
        expected = (2 * a * b + c1) / (a * a + b * b + c1)
        assert ssim(x, y).item() == pytest.approx(expected, rel=1e-9)


def wave_pair():
    """Two smooth, different, deterministic (3, 24, 20) images in [0, 1] defined by formulas."""
    yy, xx = torch.meshgrid(torch.arange(24, dtype=torch.float64), torch.arange(20, dtype=torch.float64), indexing="ij")
    a = torch.stack([0.5 + 0.4 * torch.sin(xx / 3.0 + c) * torch.cos(yy / 4.0) for c in range(3)])
    b = torch.stack([(0.5 + 0.35 * torch.sin(xx / 3.2 + c) * torch.cos(yy / 3.7) + 0.05 * torch.cos(xx * yy / 7.0)).clamp(0, 1)
                     for c in range(3)])
    return a, b


def test_ssim_matches_a_published_implementation():
    # The value scikit-image 0.26.0 gives for these two images with Wang et al.'s settings:
    # skimage.metrics.structural_similarity(a, b, channel_axis=0, data_range=1.0, gaussian_weights=True,
    # sigma=1.5, use_sample_covariance=False) -> 0.8646901987765648.
    a, b = wave_pair()
    assert ssim(a[None] * 2 - 1, b[None] * 2 - 1).item() == pytest.approx(0.8646901987765648, abs=1e-10)


def test_ssim_matches_a_window_by_window_reference():
    # The definition written out: at every valid window position, Gaussian-weighted means, variances and
    # covariance of the two patches, the SSIM formula, then the mean over positions and channels.
    a, b = wave_pair()
    k, sigma, c1, c2 = 11, 1.5, 0.01 ** 2, 0.03 ** 2
    g = [math.exp(-((i - (k - 1) / 2) ** 2) / (2 * sigma ** 2)) for i in range(k)]
    weights = torch.tensor([[gi * gj for gj in g] for gi in g], dtype=torch.float64)
    weights = weights / weights.sum()
    values = []
    for c in range(3):
        for i in range(a.shape[1] - k + 1):
            for j in range(a.shape[2] - k + 1):
                p, q = a[c, i:i + k, j:j + k], b[c, i:i + k, j:j + k]
                mp, mq = (weights * p).sum(), (weights * q).sum()
                vp, vq = (weights * (p - mp) ** 2).sum(), (weights * (q - mq) ** 2).sum()
                cov = (weights * (p - mp) * (q - mq)).sum()
                values.append(((2 * mp * mq + c1) * (2 * cov + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2))).item())
    reference = sum(values) / len(values)
    assert ssim(a[None] * 2 - 1, b[None] * 2 - 1).item() == pytest.approx(reference, abs=1e-12)
    # The same images in float32 (as the models give them) agree to float32 precision.
    assert ssim(a[None].float() * 2 - 1, b[None].float() * 2 - 1).item() == pytest.approx(reference, abs=1e-5)

# -----------------------------------------------------------------------------
# train_ae.py end to end

@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    from emu.datasets import toyworld
    root = tmp_path_factory.mktemp("toy") / "haystack"
    toyworld.write_folder(str(root), toyworld.make_haystack(40, seed=0, size=32))
    return root


def run_train_ae(data, out, *flags):
    import train_ae
    args = train_ae.build_parser().parse_args(["--data", str(data), "--out", str(out), "--bs", "8", "--holdout", "8",
                                               "--adversarial", "--disc-start", "2", "--warmup", "2", "--log-every", "1",
                                               "--eval-every", "2", "--save-every", "2", "--device", "cpu", *flags])
    train_ae.main(args)


def test_train_ae_writes_model_and_metrics_then_resumes_bitwise(toy_folder, tmp_path):
    out = tmp_path / "ae"
    run_train_ae(toy_folder, out, "--steps", "3")
    for name in ("ckpt.pt", "config.json", "model.safetensors", "metrics.json"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["latent_channels"] == 16 and metrics["fourier"] is True
    assert math.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] <= 1
    ae = load_autoencoder(out)
    assert ae.encode(images()).std().item() == pytest.approx(1.0, abs=0.5)  # scale_factor was set

    run_train_ae(toy_folder, out, "--steps", "5", "--resume", "auto")
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 5 and json.loads((out / "metrics.json").read_text())["steps"] == 5

    straight = tmp_path / "straight"
    run_train_ae(toy_folder, straight, "--steps", "5")
    unbroken = torch.load(straight / "ckpt.pt", weights_only=True)
    for key in ("model", "disc"):
        for name, value in unbroken[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key}.{name} differs after resume"


def test_toy_autoencoder_trains_without_the_adversarial_loss_unless_asked(toy_folder, tmp_path):
    import train_ae
    args = train_ae.build_parser().parse_args(["--data", str(toy_folder), "--out", str(tmp_path / "plain"), "--bs", "8",
                                               "--holdout", "8", "--disc-start", "0", "--steps", "2", "--device", "cpu"])
    train_ae.main(args)
    assert args.adversarial is False and args.cooldown == 0  # a third of 2 steps
    logs = [json.loads(line) for line in open(tmp_path / "plain" / "metrics.jsonl")]
    assert [d["adv_weight"] for d in logs if "adv_weight" in d] == [0.0] and all(d.get("disc", 0.0) == 0.0 for d in logs)
    run_train_ae(toy_folder, tmp_path / "adv", "--steps", "4")  # --adversarial from step 2
    logs = [json.loads(line) for line in open(tmp_path / "adv" / "metrics.jsonl") if "adv_weight" in line]
    assert [d["adv_weight"] for d in logs[:2]] == [0.0, 0.0] and all(d["adv_weight"] > 0 for d in logs[2:])


def test_train_ae_learning_rate_warms_up_holds_and_cools_down():
    import train_ae
    args = train_ae.build_parser().parse_args(["--lr", "1e-3", "--warmup", "10", "--steps", "100", "--cooldown", "40"])
    lrs = [train_ae.learning_rate(step, args) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10:61] == [pytest.approx(1e-3)] * 51  # stable until 40 steps are left
    assert lrs[80] == pytest.approx(1e-3 * 20 / 40) and lrs[99] == pytest.approx(1e-3 / 40)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    args.cooldown = 0  # the default: constant after the warm-up
    assert train_ae.learning_rate(99, args) == pytest.approx(1e-3)


def test_train_ae_flags_pick_the_table_1_variant(toy_folder, tmp_path):
    run_train_ae(toy_folder, tmp_path, "--steps", "1", "--latent-channels", "4", "--no-fourier")
    ae = load_autoencoder(tmp_path)
    assert ae.cfg.latent_channels == 4 and ae.cfg.fourier is False
    assert json.loads((tmp_path / "metrics.json").read_text())["latent_channels"] == 4


def test_train_ae_fourier_scale_flag_sets_the_saved_frequencies(toy_folder, tmp_path):
    run_train_ae(toy_folder, tmp_path, "--steps", "1", "--fourier-scale", "0.3")
    ae = load_autoencoder(tmp_path)
    assert ae.cfg.fourier_scale == 0.3 and PRESETS["toy"].fourier_scale == 0.1
    expected = FourierFeatures(ae.cfg.fourier_features, 0.3, ae.cfg.fourier_seed).freqs
    assert torch.equal(ae.fourier.freqs, expected)


def test_train_ae_without_data_says_how_to_make_it(tmp_path):
    result = script("train_ae.py", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "ae"), timeout=120)
    assert result.returncode != 0
    assert "run python data/make_toy.py first" in result.stderr and "Traceback" not in result.stderr


def test_pca_start_makes_the_untrained_autoencoder_the_whitened_pca_code():
    from emu.models.autoencoder import init_patch_paths_from_pca
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(64, 3, 8, 8, generator=g), size=32, mode="bilinear") * 2 - 1
    for fourier in (True, False):
        ae = Autoencoder(small_config(fourier=fourier)).eval()
        db = init_patch_paths_from_pca(ae, smooth)
        mean, logvar = ae.posterior(smooth)
        recon = ae.decoder(mean)
        assert psnr(recon, smooth).mean().item() == pytest.approx(db, abs=1.0)  # per-image mean vs pooled
        mse = (recon - smooth).square().mean().item()
        assert 10 * math.log10(4.0 / mse) == pytest.approx(db, abs=1e-3)
        # whitened: each latent channel has unit variance over the patches; and a narrow posterior
        assert mean.transpose(0, 1).flatten(1).var(dim=1).tolist() == pytest.approx([1.0] * 16, rel=0.02)
        assert torch.allclose(logvar, torch.full_like(logvar, -4.0))
        # a code of 16 of 48 dimensions of smooth images loses little; a random start reconstructs nothing
        assert db > 30
        assert psnr(Autoencoder(small_config(fourier=fourier)).decoder(mean), smooth).mean().item() < 15


def test_train_ae_pca_start_prints_the_pca_code_and_is_refused_for_vq_tokenizers(toy_folder, tmp_path, capsys):
    run_train_ae(toy_folder, tmp_path / "ae", "--steps", "1", "--pca-start")
    assert "started from the PCA code of 4x4 patches:" in capsys.readouterr().out
    result = script("train_ae.py", "--arch", "muse", "--pca-start", "--data", str(toy_folder), "--out", str(tmp_path / "vq"),
                    timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: --pca-start needs an autoencoder with shortcut paths (the toy presets), "
                                     "not --arch muse --preset toy")
