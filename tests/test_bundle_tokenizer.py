"""Bundle tokenizers (tokenizer.json + the `tokenizers` package) give open_clip's token ids exactly."""
from __future__ import annotations

import numpy as np
import pytest

from mmft.bundle.tokenizer import BundleTokenizer, TokenizerExportError, save_tokenizer

AWKWARD = [
    "A red apple", "  Two   DOGS playing\tin the snow!! ", "café &amp; crème brûlée &lt;3",
    "“curly quotes” and ‘single’", "don't stop-believin' it's 42 cats, 3.14159", "emoji 🐱🚀 test",
    "中文字符 and ελληνικά", "UPPER lower MiXeD x",
    "", "<end_of_text> inside a caption", "ﬁne ligature ＦＵＬＬ width", "new\nline", "a " * 60,
    "ThisIsAVeryLongCamelCaseWordWithoutSpacesThatBPEMustSplitIntoManyPieces",
]


def _compare(tokenizer, tmp_path, texts=AWKWARD) -> dict:
    entry = save_tokenizer(tokenizer, tmp_path)
    ours = BundleTokenizer(tmp_path / entry["file"], entry)
    want = tokenizer(texts).numpy()
    got = ours(texts)
    assert got.dtype == np.int64
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    return entry


def test_open_clip_bpe_at_full_context(tmp_path):
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")  # open_clip's own BPE, context 77, no download
    entry = _compare(tok, tmp_path)
    assert entry["family"] == "open_clip_bpe" and entry["pad_to"] == "context"
    assert entry["context_length"] == 77


def test_open_clip_bpe_truncation_keeps_the_end_token(tiny_vit_cfg, tmp_path):
    from mmft.model.factory import create_model

    tok = create_model(tiny_vit_cfg)[3]  # context 16: most captions above are cut
    entry = _compare(tok, tmp_path)
    ids = BundleTokenizer(tmp_path / "tokenizer.json", entry)(["word " * 40])
    assert ids[0, -1] == 49407 and ids[0, 0] == 49406  # start ... end, as open_clip truncates


def test_hugging_face_tokenizer_trims_padding_like_mmft(tmp_path):
    from mmft.config import ModelConfig
    from mmft.model.factory import create_model

    tok = create_model(ModelConfig(name="mmft-mini"))[3]  # MiniLM WordPiece behind mmft's padding trim
    entry = _compare(tok, tmp_path)
    assert entry["family"] == "huggingface" and entry["pad_to"] == "longest"
    short = BundleTokenizer(tmp_path / "tokenizer.json", entry)(["a cat", "a black cat"])
    assert short.shape == tuple(tok(["a cat", "a black cat"]).shape) and short.shape[1] < 10


def test_unsupported_tokenizers_are_refused(tmp_path):
    class Opaque:
        clean_fn = None

    with pytest.raises(TokenizerExportError, match="not supported"):
        save_tokenizer(Opaque(), tmp_path)
