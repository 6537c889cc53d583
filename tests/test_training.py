import pickle

import pytest
import torch

from emu import EmuError
from emu.models.autoencoder import PRESETS, Autoencoder
from emu.datasets.folders import Skipped, collate
from emu.text.encoder import TextEncoder, make_toy_towers
from emu.text.encoder import drop_captions
from emu.training.loop import LatentBatches

CAPTIONS = ["a red circle", "two blue squares on the left", "a green triangle at the top on a grey background",
            "three yellow circles", "a purple square in the centre", "one red triangle", "", "blue"]


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    torch.manual_seed(0)
    ae = Autoencoder(PRESETS["toy"]).eval().requires_grad_(False)
    clip_dir, t5_dir, _ = make_toy_towers(CAPTIONS, tmp_path_factory.mktemp("towers"), seed=0)
    text_encoder = TextEncoder.load(clip_dir, t5_dir)
    return ae, text_encoder


def dataset(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 32, 32, generator=gen) * 2 - 1, CAPTIONS[i % len(CAPTIONS)]) for i in range(n)]


def test_cached_and_streamed_batches_are_the_same(frozen):
    ae, text_encoder = frozen
    data = dataset()
    cached = LatentBatches(data, ae, text_encoder, batch_size=4, seed=3, start_step=2, cache_mb=100)
    streamed = LatentBatches(data, ae, text_encoder, batch_size=4, seed=3, start_step=2, cache_mb=0)
    assert cached.cache is not None and streamed.cache is None
    assert "encoded once" in cached.describe() and "batch by batch" in streamed.describe()
    for _, (a, b) in zip(range(5), zip(cached, streamed)):  # crosses an epoch boundary (3 batches per epoch)
        (lat_a, text_a), (lat_b, text_b) = a, b
        torch.testing.assert_close(lat_a, lat_b, rtol=1e-5, atol=1e-5)
        text_a, text_b = text_a.without_padding(), text_b.without_padding()
        assert torch.equal(text_a.clip_mask, text_b.clip_mask) and torch.equal(text_a.t5_mask, text_b.t5_mask)
        torch.testing.assert_close(text_a.clip[text_a.clip_mask], text_b.clip[text_b.clip_mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text_a.t5[text_a.t5_mask], text_b.t5[text_b.t5_mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text_a.pooled, text_b.pooled, rtol=1e-5, atol=1e-5)


def test_cache_respects_its_memory_limit(frozen):
    ae, text_encoder = frozen
    size = LatentBatches(dataset(), ae, text_encoder, batch_size=4, seed=0, cache_mb=0).cache_mb
    assert size > 0
    assert LatentBatches(dataset(), ae, text_encoder, batch_size=4, seed=0, cache_mb=size * 1.01).cache is not None
    assert LatentBatches(dataset(), ae, text_encoder, batch_size=4, seed=0, cache_mb=size * 0.99).cache is None


def test_caption_dropout_swaps_in_the_empty_caption(frozen):
    _, text_encoder = frozen
    text = text_encoder.encode(CAPTIONS[:6]).without_padding()
    empty = text_encoder.encode([""])
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(drop_captions(text, empty, 0.0, gen).clip, text.clip)
    dropped = drop_captions(text, empty, 1.0, gen)
    reference = text_encoder.encode([""] * 6)
    for name in ("clip_mask", "t5_mask"):
        used = getattr(reference, name)[:, :getattr(text, name).shape[1]]
        assert torch.equal(getattr(dropped, name), used)
    torch.testing.assert_close(dropped.pooled, reference.pooled)
    # about half the rows with p = 0.5, and exactly those rows changed
    keep = torch.rand(6, generator=torch.Generator().manual_seed(7)) >= 0.5
    half = drop_captions(text, empty, 0.5, torch.Generator().manual_seed(7))
    for i in range(6):
        assert torch.equal(half.pooled[i], text.pooled[i] if keep[i] else empty.pooled[0])


class WithBadFiles:
    """A dataset like ImageCaptionFolder(skip_bad=True) whose items at `bad` are unusable files."""

    def __init__(self, items, bad):
        self.items, self.bad = items, set(bad)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return Skipped(f"img{i}.png", "truncated or corrupt") if i in self.bad else self.items[i]


def test_unusable_images_are_left_out_and_counted(frozen, capsys):
    ae, text_encoder = frozen
    items = dataset(12)
    data = WithBadFiles(items, bad={2, 7})
    cached = LatentBatches(data, ae, text_encoder, batch_size=4, seed=0, cache_mb=100)
    assert len(cached.cache[0]) == 10
    good = torch.stack([items[i][0] for i in range(12) if i not in (2, 7)])
    torch.testing.assert_close(cached.cache[0], ae.encode(good), rtol=1e-5, atol=1e-5)
    assert cached.skipped == {"img2.png": "truncated or corrupt", "img7.png": "truncated or corrupt"}
    assert cached.skipped.summary() == "skipped 2 unusable samples (truncated or corrupt: 2)"
    assert "skipping img2.png: truncated or corrupt" in capsys.readouterr().out

    streamed = LatentBatches(data, ae, text_encoder, batch_size=4, seed=0, cache_mb=0)
    sizes = [len(latents) for _, (latents, _) in zip(range(6), streamed)]  # two epochs of 3 batches
    assert sum(sizes) == 2 * 10 and min(sizes) >= 2
    assert set(streamed.skipped) == {"img2.png", "img7.png"}

    hopeless = WithBadFiles(items, bad=set(range(1, 12)))  # only image 0 is readable
    with pytest.raises(EmuError, match="every sample of a batch was unusable"):
        list(zip(range(6), LatentBatches(hopeless, ae, text_encoder, batch_size=4, seed=0, cache_mb=0)))


def test_batches_keep_their_skipped_list_through_pickling():
    batch = collate([(torch.zeros(3, 2, 2), "a"), Skipped("x.png", "empty file"), (torch.ones(3, 2, 2), "b")])
    images, captions = batch
    assert images.shape == (2, 3, 2, 2) and captions == ["a", "b"]
    again = pickle.loads(pickle.dumps(batch))  # how a DataLoader worker hands a batch over
    assert again.skipped == [Skipped("x.png", "empty file")] and again[1] == ["a", "b"]


def test_learning_rate_warms_up_holds_and_cools_down_to_zero():
    """Warm-up, stable, decay: the schedule pretrain.py runs (and train_ae.py's learning rate)."""
    from emu.training.loop import learning_rate_factor, warmup_schedule
    factors = [learning_rate_factor(step, 10, 100, 40) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert factors[10:61] == [1.0] * 51  # stable until 40 steps are left
    assert factors[80] == pytest.approx(0.5) and factors[99] == pytest.approx(1 / 40) and factors[100] == 0.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert learning_rate_factor(99, 10, 100, 0) == 1.0 and learning_rate_factor(5, 10) == pytest.approx(0.6)
    # the scheduler sets the optimiser's rate to the peak times the factor at every step
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = warmup_schedule(opt, 10, 100, 40)
    for step in range(100):
        assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * factors[step])
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0


def test_a_nan_loss_skips_the_update_and_is_counted():
    """A NaN injected into the loss: the weights and the optimiser state stay as they were, the step is
    reported as skipped and counted; a finite loss then trains again and resets the run of bad steps."""
    from argparse import Namespace
    from test_unet import random_text, toy_unet

    from emu.diffusion import GaussianDiffusion
    from emu.training.loop import count_bad_step, make_optimizer, train_step, warmup_schedule
    torch.manual_seed(0)
    unet = toy_unet()
    args = Namespace(lr=1e-3, weight_decay=0.0, caption_dropout=0.0, noise_offset=0.0, grad_clip=1.0, precision="fp32")
    opt = make_optimizer(unet, args)
    sched = warmup_schedule(opt, 1)
    latents, text = torch.randn(2, 16, 8, 8), random_text(2, unet.cfg)
    empty = random_text(1, unet.cfg)

    class Poisoned(GaussianDiffusion):
        def training_loss(self, *a, **k):
            return super().training_loss(*a, **k) * float("nan")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    bad = {"in_a_row": 0, "total": 0}
    for _ in range(2):
        loss = train_step(unet, Poisoned(), latents, text, empty, opt, sched, gen, args)
        bad = count_bad_step(loss, bad)
        assert loss is None
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items()) and not opt.state
    assert bad == {"in_a_row": 2, "total": 2} and sched.last_epoch == 2  # the schedule follows the steps
    loss = train_step(unet, GaussianDiffusion(), latents, text, empty, opt, sched, gen, args)
    assert isinstance(loss, float) and count_bad_step(loss, bad) == {"in_a_row": 0, "total": 2}
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_bf16_autocast_trains_float32_master_weights_close_to_fp32():
    from argparse import Namespace
    from test_unet import nontrivial_unet, random_text

    from emu.diffusion import GaussianDiffusion
    from emu.training.loop import make_optimizer, train_step, warmup_schedule
    latents, text = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), random_text(2, nontrivial_unet().cfg)
    losses, weights = {}, {}
    for precision in ("fp32", "bf16"):
        unet = nontrivial_unet()
        args = Namespace(lr=1e-3, weight_decay=0.0, caption_dropout=0.0, noise_offset=0.0, grad_clip=1.0, precision=precision)
        opt = make_optimizer(unet, args)
        losses[precision] = train_step(unet, GaussianDiffusion(), latents, text, text[:1], opt, warmup_schedule(opt, 1),
                                       torch.Generator().manual_seed(0), args)
        weights[precision] = unet.conv_out.weight.detach().clone()
        assert {p.dtype for p in unet.parameters()} == {torch.float32}  # master weights
        assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert losses["bf16"] != losses["fp32"] and abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]
    assert not torch.equal(weights["bf16"], weights["fp32"])


def _one_step(unet, latents, text, sgd=False, **flags):
    """The loss and weights after one train_step; with sgd, plain SGD at lr 1 and no clipping, so the
    weights move by exactly minus the gradient."""
    from argparse import Namespace

    from emu.diffusion import GaussianDiffusion
    from emu.training.loop import make_optimizer, train_step, warmup_schedule
    args = Namespace(lr=1e-3, weight_decay=0.0, caption_dropout=0.5, noise_offset=0.1, grad_clip=1e9 if sgd else 1.0,
                     precision="fp32", **flags)
    opt = torch.optim.SGD(unet.parameters(), lr=1.0) if sgd else make_optimizer(unet, args)
    loss = train_step(unet, GaussianDiffusion(), latents, text, text[:1], opt, warmup_schedule(opt, 1),
                      torch.Generator().manual_seed(0), args)
    return loss, {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_gradient_accumulation_takes_the_same_step_as_the_whole_batch():
    """--grad-accum 3 over a batch of 5 (micro-batches of 2, 2, 1) gives the loss and the gradient of
    one pass over the whole batch, up to float rounding."""
    from test_unet import nontrivial_unet, random_text
    latents = torch.randn(5, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    text = random_text(5, nontrivial_unet().cfg, lengths=(5, 7, 3, 9, 2))
    before = nontrivial_unet().state_dict()
    loss_1, weights_1 = _one_step(nontrivial_unet().train(), latents, text, sgd=True, grad_accum=1)
    loss_3, weights_3 = _one_step(nontrivial_unet().train(), latents, text, sgd=True, grad_accum=3)
    assert abs(loss_1 - loss_3) < 1e-6 * loss_1
    grad_1 = torch.cat([(before[k] - weights_1[k]).flatten() for k in before])
    grad_3 = torch.cat([(before[k] - weights_3[k]).flatten() for k in before])
    assert grad_1.abs().max() > 1e-3
    torch.testing.assert_close(grad_3, grad_1, rtol=1e-4, atol=1e-4 * grad_1.abs().max().item())
    # a batch shorter than --grad-accum (a stream's last, a bucket's last) takes the same step, not a NaN
    loss_8, weights_8 = _one_step(nontrivial_unet().train(), latents, text, sgd=True, grad_accum=8)
    assert abs(loss_1 - loss_8) < 1e-6 * loss_1
    torch.testing.assert_close(torch.cat([(before[k] - weights_8[k]).flatten() for k in before]), grad_1,
                               rtol=1e-4, atol=1e-4 * grad_1.abs().max().item())


def test_activation_checkpointing_gives_the_same_gradients():
    """--grad-checkpoint recomputes each U-Net block in the backward pass: the same numbers, bitwise;
    and it really is on (the blocks run forward twice)."""
    from test_unet import nontrivial_unet, random_text
    latents, text = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), random_text(2, nontrivial_unet().cfg)
    plain = nontrivial_unet().train()
    loss_plain, weights_plain = _one_step(plain, latents, text)
    checkpointed = nontrivial_unet().train()
    checkpointed.grad_checkpoint = True
    calls, forward = [], checkpointed.mid[0].res.forward
    checkpointed.mid[0].res.forward = lambda *a: (calls.append(1), forward(*a))[1]
    loss_ckpt, weights_ckpt = _one_step(checkpointed, latents, text)
    assert len(calls) == 2  # forward, then again in backward
    assert loss_plain == loss_ckpt
    assert all(torch.equal(weights_plain[k], weights_ckpt[k]) for k in weights_plain)


def test_stages_parse_with_per_stage_batch_and_the_final_noise_offset():
    from argparse import Namespace

    from emu.training.loop import ResolutionStage, parse_stages, stage_at
    args = Namespace(stages="256:100:64,512:50,1024:20:16:0.05", bs=32, image_size=32, steps=7, noise_offset=0.02)
    stages = parse_stages(args)
    assert stages == [ResolutionStage(256, 100, 64, 0.0), ResolutionStage(512, 50, 32, 0.0), ResolutionStage(1024, 20, 16, 0.05)]
    args.stages = "256:100,1024:20"  # the final stage takes --noise-offset unless told otherwise
    assert [s.noise_offset for s in parse_stages(args)] == [0.0, 0.02]
    args.stages = None  # no --stages: one stage from --image-size, --steps, --bs, --noise-offset
    assert parse_stages(args) == [ResolutionStage(32, 7, 32, 0.02)]
    stages = parse_stages(Namespace(stages="16:3,32:4", bs=8, noise_offset=0.02))
    assert [stage_at(stages, step) for step in (0, 2, 3, 6, 7)] == [(0, 0), (0, 0), (1, 3), (1, 3), (2, 7)]
    for bad in ("256", "256:x", "256:10:8:0.1:9", "0:10", "256:-1"):
        with pytest.raises(EmuError, match="--stages: "):
            parse_stages(Namespace(stages=bad, bs=8, noise_offset=0.0))
