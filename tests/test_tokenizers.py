"""Tokenizer parity: our loading path gives the reference tokenizers' ids on tricky strings.

Nothing is downloaded, so each test builds a small tokenizer in the real published format and
writes it into a model directory that our loaders read:

- CLIP: a byte-level BPE vocabulary learned here from a few captions and written as CLIP's own
  vocab.json + merges.txt, and the same vocabulary as a tokenizer.json laid out like
  openai/clip-vit-large-patch14's. The reference is CLIP's original tokenizer written out in plain
  Python below (transformers 5 no longer ships a pure-Python CLIPTokenizer); transformers'
  CLIPTokenizer, read from vocab.json + merges.txt, checks the tokenizer.json layout.
- T5: a SentencePiece unigram model trained here, converted to tokenizer.json by transformers'
  T5Tokenizer as the published one is; the reference is SentencePiece itself.
"""
import html
import io
import json
import unicodedata
from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer

from emu.text.clip import (CLIP_BOS, CLIP_EOS, CLIP_LENGTH, CLIPTextConfig, CLIPTextModel, build_toy_clip_tokenizer,
                           clip_clean, load_clip_text, save_clip)
from emu.text.hf import tokenize
from emu.text.t5 import T5_EOS, T5_LENGTH, T5Config, T5Encoder, load_t5_encoder, save_t5_encoder
from emu.datasets.toyworld import caption, sample_scene, web_caption

CAPTIONS = [
    "a photo of a cat sitting on a red sofa",
    "two dogs playing in the snow at sunset, it's cold",
    "a bowl of ramen with chopsticks & a soft boiled egg",
    "the eiffel tower at night: lit up, 330 metres tall",
    "café au lait on a wooden table in paris",
    "a lighthouse on a rocky coast under stormy skies",
    "portrait of an old fisherman with a grey beard, don't smile",
    "a crowded street market in marrakech at noon",
    "an astronaut riding a horse on mars, 1969 style",
    "東京の夜景 and a bowl of noodles",
]
LONG = ("a very long caption about a sunny beach with palm trees, blue water, white sand, children building "
        "sand castles, surfers riding waves, seagulls flying over the pier, an ice cream stand, colourful "
        "umbrellas, volleyball players, a lifeguard tower and sailboats on the horizon at golden hour ") * 2
# Each line is a way captions differ from the plain lower-case ASCII the toy world writes.
TRICKY = [
    "a photo of a cat",
    "Café crème brûlée on a Parisian terrace",  # precomposed accents
    "cafe\u0301 au lait",  # a combining accent: NFC composes it
    "東京の夜景、富士山",  # CJK, no spaces
    "a dog 🐶 wearing sunglasses 😎👍🏽",  # emoji, one with a skin-tone modifier
    "wow!!! really?!... (yes) -- [maybe] {no} #tag @user ~~~ ***",  # punctuation runs
    "3 cats, 12 dogs and 2024 birds; pi is 3.14159",  # digits
    "don't stop, it's fine, we're here, they've gone, I'm ok, you'll see, he'd go",  # contractions
    "DON'T SHOUT, IT'S LOUD",  # contractions in upper case
    "fish &amp; chips, &lt;b&gt;bold&lt;/b&gt;, &quot;quoted&quot; &#39;x&#39; &amp;amp; AT&T",  # HTML entities
    "tabs\there\nnew lines\r\n   and    spaces  ",
    "A PHOTO OF A CAT IN UPPER CASE",
    "a cat <|endoftext|> a dog",  # a special token typed in the caption
    "naïve Ærøskøbing STRASSE İstanbul ΣΊΣΥΦΟΣ",  # case mappings outside ASCII
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ, the ﬁrst ligature, x² ½ ①",  # compatibility characters
    LONG,
    "   ",
    "",
]
UNSEEN = ["an unseen zebra ✓ ☃ ∑ in Reykjavík", "no-break\u00a0and ideographic\u3000spaces\u2028end"]  # not trained on


# ----------------------------------------------------------------------------------------------------
# CLIP: the original tokenizer in plain Python

CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def byte_alphabet():
    """CLIP's (and GPT-2's) byte -> printable character table, in CLIP's vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 (controls,
    space, soft hyphen...) are moved to the characters from U+0100 on, so no symbol is whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def original_clean(text):
    """CLIP's original cleanup: ftfy.fix_text, html.unescape twice, whitespace collapsed, lower case.

    ftfy is not installed; of fix_text we keep its final NFC normalisation and none of its repairs
    of broken text (mojibake, curly quotes, ligatures, fullwidth forms). transformers' former
    pure-Python CLIPTokenizer ran fix_text too when ftfy was installed, and otherwise BERT's basic
    tokenizer, which also drops control characters and makes each CJK ideograph a word of its own.
    """
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
    return " ".join(text.split()).lower()


def original_words(regex, text):
    """The cleaned text split by CLIP's regex, each word's UTF-8 bytes spelt in the byte alphabet."""
    alphabet = byte_alphabet()
    return ["".join(alphabet[b] for b in word.encode("utf-8"))
            for word in regex.findall(CLIP_SPLIT, original_clean(text), flags=regex.IGNORECASE)]


def merge_pair(symbols, pair):
    """`symbols` with every occurrence of `pair`, left to right, fused into one symbol."""
    out, i = [], 0
    while i < len(symbols):
        if tuple(symbols[i:i + 2]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


class OriginalCLIPTokenizer:
    """CLIP's tokenizer as released: clean, split, byte-encode, then BPE with `</w>` on each word's end."""

    def __init__(self, regex, vocab, merges):
        self.regex, self.vocab = regex, vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}

    def bpe(self, word):
        symbols = (*word[:-1], word[-1] + "</w>")
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            symbols = merge_pair(symbols, best)
        return symbols

    def encode(self, text):
        """Token ids of `text`, without the start and end tokens added around it."""
        ids = []
        for word in original_words(self.regex, text):
            # The special tokens are words of their own, never split (being ASCII, their byte spelling is themselves).
            ids += [self.vocab[s] for s in ((word,) if word in (CLIP_BOS, CLIP_EOS) else self.bpe(word))]
        return ids

    def __call__(self, text, length=CLIP_LENGTH):
        """Fixed-length ids: the start token, at most length - 2 tokens, the end token, end tokens as padding.

        The released code truncates the same way (the end token always last) but pads with id 0; we
        pad with the end token as the Hugging Face tokenizer does, which the causal text model never
        attends to before its pooled end token.
        """
        ids = [self.vocab[CLIP_BOS], *self.encode(text)[:length - 2], self.vocab[CLIP_EOS]]
        return ids + [self.vocab[CLIP_EOS]] * (length - len(ids))


def train_clip_bpe(regex, texts, num_merges):
    """A CLIP-format vocabulary learned from `texts`: (vocab {token: id}, merges [(left, right)]).

    The layout is CLIP's: the 256 byte symbols, the same with `</w>`, one token per merge in merge
    order, then <|startoftext|> and <|endoftext|>. Each step merges the most frequent adjacent pair
    (ties: the larger pair) among those that make a new symbol.
    """
    words = Counter()
    for text in texts:
        for word in original_words(regex, text):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    base = list(byte_alphabet().values())
    tokens = base + [s + "</w>" for s in base]
    known, merges = set(tokens), []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        candidates = [(count, pair) for pair, count in pairs.items() if "".join(pair) not in known]
        if not candidates:
            break
        _, pair = max(candidates)
        merges.append(pair)
        tokens.append("".join(pair))
        known.add(tokens[-1])
        words = Counter({merge_pair(word, pair): count for word, count in words.items()})
    tokens += [CLIP_BOS, CLIP_EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer_json(vocab, merges):
    """tokenizer.json laid out as openai/clip-vit-large-patch14 publishes it, around our vocabulary."""
    bos, eos = vocab[CLIP_BOS], vocab[CLIP_EOS]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
              "special": True} for t, i in ((CLIP_BOS, bos), (CLIP_EOS, eos))]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [CLIP_EOS, eos], "cls": [CLIP_BOS, bos],
                           "trim_offsets": False, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": CLIP_EOS, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": False, "vocab": vocab,
                  "merges": [f"{a} {b}" for a, b in merges]},
    }


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(reference, our tokenizer as load_clip_text returns it, the model directory with vocab.json + merges.txt)."""
    regex = pytest.importorskip("regex")  # \p{L} needs it; it comes with transformers
    vocab, merges = train_clip_bpe(regex, CAPTIONS + TRICKY, num_merges=400)
    path = tmp_path_factory.mktemp("clip")
    layout = json.dumps(clip_tokenizer_json(vocab, merges), ensure_ascii=False)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, projection_dim=8)
    save_clip(path, Tokenizer.from_str(layout), text=CLIPTextModel(config))
    (path / "tokenizer.json").write_text(layout, encoding="utf-8")  # exactly the published layout
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _, tokenizer = load_clip_text(path)
    return OriginalCLIPTokenizer(regex, vocab, merges), tokenizer, path


@pytest.mark.parametrize("text", TRICKY + UNSEEN, ids=lambda text: repr(text[:24]))
def test_clip_ids_equal_the_original_tokenizer(clip, text):
    reference, tokenizer, _ = clip
    ids, mask = tokenize(tokenizer, [text], clean=clip_clean)
    assert ids[0].tolist() == reference(text)
    real = 2 + min(len(reference.encode(text)), CLIP_LENGTH - 2)
    assert mask[0].tolist() == [True] * real + [False] * (CLIP_LENGTH - real)


def test_clip_long_caption_is_cut_to_77_keeping_the_end_token(clip):
    reference, tokenizer, _ = clip
    assert len(reference.encode(LONG)) > CLIP_LENGTH
    ids = tokenize(tokenizer, [LONG], clean=clip_clean)[0][0].tolist()
    assert len(ids) == CLIP_LENGTH
    assert ids[0] == reference.vocab[CLIP_BOS] and ids[-1] == reference.vocab[CLIP_EOS]
    assert ids[1:-1] == reference.encode(LONG)[:CLIP_LENGTH - 2]


def test_clip_empty_caption_is_start_then_end_tokens(clip):
    reference, tokenizer, _ = clip
    ids, mask = tokenize(tokenizer, ["", "   "], clean=clip_clean)
    eos = reference.vocab[CLIP_EOS]
    assert ids.tolist() == [[reference.vocab[CLIP_BOS]] + [eos] * (CLIP_LENGTH - 1)] * 2
    assert mask.sum(dim=1).tolist() == [2, 2]


def test_clip_html_entities_are_unescaped_twice_as_the_original(clip):
    _, tokenizer, _ = clip
    ids = tokenize(tokenizer, ["fish &amp; chips", "fish &amp;amp; chips", "fish & chips", "fish &amp;amp;amp; chips"], clean=clip_clean)[0]
    assert ids[0].tolist() == ids[2].tolist() == ids[1].tolist()
    assert ids[3].tolist() != ids[2].tolist()  # the original unescapes twice, not until nothing is left


def test_clip_tokenizer_json_layout_matches_transformers(clip):
    """Our tokenizer.json as loaded, before clip_clean, gives the ids of transformers' CLIPTokenizer
    read from vocab.json + merges.txt: the file is laid out as the published one."""
    pytest.importorskip("transformers")
    from transformers import CLIPTokenizer
    _, tokenizer, path = clip
    theirs = CLIPTokenizer.from_pretrained(str(path))
    # Asked for our fixed length: truncate to 77 keeping the end token, pad with <|endoftext|>.
    expected = theirs(TRICKY + UNSEEN, padding="max_length", max_length=CLIP_LENGTH, truncation=True)["input_ids"]
    assert [e.ids for e in tokenizer.encode_batch(TRICKY + UNSEEN)] == expected


def test_clip_built_from_vocab_and_merges_alone_gives_the_original_ids(clip, tmp_path):
    """Stable Diffusion v1.5 publishes its tokenizer/ as the original tokenizer's vocab.json and merges.txt,
    beside text_encoder/, with no tokenizer.json: built from those, the ids are the original's."""
    reference, ours, path = clip
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "text_encoder" / name).write_bytes((path / name).read_bytes())
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / name).write_bytes((path / name).read_bytes())
    _, tokenizer = load_clip_text(tmp_path / "text_encoder")
    for text in TRICKY + UNSEEN + [LONG, ""]:
        assert tokenize(tokenizer, [text], clean=clip_clean)[0][0].tolist() == reference(text), text
    assert tokenizer.encode_batch(TRICKY)[0].ids == ours.encode_batch(TRICKY)[0].ids


# ----------------------------------------------------------------------------------------------------
# T5: SentencePiece is the reference


def protobuf_fields(buffer):
    """(field number, value) of each field of a serialised protobuf message; enough to read one bytes field."""
    def varint(i):
        value, shift = 0, 0
        while True:
            value |= (buffer[i] & 0x7F) << shift
            shift, i = shift + 7, i + 1
            if buffer[i - 1] < 0x80:
                return value, i
    i = 0
    while i < len(buffer):
        key, i = varint(i)
        kind = key & 7
        if kind == 0:
            value, i = varint(i)
        elif kind == 2:
            size, i = varint(i)
            value, i = buffer[i:i + size], i + size
        else:  # fixed 64 or 32 bits
            size = 8 if kind == 1 else 4
            value, i = buffer[i:i + size], i + size
        yield key >> 3, value


def train_sentencepiece(captions, **special_ids):
    """A unigram SentencePiece model with NFKC-based normalisation trained on `captions` (each three
    times), its special tokens at `special_ids` (pad_id=..., eos_id=..., -1 for none): (processor,
    [(piece, score)] in id order, the normaliser's precompiled character map), what transformers'
    slow -> fast conversion reads. The map is ModelProto field 3, NormalizerSpec field 2, read without
    protobuf, which is not installed."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions * 3), model_writer=model, model_type="unigram",
                                   vocab_size=200, hard_vocab_limit=False, normalization_rule_name="nmt_nfkc",
                                   num_threads=1, minloglevel=2, **special_ids)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    charsmap = dict(protobuf_fields(dict(protobuf_fields(model.getvalue()))[3]))[2]
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return processor, pieces, charsmap


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """(SentencePiece processor, our tokenizer as load_t5_encoder returns it)."""
    pytest.importorskip("transformers")
    from transformers import T5Tokenizer
    # T5's settings: <pad>=0 </s>=1 <unk>=2 and no <s>.
    processor, pieces, charsmap = train_sentencepiece(CAPTIONS, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    converted = T5Tokenizer(vocab=pieces, _spm_precompiled_charsmap=charsmap).backend_tokenizer  # + 100 sentinels
    path = tmp_path_factory.mktemp("t5")
    config = T5Config(vocab_size=converted.get_vocab_size(), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    save_t5_encoder(T5Encoder(config), converted, path)
    _, tokenizer = load_t5_encoder(path)
    return processor, tokenizer


def sentencepiece_ids(processor, text, length=T5_LENGTH):
    """SentencePiece's ids, then </s> (kept when cut to `length`), then <pad>=0 up to `length`."""
    ids = processor.encode(text)[:length - 1] + [processor.piece_to_id(T5_EOS)]
    return ids + [0] * (length - len(ids))


@pytest.mark.parametrize("text", TRICKY + UNSEEN, ids=lambda text: repr(text[:24]))
def test_t5_ids_equal_sentencepiece(t5, text):
    processor, tokenizer = t5
    ids, mask = tokenize(tokenizer, [text])
    assert ids[0].tolist() == sentencepiece_ids(processor, text)
    assert mask[0].tolist() == [i != 0 for i in sentencepiece_ids(processor, text)]


def test_t5_unknown_characters_and_long_text(t5):
    processor, tokenizer = t5
    assert processor.unk_id() == 2 and 2 in processor.encode(UNSEEN[0])  # the vocabulary really lacks some
    ids = tokenize(tokenizer, [LONG])[0][0].tolist()
    assert len(processor.encode(LONG)) > T5_LENGTH
    assert ids == processor.encode(LONG)[:T5_LENGTH - 1] + [1]


def test_t5_empty_caption_is_end_token_then_padding(t5):
    _, tokenizer = t5
    ids, mask = tokenize(tokenizer, ["", "  "])
    assert ids.tolist() == [[1] + [0] * (T5_LENGTH - 1)] * 2
    assert mask.sum(dim=1).tolist() == [1, 1]


# ----------------------------------------------------------------------------------------------------
# The toy tokenizers


def test_clip_cleanup_leaves_toy_captions_ids_unchanged():
    """The toy world's captions come out of tokenize with the ids the trained toy models were fitted on."""
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, photogenic=i % 2 == 0) for i in range(50)]
    captions = [caption(s) for s in scenes] + [web_caption(s, rng) for s in scenes]
    tokenizer = build_toy_clip_tokenizer(captions)
    assert tokenize(tokenizer, captions, clean=clip_clean)[0].tolist() == [e.ids for e in tokenizer.encode_batch(captions)]
