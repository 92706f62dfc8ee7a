"""The text front ends of the three families, built here.

Upstream downloads them (a GPT-2 tokenizer for Turbo, the grapheme vocabulary for Multilingual,
``tokenizer.json`` for the standard model); no download is possible here, so each is written
deterministically and then read by the real classes (``EnTokenizer``, ``MTLTokenizer``,
``AutoTokenizer``). The default ones are cached under ``$TTS_WORKBENCH_CACHE``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from chatterbox.models.tokenizers import EnTokenizer, MTLTokenizer
from chatterbox.mtl_tts import SUPPORTED_LANGUAGES

from ..core.errors import SourceError, error_line
from ..core.files import built_once
from ..core.patching import scoped_item

# What save_gpt2_tokenizer writes (transformers' save_pretrained, older versions also the last two)
GPT2_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)

# The cached grapheme vocabulary's name, versioned: v2 (2026-12-06) added punctuation, and a cache
# built before keeps its v1 file (upstream's name), which nothing reads now.
GRAPHEME_VOCAB = "grapheme_vocab_v2.json"


def build_tokenizer_json(path: Path) -> Path:
    """Write a character-level ``tokenizer.json`` that upstream ``EnTokenizer`` can read.

    Ids follow upstream conventions: ``[STOP]`` = 0 and ``[START]`` = 255 (T3Config's stop and
    start text tokens), every id below T3's text vocabulary of 704.
    """
    chars = [chr(c) for c in range(33, 127)] + list("àâçéèêëîïôûùüÿñæœ’“”—–…")
    return _save_char_tokenizer(path, chars, [])


def build_grapheme_vocab(path: Path) -> Path:
    """Write a grapheme vocabulary that upstream ``MTLTokenizer`` reads in place of
    ``grapheme_mtl_merged_expanded_v1.json``: the same special tokens and ids as the English one
    (``[STOP]`` 0, ``[START]`` 255), one token per language (``[fr]``, ...), and the characters
    of the 23 languages' scripts after NFKD decomposition (Latin, combining accents, Greek,
    Cyrillic, Hebrew, Arabic, Devanagari, kana, Hangul jamo) and their punctuation (Latin-1's
    ¿ ¡ « » °, general punctuation, currency signs, CJK's 。 and 「」), all below T3's 2454 text ids."""
    blocks = [(0x21, 0x7F), (0xC0, 0x250), (0x300, 0x370), (0x370, 0x400), (0x400, 0x500)]
    blocks += [(0x590, 0x600), (0x600, 0x700), (0x900, 0x980), (0x1100, 0x1200), (0x3040, 0x3100)]
    # Added 2026-12-06 (¿ and 。 read as [UNK]), after the others: every earlier character keeps its id.
    blocks += [(0xA1, 0xC0), (0x2010, 0x2028), (0x2030, 0x205F), (0x20A0, 0x20C1), (0x3000, 0x3040)]
    chars = [chr(c) for lo, hi in blocks for c in range(lo, hi) if chr(c).isprintable()]
    return _save_char_tokenizer(path, chars, [f"[{code}]" for code in SUPPORTED_LANGUAGES])


def _save_char_tokenizer(path: Path, chars: list[str], languages: list[str]) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    specials = ["[STOP]", "[UNK]", "[SPACE]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"]
    first = chars[: 255 - len(specials)]  # ids below [START]=255, then the rest after it
    tokens = specials + first + [f"[unused{i}]" for i in range(len(specials) + len(first), 255)]
    tokens += ["[START]", *languages, *chars[len(first) :]]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}  # no holes in the id space
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Split("", behavior="isolated")  # one token per character
    tok.add_special_tokens(specials + ["[START]", *languages])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def build_gpt2_tokenizer(folder: Path) -> Path:
    """Write a GPT-2 style tokenizer (byte-level BPE: 256 byte tokens, no merges, and GPT-2's
    ``<|endoftext|>``), which transformers' ``AutoTokenizer.from_pretrained`` reads as upstream
    Turbo reads its own (files: ``save_gpt2_tokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return save_gpt2_tokenizer(tok, folder)


def save_gpt2_tokenizer(tok: Any, folder: Path) -> Path:
    """Write a byte-level BPE ``tokenizers.Tokenizer`` as upstream's published Turbo folder has
    it: ``tokenizer_config.json`` naming ``GPT2Tokenizer`` (a class every transformers version
    knows; transformers 5's generic ``TokenizersBackend`` is unknown to the 4.46 that
    chatterbox-tts pins), ``tokenizer.json``, and ``vocab.json`` + ``merges.txt`` for the slow
    tokenizer of older versions, with the added tokens in the config's ``added_tokens_decoder``."""
    from transformers import GPT2Tokenizer

    eos = "<|endoftext|>"
    wrapped = GPT2Tokenizer(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos)
    wrapped.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)  # transformers 5's own key: older versions pass it on as a kwarg
    # transformers 5 leaves the added tokens to tokenizer.json; a folder without it (upstream's hub
    # layout) reads them from here, each with its flags (added_tokens.json would lose "special")
    added = {str(i): t.__getstate__() for i, t in wrapped.added_tokens_decoder.items()}
    config |= {"tokenizer_class": "GPT2Tokenizer", "added_tokens_decoder": added}
    config_path.write_text(json.dumps(config, indent=2))
    model = json.loads(tok.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    return folder


# Upstream's Chinese table: in the multilingual hub repository, beside the grapheme vocabulary.
CANGJIE_FILE = "Cangjie5_TC.json"


def read_tokenizer(family: str, path: Path) -> Any:
    """The family's upstream text front end, read from ``path`` (a file, or Turbo's folder)."""
    if family == "turbo":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token is None:  # as upstream from_local
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if family == "multilingual":
        from huggingface_hub import constants

        # MTLTokenizer fetches a Chinese mapping from the hub and warns when it (or the Chinese
        # segmenter) is missing: offline, fail at once and quietly; Chinese without either is
        # refused instead (families.check_language, decode.text_tokens).
        with (
            _errors_only(logging.getLogger("chatterbox.models.tokenizers.tokenizer")),
            offline_hub(constants),
        ):
            tokenizer = MTLTokenizer(str(path))
        read_cangjie(tokenizer, path.parent / CANGJIE_FILE)
        return tokenizer
    return EnTokenizer(str(path))


def read_cangjie(tokenizer: Any, path: Path) -> None:
    """Fill a multilingual tokenizer's Chinese (Cangjie) table from ``path``, read as upstream's
    converter reads it, where that converter found none: it looks only in a hub cache laid out
    inside the tokenizer's own folder (``hf_hub_download(cache_dir=...)``), so offline the table
    beside the vocabulary, in a model folder or the hub snapshot from_pretrained filled, was
    never read (before 2026-12-07: Chinese refused with real weights)."""
    if not path.is_file() or (converter := tokenizer.cangjie_converter).word2cj:
        return
    try:  # whole or not at all: a damaged file is named, not half read
        table = [(word, code) for word, code, *_ in (e.split("\t") for e in json.loads(path.read_bytes()))]
    except (ValueError, TypeError, AttributeError) as e:  # (JSON's and UTF-8's errors are ValueErrors)
        raise SourceError(
            f'{path} is not upstream\'s Cangjie table ({error_line(e)}): a JSON list of "word<TAB>code" '
            "entries; copy it again from the hub repository ResembleAI/chatterbox, or remove it (Chinese "
            "is then refused, the other languages spoken)"
        ) from e
    for word, code in table:
        converter.word2cj[word] = code
        converter.cj2word.setdefault(code, []).append(word)


def offline_hub(constants: Any) -> AbstractContextManager[None]:
    """The hub used offline (cached files only) while inside, whatever the environment's
    HF_HUB_OFFLINE says: the workbench never downloads, and an offline machine fails at once
    instead of waiting on the network. Loads in threads may overlap: the first in sets it, the
    last out puts it back (``scoped_item``)."""
    return scoped_item(vars(constants), "HF_HUB_OFFLINE", True)


@contextmanager
def _errors_only(log: logging.Logger) -> Iterator[None]:
    """``log`` passes on errors only while inside. A filter of each user's own, not the
    logger's level: users in threads take off their own in whatever order they leave."""

    def errors(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    log.addFilter(errors)
    try:
        yield
    finally:
        log.removeFilter(errors)


def _vocab(tokenizer: Any) -> dict[str, int]:
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # EnTokenizer / MTLTokenizer wrap one
    vocab: dict[str, int] = inner.get_vocab()
    return vocab


def missing_tokens(family: str, tokenizer: Any) -> str | None:
    """What ``tokenizer``, read from ``family``'s text front end files, lacks that every tokenizer
    of the family has (another family's file under this family's name loads, and reads text with
    the other family's ids), or None: Turbo's is a byte-level BPE with GPT-2's ``<|endoftext|>``
    in its vocabulary (not only added to it, as its tokenizer_config.json does); Multilingual's
    has its languages' tokens, which upstream puts before the text (``[fr]``). The standard
    family's [START]/[STOP] upstream's EnTokenizer asserts itself."""
    if family == "turbo":
        from tokenizers.models import BPE

        model = tokenizer.backend_tokenizer.model
        if not isinstance(model, BPE) or model.token_to_id("<|endoftext|>") is None:
            return "<|endoftext|> in a BPE vocabulary"
    if family == "multilingual":
        vocab = _vocab(tokenizer)
        tokens = [f"[{code}]" for code in SUPPORTED_LANGUAGES]
        # none at all: a file with some (a language fewer) is no other family's, and is left to upstream
        if not any(t in vocab for t in tokens):
            return f"language tokens ({', '.join(tokens[:3])}, ...)"
    return None


def check_tokenizer(tok: Any, vocab: int) -> None:
    """Refuse a text front end whose ids reach past T3's text vocabulary of ``vocab`` entries
    (tokenizer files saved with other weights: T3's embedding would fail on them)."""
    top = max(_vocab(tok).values())
    if top >= vocab:
        raise SourceError(
            f"the tokenizer has token id {top}, but T3's text vocabulary has {vocab} entries "
            f"(ids 0..{vocab - 1}); use the tokenizer files that were saved with these weights"
        )


def default_tokenizer(family: str) -> Path:
    """The cached text front end of ``family``, built on first use under ``$TTS_WORKBENCH_CACHE``
    (``~`` expanded), or ``~/.cache/tts_workbench`` where it is unset or empty."""
    # Empty (`TTS_WORKBENCH_CACHE=` in an env file) is unset: before, Path("") was the current folder
    default = Path.home() / ".cache" / "tts_workbench"
    cache = Path(os.environ.get("TTS_WORKBENCH_CACHE") or default).expanduser()
    build: Callable[[Path], Path]
    if family == "turbo":
        name, build = "gpt2_tokenizer", build_gpt2_tokenizer
    elif family == "multilingual":
        name, build = GRAPHEME_VOCAB, build_grapheme_vocab
    else:
        name, build = "tokenizer.json", build_tokenizer_json
    try:
        return built_once(cache / name, build)
    except OSError as e:  # bare, the CLI's handler blamed the command's output folder (--out)
        raise SourceError(
            f"cannot write the tokenizer cache in {cache} ({e.strerror or e}); "
            "set TTS_WORKBENCH_CACHE to a folder you can write"
        ) from e
