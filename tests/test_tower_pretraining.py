"""The toy towers are pretrained as the real ones were: CLIP contrastively on image-caption pairs, T5 by
span corruption, the multilingual XLM-R as a language model (span corruption too) and then by M-CLIP's
distillation from CLIP (emu/text/pretraining.py). A pretrained toy CLIP reads the toy world; a random one
does not. A distilled XLM-R puts a Russian caption where CLIP puts the English one; a random one does not,
and rehearsing its language through the distillation keeps it."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from emu.datasets import toyworld
from emu.datasets.folders import from_uint8
from emu.evaluation.accuracy import clip_zero_shot, every_caption, mclip_retrieval
from emu.text.clip import (CLIP_PRESETS, CLIP_VISION_PRESETS, CLIPTextModel, CLIPVisionModel, build_toy_clip_tokenizer,
                           load_clip_text, save_clip)
from emu.text.encoder import make_toy_towers
from emu.text.hf import tokenize
from emu.text.pretraining import (clip_text_embeddings, contrastive_loss, span_corruption, train_clip, train_mclip, train_t5,
                                  train_xlmr, xlmr_span_corruption)
from emu.text.t5 import T5_PRESETS, TOY_SENTINELS, T5Encoder, build_toy_t5_tokenizer, sentinel_ids
from emu.text.xlmr import XLMR_UNK, load_xlmr, save_xlmr


def restore(inputs, targets, sentinels):
    """Put each cut span back where its sentinel stands in the input."""
    spans, current = {}, None
    for token in targets:
        if token in sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    return [t for token in inputs for t in (spans[token] if token in sentinels else [token])]


@pytest.mark.parametrize("n", [2, 5, 12, 40])
def test_span_corruption_cuts_about_fifteen_percent_in_spans_that_restore_the_caption(n):
    sentinels = list(range(1000, 1008))
    rng = np.random.default_rng(n)
    for _ in range(50):
        tokens = rng.integers(10, 500, n).tolist()
        inputs, targets = span_corruption(tokens, sentinels, rng)
        assert restore(inputs, targets, sentinels) == tokens
        used = [t for t in targets if t in sentinels]
        assert used == sentinels[:len(used)] and targets[0] == sentinels[0]
        assert len(targets) - len(used) == min(max(1, round(0.15 * n)), n - 1)  # the cut tokens
        assert [t for t in inputs if t in sentinels] == used


def test_contrastive_loss_is_near_zero_for_matched_pairs_and_log_batch_for_unrelated_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    scale = torch.tensor(np.log(100.0))
    assert contrastive_loss(x, x, scale).item() < 0.01
    unrelated = contrastive_loss(x, torch.randn(64, 32, generator=g), torch.tensor(0.0)).item()
    assert unrelated == pytest.approx(np.log(64), rel=0.05)


def test_toy_t5_tokenizer_ends_its_vocabulary_with_sentinels():
    tokenizer = build_toy_t5_tokenizer(["two red circles on the left"])
    ids = sentinel_ids(tokenizer)
    assert len(ids) == TOY_SENTINELS
    assert ids == list(range(tokenizer.get_vocab_size() - TOY_SENTINELS, tokenizer.get_vocab_size()))
    assert tokenizer.id_to_token(ids[0]) == "<extra_id_0>"


def test_span_corruption_training_learns_to_fill_the_cut_words():
    captions = [toyworld.caption(toyworld.sample_scene(np.random.default_rng(i), False)) for i in range(400)]
    tokenizer = build_toy_t5_tokenizer(captions)
    torch.manual_seed(0)
    t5 = T5Encoder(T5_PRESETS["toy"].__class__(**{**T5_PRESETS["toy"].__dict__, "vocab_size": tokenizer.get_vocab_size()}))
    losses = train_t5(t5, tokenizer, captions, steps=120, batch_size=64)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


@pytest.mark.slow
def test_pretrained_toy_clip_reads_backgrounds_zero_shot_and_a_random_one_does_not(tmp_path):
    """CLIP's two towers trained contrastively (150 steps of 64) on 800 toy images and their web captions
    read the background of 200 new images zero-shot (against every toy caption); the same towers untrained
    do not. (What the XLM-R distilled from such a CLIP learns: the M-CLIP tests below.)"""
    examples = toyworld.make_haystack(800, seed=0)
    captions = [text for _, text, _ in examples]
    images = from_uint8([im for im, _, _ in examples])
    held_out = toyworld.make_haystack(200, seed=1)
    new_images, truth = np.stack([im for im, _, _ in held_out]), [m["attributes"] for _, _, m in held_out]
    tokenizer = build_toy_clip_tokenizer(captions)
    accuracy = {}
    for name, steps in (("random", 0), ("trained", 150)):
        torch.manual_seed(0)
        text = CLIPTextModel(replace(CLIP_PRESETS["toy"], vocab_size=tokenizer.get_vocab_size()))
        vision = CLIPVisionModel(CLIP_VISION_PRESETS["toy"])
        if steps:
            train_clip(text, vision, tokenizer, images, captions, steps, batch_size=64, lr=3e-3)
        save_clip(tmp_path / name, tokenizer, text=text, vision=vision)
        accuracy[name] = clip_zero_shot(tmp_path / name, new_images, truth)
    assert accuracy["trained"]["background"] >= 0.7, accuracy  # 0.81 measured (0.64 after 100 steps); chance is 0.2
    assert accuracy["random"]["background"] <= 0.5, accuracy


def test_every_caption_covers_each_scene_once():
    captions = every_caption()
    assert len(captions) == 4 * 6 * 3 * 5 * 5 == len({c for c, _ in captions})
    for caption, attributes in captions[::97]:
        assert toyworld.parse_caption(caption) == attributes


# ----------------------------------------------------------------------------------------------------
# M-CLIP: the multilingual XLM-R distilled from CLIP


def test_xlmr_span_corruption_learns_both_languages_and_rehearsal_keeps_them_through_the_distillation(tmp_path):
    """The toy XLM-R learns its captions by span corruption (every cut span is its <mask>): the loss falls
    from about log(vocab) to a fraction of it. M-CLIP's distillation alone then pulls the tower towards
    the teacher's vectors and it forgets the language (its span loss rises); rehearsing the language
    task beside the distillation keeps it, while the distillation still fits the teacher."""
    english, russian = [c for c, _ in every_caption("en")], [c for c, _ in every_caption("ru")]
    clip_dir, _, xlmr_dir = make_toy_towers(english, tmp_path, translated=list(zip(english, russian)))
    clip, clip_tokenizer = load_clip_text(clip_dir, dtype=torch.float32)
    teacher = clip_text_embeddings(clip, clip_tokenizer, english)
    order = torch.randperm(len(english), generator=torch.Generator().manual_seed(0)).tolist()
    seen, unseen = order[360:], order[:360]  # the language loss is measured on captions it never trained on
    both = lambda scenes: [english[i] for i in scenes] + [russian[i] for i in scenes]

    def language_loss(probe):
        probe.rng = np.random.default_rng(99)  # the same spans cut each time
        with torch.no_grad():
            return probe.loss(range(len(probe))).item()

    xlmr, tokenizer = load_xlmr(xlmr_dir, dtype=torch.float32)
    xlmr.requires_grad_(True)
    task, probe = xlmr_span_corruption(xlmr, tokenizer, both(seen)), xlmr_span_corruption(xlmr, tokenizer, both(unseen))
    probe.decoder = task.decoder
    losses = train_xlmr(xlmr, task, steps=150, batch_size=64, lr=3e-3)
    assert np.mean(losses[:5]) > 0.8 * np.log(tokenizer.get_vocab_size())
    before = language_loss(probe)
    assert before < 0.4 * np.mean(losses[:5]), (losses[:5], before)
    learned = [{k: v.clone() for k, v in m.state_dict().items()} for m in (xlmr, task.decoder)]
    results = {}
    for rehearse in (False, True):  # each from the language model just learned
        for m, state in zip((xlmr, task.decoder), learned):
            m.load_state_dict(state)
        distill = train_mclip(xlmr, tokenizer, torch.cat([teacher, teacher]), both(range(len(english))), steps=150, batch_size=32,
                              lr=3e-3, rehearse=task if rehearse else None, rehearse_batch=32, rehearse_weight=1.0)
        results[rehearse] = (language_loss(probe), np.mean(distill[-10:]) / np.mean(distill[:10]))
    (forgot, fit), (kept, fit_r) = results[False], results[True]
    assert forgot > 1.5 * before, (before, results)  # the distillation alone forgets the language
    assert kept < 1.2 * before, (before, results)  # rehearsed, it keeps it (measured: 1.08, alone 2.20, rehearsed 0.52)
    assert fit < 0.2 and fit_r < 0.3, results  # and both fit the teacher


def test_toy_xlmr_tokenizer_knows_russian_and_the_tower_lands_in_clips_space(tmp_path):
    translated = list(zip([c for c, _ in every_caption("en")], [c for c, _ in every_caption("ru")]))
    clip_dir, _, xlmr_dir = make_toy_towers(["two red circles on the left"], tmp_path, translated=translated)
    xlmr, tokenizer = load_xlmr(xlmr_dir, dtype=torch.float32)
    ids, mask = tokenize(tokenizer, [c for c, _ in every_caption("ru")])
    assert not (ids == tokenizer.token_to_id(XLMR_UNK)).any()
    clip, _ = load_clip_text(clip_dir, dtype=torch.float32)
    assert xlmr(ids[:4], mask[:4])[0].shape == (4, clip.config.projection_dim)


def test_mclip_distillation_carries_clips_space_to_russian_captions_of_unseen_scenes(tmp_path):
    """M-CLIP's recipe on four fifths of the scenes: the student reads their English and Russian captions
    and learns to put both where the frozen CLIP puts the English. Asked about the other fifth, its
    vectors land nearest the scene's own English caption far more often than chance (1 in 1800) or than
    the random tower it started from, and nearest a caption with the same attributes more often too.
    A random toy CLIP is teacher enough: its space is arbitrary, so only a student that reads the words
    of a caption it never saw can land in it."""
    english, russian = [c for c, _ in every_caption("en")], [c for c, _ in every_caption("ru")]
    clip_dir, _, random_dir = make_toy_towers(english, tmp_path / "towers", seed=0, translated=list(zip(english, russian)))
    order = torch.randperm(len(english), generator=torch.Generator().manual_seed(0))
    unseen, seen = order[:360], order[360:].tolist()
    clip, clip_tokenizer = load_clip_text(clip_dir, dtype=torch.float32)
    teacher = clip_text_embeddings(clip, clip_tokenizer, [english[i] for i in seen])
    student, tokenizer = load_xlmr(random_dir, dtype=torch.float32)
    losses = train_mclip(student.requires_grad_(True), tokenizer, torch.cat([teacher, teacher]),
                         [english[i] for i in seen] + [russian[i] for i in seen], steps=200, batch_size=32, lr=3e-3)
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:10])
    save_xlmr(student, tokenizer, tmp_path / "distilled")
    distilled = mclip_retrieval(tmp_path / "distilled", clip_dir, queries=unseen)
    random = mclip_retrieval(random_dir, clip_dir, queries=unseen)
    # measured: 3 (en) and 20 (ru) of the 360 unseen scenes right, the random tower 0 and 1; 11 to 45 with
    # other seeds. An attribute is right 0.23 to 0.40 more often than with the random tower.
    for language in ("en", "ru"):
        assert distilled[language]["scene"] >= 10 / 1800, distilled  # ten times chance
        assert distilled[language]["scene"] > random[language]["scene"], (distilled, random)
        gain = np.mean([distilled[language][a] - random[language][a] for a in toyworld.ATTRIBUTES])
        assert gain >= 0.1, (language, distilled, random)
