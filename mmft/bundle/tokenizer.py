"""Bundle tokenizers: one `tokenizer.json` for the `tokenizers` package, whatever the text tower.

Both tokenizer families open_clip uses end up as a Hugging Face `tokenizers` file, so a deployer needs
one small Rust-backed package and no torch, transformers or open_clip:
- Hugging Face text towers: the tower's own fast tokenizer, saved as it is;
- open_clip's own BPE (`SimpleTokenizer`, the one ViT-B-32 and friends use): its byte-level vocabulary
  and merges rebuilt as a `tokenizers` BPE model with open_clip's word pattern and `</w>` word ends.
The text cleaning open_clip applies before tokenizing (ftfy, HTML unescaping, whitespace folding and,
for its BPE, lower case) runs in Python here (`clean_text`); the tests compare the ids with
open_clip's tokenizers on awkward captions. Truncation keeps the start token, the first L - 2 tokens
and the end token, as both open_clip tokenizers do.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
# open_clip's BPE word pattern; the ignore-case flag of its Python regex becomes (?i)
CLIP_WORD_PATTERN = r"""(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_SPECIAL = ("<start_of_text>", "<end_of_text>")


class TokenizerExportError(ValueError):
    """A tokenizer mode a bundle cannot reproduce; the message says which."""


def clean_text(text: str, lower: bool) -> str:
    """open_clip's cleaning: ftfy, HTML entities unescaped twice, whitespace folded, optionally lower case."""
    try:
        import ftfy
    except ImportError:
        raise ImportError("bundle tokenizers need ftfy (the text cleaning open_clip applies): "
                          "pip install ftfy, or install mmft[serve-onnx]") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = " ".join(text.split())
    return text.lower() if lower else text


class BundleTokenizer:
    """Texts -> (N, L) int64 token ids, from a bundle's tokenizer.json and its manifest entry.

    cfg: {"context_length", "pad_id", "lower", "pad_to": "context" | "longest"}. "longest" (Hugging
    Face towers) ends the batch at its longest text, as mmft's torch tokenizer does.
    """

    def __init__(self, path: str | Path, cfg: dict):
        from tokenizers import Tokenizer

        self.cfg = dict(cfg)
        self.context_length = int(cfg["context_length"])
        self.pad_id = int(cfg["pad_id"])
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.context_length)

    def __call__(self, texts) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        cleaned = [clean_text(str(t), self.cfg.get("lower", False)) for t in texts]
        rows = [e.ids for e in self.tokenizer.encode_batch(cleaned)] if cleaned else []
        longest = max((len(r) for r in rows), default=1)
        width = self.context_length if self.cfg.get("pad_to") == "context" else max(longest, 1)
        out = np.full((len(rows), width), self.pad_id, np.int64)  # (N, L)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out


def clip_bpe_tokenizer(encoder: dict[str, int], merges: list[tuple[str, str]], lower: bool):
    """A `tokenizers.Tokenizer` equal to open_clip's SimpleTokenizer (vocabulary + ranked merges)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    sot, eot = CLIP_SPECIAL
    tok = Tokenizer(models.BPE(vocab=dict(encoder), merges=list(merges), end_of_word_suffix="</w>",
                               continuing_subword_prefix="", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC()] + ([normalizers.Lowercase()] if lower else []))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CLIP_SPECIAL])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, encoder[sot]), (eot, encoder[eot])])
    return tok


def _unwrap(tokenizer):
    """mmft's PaddingTrimTokenizer -> the open_clip tokenizer inside it."""
    inner = getattr(tokenizer, "__dict__", {}).get("tokenizer")
    if type(tokenizer).__name__ == "PaddingTrimTokenizer" and inner is not None:
        return inner, int(tokenizer.pad_id)
    return tokenizer, None


def _clean_kind(tokenizer) -> bool:
    """True for open_clip's 'lower' cleaning, False for 'whitespace'; refuse the others."""
    name = getattr(getattr(tokenizer, "clean_fn", None), "__name__", "")
    if name not in ("_clean_lower", "_clean_whitespace"):
        raise TokenizerExportError(f"tokenizer cleaning {name or 'unknown'!r} is not supported in a bundle "
                                   "(supported: open_clip's 'lower' and 'whitespace')")
    return name == "_clean_lower"


def save_tokenizer(tokenizer, out_dir: str | Path) -> dict:
    """Write tokenizer.json for an open_clip / mmft tokenizer; return its manifest entry (BundleTokenizer)."""
    inner, trim_pad = _unwrap(tokenizer)
    path = Path(out_dir) / TOKENIZER_FILE
    lower = _clean_kind(inner)
    if hasattr(inner, "bpe_ranks") and hasattr(inner, "encoder"):  # open_clip SimpleTokenizer
        if getattr(inner, "reduction_fn", None) is not None:
            raise TokenizerExportError("open_clip tokenizers with a reduction mask cannot be bundled")
        merges = [pair for pair, _ in sorted(inner.bpe_ranks.items(), key=lambda kv: kv[1])]
        clip_bpe_tokenizer(inner.encoder, merges, lower).save(str(path))
        return {"file": TOKENIZER_FILE, "family": "open_clip_bpe", "lower": lower, "pad_id": 0,
                "pad_to": "context", "context_length": int(inner.context_length)}
    hf = getattr(inner, "tokenizer", None)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerExportError(f"tokenizer {type(inner).__name__} has no Hugging Face fast tokenizer to "
                                   "bundle; mmft bundles open_clip's BPE and Hugging Face fast tokenizers")
    if getattr(inner, "tokenizer_mode", "") or getattr(inner, "strip_sep_token", False):
        raise TokenizerExportError("Hugging Face tokenizers in 'clips' mode or with strip_sep_token cannot "
                                   "be bundled")
    backend.save(str(path))
    pad_id = trim_pad if trim_pad is not None else int(hf.pad_token_id or 0)
    return {"file": TOKENIZER_FILE, "family": "huggingface", "lower": lower, "pad_id": pad_id,
            "pad_to": "longest" if trim_pad is not None else "context",
            "context_length": int(inner.context_length)}
