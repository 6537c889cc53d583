import pytest
import torch

from emu.diffusion import GaussianDiffusion, classifier_free_guidance, dynamic_threshold, make_betas, sample_noise
from emu.text.encoder import TextEmbedding


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_is_monotone_and_in_range(schedule):
    d = GaussianDiffusion(schedule, 1000)
    ab = d.alphas_cumprod
    assert torch.all(ab[1:] < ab[:-1])
    assert 0 < ab[-1] < ab[0] < 1


def test_schedule_endpoints():
    assert make_betas("linear", 1000)[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    assert make_betas("scaled_linear", 1000)[[0, -1]].tolist() == pytest.approx([0.00085, 0.012])
    assert make_betas("cosine", 1000).max() <= 0.999
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_betas("quadratic", 10)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_matches_iterated_forward_process_in_distribution(schedule):
    d = GaussianDiffusion(schedule, 1000)
    torch.manual_seed(0)
    x0 = torch.tensor([1.0, -0.5, 0.25]).repeat(40000, 1)  # many copies of one point
    t = 300
    x = x0.clone().double()
    for beta in d.betas[: t + 1]:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn_like(x)
    closed = d.q_sample(x0, torch.full((len(x0),), t), torch.randn_like(x0))
    ab = d.alphas_cumprod[t].item()
    assert x.mean(0).float().tolist() == pytest.approx((ab ** 0.5 * x0[0]).tolist(), abs=0.02)
    assert closed.mean(0).tolist() == pytest.approx((ab ** 0.5 * x0[0]).tolist(), abs=0.02)
    assert x.std(0).float().tolist() == pytest.approx([(1 - ab) ** 0.5] * 3, abs=0.02)
    assert closed.std(0).tolist() == pytest.approx([(1 - ab) ** 0.5] * 3, abs=0.02)


def test_noise_offset_changes_only_the_per_channel_mean():
    x = torch.zeros(4, 3, 8, 8)
    plain = sample_noise(x, 0.0, torch.Generator().manual_seed(1))
    offset = sample_noise(x, 0.1, torch.Generator().manual_seed(1))
    diff = offset - plain  # (B, C, H, W), constant over H and W
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))
    assert diff.abs().max() > 0
    big = sample_noise(torch.zeros(20000, 1, 2, 2), 0.5, torch.Generator().manual_seed(2))
    per_map_mean = big.mean(dim=(2, 3)).flatten()
    # each map's mean carries the offset: variance 0.5^2 from the offset plus 1/4 from the 4 pixels
    assert per_map_mean.var().item() == pytest.approx(0.25 + 0.25, rel=0.05)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_target_inverts_to_x0_and_eps(prediction):
    d = GaussianDiffusion("scaled_linear", 1000, prediction)
    x0, noise = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = d.q_sample(x0, t, noise)
    x0_hat, eps_hat = d.predict_x0_eps(d.target(x0, t, noise), x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, noise, atol=1e-4)


def test_ddim_with_eta_one_matches_ddpm_posterior():
    d = GaussianDiffusion("scaled_linear", 1000)
    torch.manual_seed(0)
    x0 = torch.randn(1, 3).expand(50000, 3)
    x_t = d.q_sample(x0[:1], torch.tensor([600]), torch.randn(1, 3)).expand(50000, 3)
    t, s = torch.full((50000,), 600), torch.full((50000,), 400)
    eps = (x_t - d._ab(t, x_t).sqrt() * x0) / (1 - d._ab(t, x_t)).sqrt()
    a = d.ddpm_step(x0, x_t, t, s, torch.Generator().manual_seed(1))
    b = d.ddim_step(x0, eps, x_t, t, s, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(a.mean(0), b.mean(0), atol=0.01) and torch.allclose(a.std(0), b.std(0), atol=0.01)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_sampler_with_oracle_model_recovers_a_single_point_data_set(sampler, prediction):
    # for data that is one point x*, the ideal model output is known in closed form
    d = GaussianDiffusion("scaled_linear", 1000, prediction)
    target = torch.tensor([[0.7, -1.2, 0.3]])

    def oracle(x, t):
        ab = d._ab(t, x)
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return d.target(target.expand_as(x), t, eps)

    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    out = d.sample(oracle, noise, steps=10, sampler=sampler, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, target.expand_as(out), atol=1e-4)


def _text(batch, value):
    return TextEmbedding(clip=torch.full((batch, 3, 2), value), clip_mask=torch.ones(batch, 3, dtype=torch.bool),
                         t5=torch.full((batch, 2, 2), value), t5_mask=torch.ones(batch, 2, dtype=torch.bool),
                         pooled=torch.full((batch, 2), value))


def test_classifier_free_guidance_combines_conditional_and_unconditional():
    calls = []

    def model(x, t, text):
        calls.append(len(x))
        return x + text.pooled[:, :1, None, None]  # depends on the text

    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    cond, uncond = _text(2, 3.0), _text(2, 1.0)
    out = classifier_free_guidance(model, x, t, cond, uncond, scale=4.0)
    assert torch.allclose(out, torch.full_like(out, 1.0 + 4.0 * (3.0 - 1.0)))
    assert calls == [4]  # conditional and unconditional in one batched call
    assert torch.allclose(classifier_free_guidance(model, x, t, cond, uncond, scale=1.0), torch.full_like(out, 3.0))


def test_dynamic_threshold_leaves_an_image_within_range_unchanged():
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.equal(dynamic_threshold(x0), x0)


def test_dynamic_threshold_maps_the_percentile_to_one_image_by_image():
    inside = torch.linspace(-0.9, 0.9, 100)
    outside = torch.arange(1, 101) / 10.0  # 0.1 .. 10.0: the median of |x| is 5.05
    x0 = torch.stack([inside, outside]).view(2, 1, 10, 10)
    out = dynamic_threshold(x0, percentile=0.5)
    assert torch.equal(out[0], x0[0])  # per image: the outlier image does not rescale its neighbour
    expected = outside.clamp(max=5.05) / 5.05
    torch.testing.assert_close(out[1].flatten(), expected)
    assert out.abs().max() <= 1
    # on random data, the percentile is torch.quantile's
    x0 = 4 * torch.randn(3, 3, 8, 8)
    s = torch.quantile(x0.abs().flatten(1), 0.995, dim=1).clamp(min=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(dynamic_threshold(x0), x0.clamp(-s, s) / s)
    assert dynamic_threshold(x0).abs().amax(dim=(1, 2, 3)).tolist() == [1.0] * 3  # the top 0.5% all map to +-1


def _reference_sample(d, model_fn, noise, steps, sampler, eta, generator):
    """The sampler as a plain loop of predict and step, as it was before thresholding options."""
    x, ts = noise, d.timesteps(steps)
    for t_now, t_next in zip(ts[:-1], ts[1:]):
        t, s = t_now.expand(len(x)), t_next.expand(len(x))
        x0, eps = d.predict_x0_eps(model_fn(x, t), x, t)
        x = d.ddpm_step(x0, x, t, s, generator) if sampler == "ddpm" else d.ddim_step(x0, eps, x, t, s, eta, generator)
    return x


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_without_thresholding_is_bitwise_the_plain_loop(sampler):
    d = GaussianDiffusion("scaled_linear", 1000, "eps")
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    model_fn = lambda x, t: torch.tanh(x @ w) * (1 + t[:, None] / 1000)  # an arbitrary fixed "model"
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    out = d.sample(model_fn, noise, steps=6, sampler=sampler, eta=0.5, generator=torch.Generator().manual_seed(2))
    ref = _reference_sample(d, model_fn, noise, 6, sampler, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_sampling_from_a_start_step_runs_the_schedule_counted_from_there(spacing):
    """sample(start=t0): SDEdit's reverse process from a sample already at step t0. Its timesteps are the
    schedule counted from t0 instead of T-1 (start T-1 is the default exactly), and it is the plain loop
    over them."""
    d = GaussianDiffusion("scaled_linear", 1000, "eps", spacing=spacing)
    assert torch.equal(d.timesteps(25, start=999), d.timesteps(25))
    ts = d.timesteps(5, start=400)
    assert ts[-1] == -1 and len(ts) == 6 and (ts[:-1].diff() < 0).all()
    assert ts.tolist() == ([400, 300, 200, 100, 0, -1] if spacing == "linspace" else [400, 320, 240, 159, 79, -1])
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    model_fn = lambda x, t: torch.tanh(x @ w) * (1 + t[:, None] / 1000)
    x_start = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    out = d.sample(model_fn, x_start, steps=5, start=400)
    x = x_start
    for t_now, t_next in zip(ts[:-1], ts[1:]):
        t, s = t_now.expand(len(x)), t_next.expand(len(x))
        x0, eps = d.predict_x0_eps(model_fn(x, t), x, t)
        x = d.ddim_step(x0, eps, x, t, s)
    assert torch.equal(out, x)


def test_the_sampling_callback_sees_every_step_changes_nothing_and_can_stop_it():
    d = GaussianDiffusion("scaled_linear", 1000, "eps")
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    model_fn = lambda x, t: torch.tanh(x @ w)
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    seen = []
    out = d.sample(model_fn, noise, steps=5, callback=lambda i, n, x0: seen.append((i, n, x0.shape)))
    assert seen == [(i, 5, (4, 3)) for i in range(1, 6)] and torch.equal(out, d.sample(model_fn, noise, steps=5))

    class Stop(Exception):
        pass

    def stop_at_two(i, n, x0):
        if i == 2:
            raise Stop
    with pytest.raises(Stop):
        d.sample(model_fn, noise, steps=5, callback=stop_at_two)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_thresholds_dynamically_only_when_estimates_leave_the_range(sampler):
    d = GaussianDiffusion("cosine", 1000, "eps")

    def oracle_for(target):
        def oracle(x, t):
            ab = d._ab(t, x)
            return (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return oracle

    noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    run = lambda target, **kw: d.sample(oracle_for(target), noise, steps=10, sampler=sampler,
                                        generator=torch.Generator().manual_seed(1), **kw)
    inside = torch.tensor([[0.7, -0.9, 0.3, 0.0]])
    assert torch.equal(run(inside, threshold_percentile=0.995), run(inside))
    outside = torch.tensor([[3.0, -1.5, 0.3, 0.0]])
    assert torch.allclose(run(outside), outside.expand(6, 4), atol=1e-3)
    thresholded = run(outside, threshold_percentile=0.995)
    assert torch.allclose(thresholded, dynamic_threshold(outside, 0.995).expand(6, 4), atol=1e-3)
    assert thresholded.abs().max() <= 1 + 1e-4


@pytest.mark.parametrize("limit", [{"threshold_percentile": 0.995}, {"clip_x0": 1.0}])
def test_ddim_heads_for_the_clipped_estimate_as_ddpm_does(limit):
    """DDIM with eta 1 is the DDPM posterior given x0 and x_t; with the x0 estimate pulled back into
    [-1, 1] it must stay so, or its step pairs the kept x0 with the noise of the overshooting one."""
    d = GaussianDiffusion("cosine", 1000, "v")
    overshooting = lambda x, t: 3.0 * x + 0.5  # a model whose x0 estimates leave [-1, 1] at every step
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda sampler, eta: d.sample(overshooting, noise, steps=10, sampler=sampler, eta=eta,
                                        generator=torch.Generator().manual_seed(1), **limit)
    ddpm, ddim = run("ddpm", 0.0), run("ddim", 1.0)
    assert torch.allclose(ddim, ddpm, atol=1e-4)
    assert not torch.allclose(run("ddim", 0.0), ddpm, atol=1e-2)  # eta 0 is another sampler: the check can tell


def test_classifier_free_guidance_passes_model_kwargs_to_both_halves():
    seen = []

    def model(x, t, text, cond):
        seen.append(cond.clone())
        return x + cond + text.pooled[:, :1, None, None]

    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    cond = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    out = classifier_free_guidance(model, x, t, _text(2, 3.0), _text(2, 1.0), scale=4.0, model_kwargs={"cond": cond})
    assert torch.equal(seen[0], torch.cat([cond, cond]))
    assert torch.allclose(out, cond + 1.0 + 4.0 * (3.0 - 1.0))
    assert torch.allclose(classifier_free_guidance(model, x, t, _text(2, 3.0), None, 1.0, {"cond": cond}), cond + 3.0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weighting_caps_each_steps_clean_sample_weight_at_gamma(prediction):
    """Converted to an error of the clean sample, every prediction's weighted loss at step t weighs
    min(SNR(t), gamma): the eps loss is x0's times SNR, v's is x0's times SNR + 1."""
    d = GaussianDiffusion("scaled_linear", 1000, prediction, min_snr_gamma=5.0)
    t = torch.arange(0, 1000, 37)
    ab = d.alphas_cumprod[t]
    snr = ab / (1 - ab)
    implied = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
    torch.testing.assert_close((d.loss_weight(t) * implied).double(), snr.clamp(max=5.0), rtol=1e-4, atol=1e-8)
    if prediction != "x0":  # the nearly clean steps lose almost all their weight
        assert (d.loss_weight(t)[snr > 5] < 1).all() and d.loss_weight(torch.tensor([0]))[0] < 0.01


def test_weighted_loss_is_the_per_sample_mse_times_the_weight_and_gamma_zero_is_plain_mse():
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, noise = torch.tensor([0, 10, 200, 500, 800, 999]), torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    model = lambda x, t, text: 0.5 * x
    plain = GaussianDiffusion("scaled_linear", 1000, "v")
    weighted = GaussianDiffusion("scaled_linear", 1000, "v", min_snr_gamma=5.0)
    per_sample = (model(plain.q_sample(x0, t, noise), t, None) - plain.target(x0, t, noise)).square().mean(dim=(1, 2, 3))
    assert plain.training_loss(model, x0, None, t=t, noise=noise).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    expected = (per_sample * weighted.loss_weight(t)).mean().item()
    assert weighted.training_loss(model, x0, None, t=t, noise=noise).item() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(per_sample.mean().item(), rel=1e-2)


def test_guidance_rescale_brings_each_rows_spread_back_to_the_conditional_outputs():
    torch.manual_seed(0)
    pattern, other = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def model(x, t, text):  # caption value 1: `pattern`; the empty caption's 0.1: a tenth of it plus `other`
        value = text.pooled[:, :1, None, None]
        return pattern.repeat(len(x) // 2, 1, 1, 1) * value + other.repeat(len(x) // 2, 1, 1, 1) * (value < 0.5)

    x, t = torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    cond, uncond = _text(2, 1.0), _text(2, 0.1)
    plain = classifier_free_guidance(model, x, t, cond, uncond, scale=5.0)
    assert torch.allclose(plain, 0.1 * pattern + other + 5.0 * (0.9 * pattern - other))
    assert torch.equal(classifier_free_guidance(model, x, t, cond, uncond, scale=5.0, rescale=0.0), plain)
    full = classifier_free_guidance(model, x, t, cond, uncond, scale=5.0, rescale=1.0)
    # every row is the guided output scaled to the conditional output's standard deviation
    row_std = lambda v: v.flatten(1).std(dim=1)
    assert torch.allclose(row_std(full), row_std(pattern))
    assert torch.allclose(full, plain * (row_std(pattern) / row_std(plain)).view(2, 1, 1, 1))
    # phi blends the two
    assert torch.allclose(classifier_free_guidance(model, x, t, cond, uncond, scale=5.0, rescale=0.7), 0.7 * full + 0.3 * plain)
    # no guidance, nothing to rescale
    assert torch.equal(classifier_free_guidance(model, x, t, cond, uncond, scale=1.0, rescale=0.7), pattern)
    with pytest.raises(ValueError, match=r"guidance rescale must be in \[0, 1\], got 1.5"):
        classifier_free_guidance(model, x, t, cond, uncond, scale=5.0, rescale=1.5)
