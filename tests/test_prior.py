"""Kandinsky's image priors (emu/variants/prior.py): caption embedding -> CLIP image embedding."""
import pytest
import torch

from emu.variants.prior import (PRIOR_PRESETS, DiffusionPrior, DiffusionPriorConfig, EmbeddingNorm, LinearPrior,
                                build_prior, cosine_similarity, count_parameters, prior_config)
from emu.text.encoder import TextEmbedding

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def captions(n, seed=0, dim=16, length=6):
    """A TextEmbedding of random caption states; the pooled vector is the mean of each row's real
    tokens, as a caption's summary would be; rows have 3 to `length` real tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    tokens = torch.randn(n, length, dim, generator=g) * mask[..., None]
    pooled = tokens.sum(1) / lengths[:, None]
    return TextEmbedding(clip=tokens, clip_mask=mask, t5=torch.zeros(n, 1, 4), t5_mask=torch.ones(n, 1, dtype=torch.bool),
                         pooled=pooled)


def image_embeddings(text, seed=1, dim=12):
    """A fixed function of the caption: an image embedding with its own offset and scale per coordinate."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(text.pooled.shape[1], dim, generator=g)
    return 3.0 + 2.0 * torch.tanh(text.pooled @ a)


def test_embedding_norm_standardises_and_inverts():
    x = torch.randn(200, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + torch.arange(5.0)
    norm = EmbeddingNorm(5).fit(x)
    z = norm.normalize(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.denormalize(z), x, atol=1e-5, rtol=0)


def test_the_linear_prior_recovers_a_linear_map_in_closed_form():
    text = captions(300)
    w, b = torch.randn(16, 12), torch.randn(12)
    images = text.pooled @ w + b
    prior = LinearPrior(16, 12).fit(text.pooled, images, ridge=1e-8)
    torch.testing.assert_close(prior(text), images, atol=1e-3, rtol=1e-3)
    assert cosine_similarity(prior(captions(50, seed=7)), captions(50, seed=7).pooled @ w + b).min() > 0.999


def test_the_ridge_penalty_shrinks_the_map():
    text = captions(100)
    images = image_embeddings(text)
    small, large = (LinearPrior(16, 12).fit(text.pooled, images, ridge=r) for r in (1e-4, 10.0))
    assert large.proj.weight.norm() < 0.2 * small.proj.weight.norm()
    # the bias is not penalised: a map shrunk to nothing predicts the mean image embedding
    torch.testing.assert_close(large(text).mean(0), images.mean(0), atol=1e-3, rtol=0)


def test_the_diffusion_prior_predicts_from_the_real_tokens_only():
    torch.manual_seed(0)
    prior = DiffusionPrior(DiffusionPriorConfig(image_dim=12, text_dim=16, token_dim=16, width=32, depth=2, heads=2)).eval()
    text = captions(3)
    x, t = torch.randn(3, 12), torch.tensor([5, 500, 990])
    out = prior(x, t, text)
    assert out.shape == (3, 12)
    padded = TextEmbedding(clip=torch.cat([text.clip, 9 * torch.randn(3, 4, 16)], 1),
                           clip_mask=torch.cat([text.clip_mask, torch.zeros(3, 4, dtype=torch.bool)], 1),
                           t5=text.t5, t5_mask=text.t5_mask, pooled=text.pooled)
    torch.testing.assert_close(prior(x, t, padded), out, atol=1e-5, rtol=1e-5)
    changed = TextEmbedding(clip=text.clip, clip_mask=text.clip_mask, t5=text.t5, t5_mask=text.t5_mask,
                            pooled=text.pooled + 1)
    assert not torch.allclose(prior(x, t, changed), out)


@pytest.mark.slow
def test_the_diffusion_prior_learns_and_its_guidance_moves_towards_the_caption():
    """Trained on a fixed caption -> embedding function, it predicts held-out captions' embeddings
    (cosine above the mean embedding's); a guidance scale of 1 is the conditional model alone."""
    torch.manual_seed(0)
    cfg = DiffusionPriorConfig(image_dim=12, text_dim=16, token_dim=16, width=64, depth=2, heads=4, timesteps=200)
    prior = DiffusionPrior(cfg)
    train, test = captions(512), captions(64, seed=9)
    images = image_embeddings(train)
    prior.norm.fit(images)
    empty = captions(1, seed=5)
    empty = TextEmbedding(clip=torch.zeros_like(empty.clip), clip_mask=empty.clip_mask, t5=empty.t5, t5_mask=empty.t5_mask,
                          pooled=torch.zeros_like(empty.pooled))
    opt = torch.optim.AdamW(prior.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(400):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = prior.training_loss(images[idx], train[idx], empty, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    uncond = TextEmbedding.cat([empty] * 64)
    truth = image_embeddings(test)
    guided = prior.generate(test, uncond, steps=10, cfg_scale=2.0, generator=torch.Generator().manual_seed(3))
    baseline = cosine_similarity(images.mean(0).expand_as(truth), truth).mean()
    assert cosine_similarity(guided, truth).mean() > baseline + 0.5 * (1 - baseline)
    one = prior.generate(test, uncond, steps=10, cfg_scale=1.0, generator=torch.Generator().manual_seed(3))
    model_fn_alone = prior.norm.denormalize(prior.diffusion.sample(
        lambda x, t: prior(x, t, test), torch.randn(64, 12, generator=torch.Generator().manual_seed(3)), steps=10))
    torch.testing.assert_close(one, model_fn_alone)


def test_priors_rebuild_from_their_config():
    linear = LinearPrior(16, 12)
    assert isinstance(build_prior(prior_config(linear)), LinearPrior)
    cfg = DiffusionPriorConfig(image_dim=12, text_dim=16, token_dim=16, width=32, depth=1, heads=2)
    rebuilt = build_prior(prior_config(DiffusionPrior(cfg)))
    assert isinstance(rebuilt, DiffusionPrior) and rebuilt.cfg == cfg
    with pytest.raises(ValueError, match="unknown prior kind 'mlp'"):
        build_prior({"kind": "mlp"})


def test_the_real_preset_has_the_papers_size():
    # "num_layers=20, num_heads=32, and hidden_size=2048"; Table 2 rounds it to 1B
    assert 0.95e9 < count_parameters(PRIOR_PRESETS["kandinsky"]) < 1.1e9
