"""Where a Chatterbox model comes from: one entry point, ``load_model``.

Every source returns an upstream model object of one of the three families (``families.py``:
``ChatterboxTTS``, ``ChatterboxTurboTTS``, ``ChatterboxMultilingualTTS``) built from the upstream
classes (T3, S3Gen, VoiceEncoder and the family's text front end): a random-weight build
(``builders.MODELS``), a checkpoint folder (``checkpoints.py``) or the real loaders
(``from_pretrained``, offline: files already in the hub's cache).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.constants import RANDOM_NO_STOP, dtype_name
from ..core.devices import check_device, out_of_memory
from ..core.errors import SourceError, error_line
from ..core.families import FAMILIES, TTSModel, components
from .builders import CONSTRUCTION, MODELS, SIZES, build_model
from .checkpoints import check_left_aside, folder_family, hub_files, load_folder
from .frontends import CANGJIE_FILE, offline_hub, read_cangjie

PRETRAINED = {
    "pretrained": "standard",
    "turbo-pretrained": "turbo",
    "multilingual-pretrained": "multilingual",
}


def load_pretrained(device: str = "cpu", family: str = "standard") -> TTSModel:
    """Upstream ``from_pretrained`` of ``family``, offline (files already in the hub's cache);
    a multilingual model's Chinese table read from the cached snapshot (``read_cangjie``)."""
    from huggingface_hub import constants, try_to_load_from_cache

    check_device(device)
    fam = FAMILIES[family]
    try:
        with offline_hub(constants), CONSTRUCTION:  # no tiny build's parts meanwhile
            cls: Any = fam.model_class
            model: TTSModel = cls.from_pretrained(device)
    except Exception as e:
        if out_of_memory(e):  # the files are there: no download helps
            raise
        chinese = f" ({CANGJIE_FILE} too, for Chinese)" if family == "multilingual" else ""
        raise SourceError(
            f"pretrained Chatterbox {family} weights could not be loaded ({_hub_failure(e, constants)}). "
            f"The workbench never downloads: download {', '.join(hub_files(fam))} and conds.pt{chinese} "
            f"from {fam.repo} on a connected machine, copy them into a folder and use "
            "load_model('/path/to/folder') (on the command line: --model /path/to/folder)"
        ) from e
    if family == "multilingual":  # its tokenizer reads no Chinese table offline: the snapshot's
        cached = try_to_load_from_cache(fam.repo, CANGJIE_FILE)
        if isinstance(cached, str):
            read_cangjie(model.tokenizer, Path(cached))
    return model


def _hub_failure(e: Exception, constants: Any) -> str:
    """Why a pretrained load failed: the error's type and first line, but for the hub's errors of
    files it has not cached, what is true of them here, not their advice (set HF_HUB_OFFLINE=0,
    check the connection), which no setting makes the workbench take."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return f"{type(e).__name__}: not in the hub's cache, {constants.HF_HUB_CACHE}"
    return error_line(e)  # other errors (a damaged cached file) say which in their first line


def is_named(source: str | Path) -> bool:
    """Whether ``source`` names a random-weight build or pretrained weights, not a folder
    (``load_model`` reads names before paths: a folder called ``tiny`` is not loaded as one)."""
    return source in MODELS or source in PRETRAINED


def source_family(source: str | Path, family: str | None = None) -> str:
    """The family of the model ``source`` names, before anything is built or loaded: a name's own,
    or a folder's (``folder_family``, ``family`` as ``load_folder`` takes it)."""
    if source in MODELS:
        return MODELS[str(source)][0]
    if source in PRETRAINED:
        return PRETRAINED[str(source)]
    return folder_family(Path(source), family)[0].name


def token_cap_note(source: str | Path | None) -> str:
    """Why a generation of ``source`` (None: not named) ran to its token cap: a random-weight
    build almost never samples the stop token; trained weights (pretrained, a folder) were cut off."""
    cut = "the speech may be cut short before its stop token: raise --tokens"
    if source is None:
        return f"{RANDOM_NO_STOP}; trained weights: {cut}"
    return RANDOM_NO_STOP if source in MODELS else cut


def check_source(source: str | Path, family: str | None = None) -> None:
    """A SourceError for a name that is no model source, or a path that is no checkpoint folder
    (a file, a folder without a family's files: ``folder_family``, ``family`` as ``load_folder``
    takes it), before anything is built or written (before 2026-12-04 any existing path passed,
    to be refused by the load later)."""
    if is_named(source):
        return
    if Path(source).exists():
        folder_family(Path(source), family)
        return
    names = f"{', '.join(SIZES)}, {', '.join(PRETRAINED)}"
    check_left_aside(Path(source))  # a bare name too: it is a folder there once put back
    if isinstance(source, str) and os.sep not in source:
        raise SourceError(f"unknown model source {source!r}: use one of {names} or a checkpoint folder")
    try:
        folder_family(Path(source), family)  # raises, saying what folder to give, as load_folder does
    except SourceError as e:
        raise SourceError(f"{e}, or a model name: {names}") from None


def load_model(source: str | Path, device: str = "cpu", seed: int = 0, family: str | None = None) -> TTSModel:
    """One entry point: a random-weight build (``MODELS``), ``"pretrained"`` (or
    ``"turbo-pretrained"``, ``"multilingual-pretrained"``) or a checkpoint folder (``family``:
    which to load of a folder holding two families' upstream files, as ``load_folder``'s).

    A folder loads as upstream ``from_local`` loads it: every weight in float32, whatever dtype
    it was saved in. The upstream pipeline this returns (``prepare_conditionals``, ``generate``,
    streaming, and ``conds.pt``, always float32) runs only in float32: a float16 or bfloat16
    model fails there on the first dtype mismatch. To run a half-precision export in its own
    dtype use ``PerformanceOptimizedTTS.from_local(folder)`` (its dtype policy casts what must
    match); ``load_folder(folder)`` gives the model with each file's dtype kept."""
    if family is not None and is_named(source):
        raise SourceError(f"family= is for a checkpoint folder: {source!r} names its family already")
    if source in MODELS:
        return build_model(str(source), device, seed)
    if source in PRETRAINED:
        return load_pretrained(device, family=PRETRAINED[str(source)])
    if isinstance(source, str) and os.sep not in source:
        check_source(source, family)
    return load_folder(Path(source), device, keep_dtype=False, family=family)


def model_summary(tts: TTSModel) -> dict[str, dict[str, object]]:
    """Parameters and dtypes per component (ve, t3, s3gen)."""
    out: dict[str, dict[str, object]] = {}
    for name, module in components(tts).items():
        params = list(module.parameters())
        out[name] = {
            "parameters": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params),
            "dtypes": sorted({dtype_name(p.dtype) for p in params}),
        }
    return out
