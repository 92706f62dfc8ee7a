"""Checkpoint folders: saved in each family's upstream ``from_local`` layout, loaded back.

``save_checkpoint`` writes a model (float32, float16 or bfloat16) with a ``tts_workbench.json``
that names its family, architecture and each file's dtype; the new folder replaces the old one
whole.
``load_folder`` reads those folders and upstream's own layouts (safetensors, or the
chatterbox-streaming fork's ``.pt`` files), keeping each file's dtype or not.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.t3 import T3
from chatterbox.models.voice_encoder import VoiceEncoder
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.constants import dtype_name, parse_dtype
from ..core.devices import check_device
from ..core.errors import ConfigError, FamilyError, SourceError, WorkbenchError, as_int, error_line
from ..core.families import FAMILIES, Family, TTSModel, family_of
from ..core.files import beside, remove
from ..core.patching import holder_of
from .builders import TINY_BACKBONES, TinyConfig, assemble, build_s3gen, build_t3, no_init, own_random_state
from .frontends import GPT2_TOKENIZER_FILES, missing_tokens, read_tokenizer, save_gpt2_tokenizer

METADATA_FILE = "tts_workbench.json"
PT_LAYOUT = ("ve.pt", "t3_cfg.pt", "s3gen.pt", "tokenizer.json")  # chatterbox-streaming fork
# Turbo's tokenizer as upstream's hub repository holds it: the slow tokenizer's files and no
# tokenizer.json (save_checkpoint writes both kinds). AutoTokenizer reads either kind beside
# tokenizer_config.json; of these it needs the first two.
TURBO_HUB_TOKENIZER = ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json")
# The families whose upstream from_local loads S3Gen with strict=False (tts.py), keeping a file
# with tensors S3Gen lacks; Turbo's and Multilingual's load it strictly and refuse such a file
# (Turbo's meanflow S3Gen copied into a multilingual folder, say).
S3GEN_EXTRA_TENSORS_ALLOWED = ("standard",)
# Turbo's meanflow S3Gen's own tensors (its time embedding mixer), which the others' S3Gen lacks.
MEANFLOW_ONLY = "flow.decoder.estimator.time_embed_mixer."
# Each family's layouts: its own, and for the standard family the chatterbox-streaming fork's.
LAYOUTS = [(f, f.files) for f in FAMILIES.values()] + [(FAMILIES["standard"], PT_LAYOUT)]


def hub_files(family: Family) -> tuple[str, ...]:
    """``family``'s ``from_local`` layout as upstream's hub repository holds it (``conds.pt``
    aside): Turbo's with the slow tokenizer's files in place of ``tokenizer.json``."""
    if family.name != "turbo":
        return family.files
    return tuple(g for f in family.files for g in (TURBO_HUB_TOKENIZER if f == "tokenizer.json" else (f,)))


def save_checkpoint(tts: TTSModel, folder: str | Path, dtype: torch.dtype | str = torch.float32) -> Path:
    """Write ``tts`` in its family's upstream ``from_local`` layout, floating tensors cast to
    ``dtype``: float32, float16 or bfloat16, or its name (an integer type would write zeros;
    the voice, ``conds.pt``, is always float32). A ``tts_workbench.json`` beside the weights
    names the family, the architecture and each file's dtype.

    The files go into a new folder that then replaces ``folder`` whole: interrupted, ``folder``
    is still the previous checkpoint (or absent), never a mix of two. A folder holding anything
    but a previous checkpoint (files its save did not write) is refused rather than replaced, and
    so is a mount point (it cannot be moved aside).
    What a save killed outright left beside the folder is cleared first: a half-written new
    folder is deleted, a previous checkpoint moved aside is put back (or deleted, if the folder
    is there)."""
    cast_to = parse_dtype(str(dtype))  # "torch.float16" and "float16" alike; refused before any write
    family = _family_to_save(tts)  # before any folder is made (before, the parents were, then refused)
    folder = Path(folder)
    real = folder.resolve()  # a link to a folder: the folder it names is replaced
    if os.path.ismount(real):  # it cannot be moved aside (EBUSY): refused before anything is written
        raise _mount_point(folder)
    _sweep_stale(real)
    _check_replaceable(folder, real)
    real.parent.mkdir(parents=True, exist_ok=True)
    partial = beside(real, "partial")
    with _writing(partial):
        try:
            partial.mkdir()
            _write_checkpoint(tts, family, partial, cast_to)
            _check_replaceable(folder, real)  # again: a file may have been added meanwhile
            _replace_folder(partial, real, folder)
        finally:
            remove(partial)  # there only if the save failed
    return folder


def _family_to_save(tts: Any) -> Family:
    """The family of the model ``tts``, refused with the fix for a wrapper of one (told by its
    ``.tts``: the wrappers live in runtime/, a layer above) and for a model an open wrapper holds,
    whose weights are then the wrapper's, cast to its dtype policy's."""
    wrapped = getattr(tts, "tts", None)
    if any(isinstance(wrapped, f.model_class) for f in FAMILIES.values()):  # a subclass too, as family_of
        when = (
            " once the wrapper is closed (close(), or the end of its with block)"
            if holder_of(wrapped) is not None
            else ""
        )
        raise ConfigError(
            f"{type(tts).__name__} is not a Chatterbox model but a wrapper of one: save the model it "
            f"wraps, pass its .tts{when}"
        )
    family = family_of(tts)  # refuses anything else that is no model, naming the three classes
    holder = holder_of(tts)  # of its components: a model object sharing them (copy.copy) too
    if holder is not None:
        raise ConfigError(
            f"this model is held by an open {type(holder).__name__}: its weights are the wrapper's, cast "
            "to its dtype policy's, and a save would write those as the model's own. Close the wrapper "
            "first (close(), or the end of its with block), or save the model before wrapping it"
        )
    return family


def _saved_names(folder: Path) -> set[str]:
    """The names a save wrote into checkpoint ``folder``: its metadata's ``files``, or for a
    checkpoint written before that was recorded, every name any save writes."""
    try:
        meta = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    files = meta.get("files") if isinstance(meta, dict) else None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return {*files, METADATA_FILE}
    every = {name for f in FAMILIES.values() for name in f.files}
    return every | {*PT_LAYOUT, *GPT2_TOKENIZER_FILES, "conds.pt", METADATA_FILE}


def _check_replaceable(folder: Path, real: Path) -> None:
    """Refuse to replace ``real`` unless it is absent, an empty folder, or a checkpoint that
    holds only what its save wrote."""
    if not real.exists():
        return
    if not (real / METADATA_FILE).exists():
        if real.is_file() or any(real.iterdir()):
            raise SourceError(
                f"{folder} is neither an empty folder nor a checkpoint written by save_checkpoint() "
                f"(it has no {METADATA_FILE}); a save replaces the whole folder: give a new or empty folder"
            )
        return
    known = _saved_names(real)
    other = sorted(p.name for p in real.iterdir() if p.name not in known)
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise SourceError(
            f"{folder} holds {', '.join(other[:3])}{more}, which save_checkpoint() did not write; "
            "a save replaces the whole folder, deleting them: move them out or give another folder"
        )


_STALE = re.compile(r"\.(partial|old)\.(\d+)\.\d+")
# The folders beside a checkpoint that this process's saves are writing now (``_writing``).
_WRITING: set[Path] = set()


@contextmanager
def _writing(side: Path) -> Iterator[None]:
    """Mark ``side``, a folder beside a checkpoint named for this process, as written by a save
    running now, while the block runs: marked before it is made, unmarked once it is gone (or,
    after a failure, left for the next save to clear)."""
    _WRITING.add(side)
    try:
        yield
    finally:
        _WRITING.discard(side)


def _abandoned(side: Path, pid: int) -> bool:
    """Whether ``side``, a folder beside a checkpoint named for process ``pid``, belongs to no save
    running now: no process ``pid`` runs (told only on POSIX, where signal 0 only probes), or
    ``pid`` is this process's and none of its saves writes ``side``, left by an earlier process
    with the same PID (a container's process is PID 1 on every restart)."""
    if pid == os.getpid():  # before the probe, which finds this process alive
        return side not in _WRITING
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def _stale_siblings(real: Path, tag: str) -> list[Path]:
    """``beside(real, tag)`` folders left by saves no longer running (``_abandoned``), newest first."""
    prefix = f".{real.name}"
    found = []
    try:
        entries = list(real.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        m = _STALE.fullmatch(p.name[len(prefix) :]) if p.name.startswith(prefix) else None
        if m and m.group(1) == tag and _abandoned(p, int(m.group(2))):
            try:
                found.append((p.lstat().st_mtime, p))
            except FileNotFoundError:  # a save of this process finished with it meanwhile
                continue
    return [p for _, p in sorted(found, reverse=True)]


def _sweep_stale(real: Path) -> None:
    """Clear what saves killed outright (SIGKILL, out of memory) left beside ``real``."""
    for partial in _stale_siblings(real, "partial"):
        remove(partial)
    for old in _stale_siblings(real, "old"):
        if not real.exists() and not real.is_symlink():
            logging.getLogger(__name__).warning("putting back %s, left aside by an interrupted save", old)
            old.rename(real)
        else:
            remove(old)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """A tensor on the CPU, floating point cast to ``dtype``; anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    return (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()


def _write_checkpoint(tts: TTSModel, family: Family, folder: Path, dtype: torch.dtype) -> None:
    parts = dict(zip(family.files[:3], (tts.ve, tts.t3, tts.s3gen), strict=True))
    for name, module in parts.items():
        state = {
            k: _cast(v, dtype)
            for k, v in module.state_dict().items()
            # After a first inference upstream T3 keeps `patched_model`, a second view of the
            # same weights; upstream checkpoints do not contain it.
            if not k.startswith("patched_model.")
        }
        if module is tts.t3 and family.name == "turbo":
            # Upstream Turbo loads GPT-2's wte (strictly) and then deletes it: write one, unused.
            cfg = tts.t3.cfg
            state["tfmr.wte.weight"] = torch.zeros(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        if name.endswith(".pt"):
            torch.save(state, folder / name)
        else:
            save_file(state, str(folder / name))
    if family.name == "turbo":
        save_gpt2_tokenizer(tts.tokenizer.backend_tokenizer, folder)
    else:
        tts.tokenizer.tokenizer.save(str(folder / family.files[3]))
    if tts.conds is not None:  # float32: upstream's pipeline runs a voice only in float32
        conds: Any = tts.conds
        t3 = replace(conds.t3, **{k: _cast(v, torch.float32) for k, v in vars(conds.t3).items()})
        type(conds)(t3, {k: _cast(v, torch.float32) for k, v in conds.gen.items()}).save(folder / "conds.pt")
    tiny = tts.t3.hp.llama_config_name in TINY_BACKBONES.values()
    meta = {
        "family": family.name,
        "architecture": "tiny" if tiny else "full",
        "tiny_config": asdict(_config_of(tts.t3)),
        "dtypes": {Path(name).stem: dtype_name(dtype) for name in parts},
        # what a later save may delete: anything else in the folder makes it refuse
        "files": sorted({*(p.name for p in folder.iterdir()), METADATA_FILE}),
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2))


def _mount_point(folder: Path) -> SourceError:
    """The refusal of a save into ``folder``, a mount point, which cannot be moved aside."""
    return SourceError(
        f"{folder} is a mount point; a save replaces the folder whole: give a folder inside it"
    )


def _replace_folder(new: Path, folder: Path, given: Path) -> None:
    """Rename ``new`` to ``folder`` (``given``, resolved); an existing ``folder`` is moved aside
    first and deleted after (put back if the rename fails)."""
    if not folder.exists():
        new.rename(folder)
        return
    old = beside(folder, "old")
    with _writing(old):
        try:
            folder.rename(old)
        except OSError as e:  # a mount point os.path.ismount does not tell (a bind mount of a folder)
            if e.errno in (errno.EBUSY, errno.EXDEV):
                raise _mount_point(given) from e
            raise
        try:
            new.rename(folder)
        except BaseException:
            old.rename(folder)
            raise
        shutil.rmtree(old)


def _config_of(t3: T3) -> TinyConfig:
    """The TinyConfig a small T3 was built with (its S3Gen sizes are always ``TINY``'s)."""
    c = t3.cfg
    return TinyConfig(
        t3_layers=c.num_hidden_layers,
        t3_hidden=c.hidden_size,
        t3_heads=c.num_attention_heads,
        t3_intermediate=getattr(c, "intermediate_size", None)
        or getattr(c, "n_inner", None)
        or 4 * c.hidden_size,
    )


_T = TypeVar("_T")
# What reading a damaged file raises (JSONDecodeError, UnicodeDecodeError: ValueErrors); the
# tokenizers library raises a bare Exception ("EOF while parsing"), caught by its exact type.
_UNREADABLE = (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError)


def _read(folder: Path, what: str, read: Callable[[], _T]) -> _T:
    """``read()`` of the file(s) ``what`` in checkpoint ``folder``; one it cannot read (truncated,
    overwritten) is named with the fix instead of a parser's error that names no file."""
    try:
        return read()
    except Exception as e:
        if isinstance(e, WorkbenchError) or not (type(e) is Exception or isinstance(e, _UNREADABLE)):
            raise  # the workbench's own refusals (ValueErrors too), and bugs, are not the file's
        # torch's unpickling message advises weights_only=False, unsafe for a file that is damaged
        why = "it holds no plain tensors" if isinstance(e, pickle.UnpicklingError) else error_line(e, False)
        raise SourceError(
            f"cannot read {what} in {folder}: {why}. The file is "
            "truncated or overwritten; copy it again or re-export it with save_checkpoint()"
        ) from e


def _read_state(path: Path, owned: bool) -> Mapping[str, torch.Tensor]:
    """The tensors of weights file ``path``; ``owned``: in memory of their own, for a model that
    keeps them as its parameters (``assign=True``). safetensors' tensors are views of the file it
    maps: a cp over the file would change the model's weights, a truncated file would kill the
    process (SIGBUS) at their next read, and a deleted one would keep its disk space held."""
    if path.suffix == ".safetensors":

        def read_safetensors() -> Mapping[str, torch.Tensor]:
            # Copied out of the mapping tensor by tensor: its pages are the file's, which the kernel
            # can drop, so memory holds one copy. safetensors' load(path.read_bytes()) would hold the
            # whole file and then a copy of each tensor beside it (twice a full-size T3), as read-only
            # buffers. Without ``owned``, load_state_dict copies into the model's own parameters.
            state = load_file(str(path))
            return {k: v.clone() for k, v in state.items()} if owned else state

        return _read(path.parent, path.name, read_safetensors)

    def read() -> Mapping[str, torch.Tensor]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):  # load_state_dict's TypeError would name no file
            raise ValueError(f"it holds a {type(state).__name__}, not tensors by name")
        return state

    return _read(path.parent, path.name, read)


def _metadata(path: Path) -> dict[str, Any]:
    """A checkpoint's ``tts_workbench.json``; empty where there is none (upstream's own layout)."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # truncated or overwritten (JSONDecodeError, UnicodeDecodeError)
        raise SourceError(
            f"{path} is damaged ({e}): copy the folder again, or save the model again with save_checkpoint()"
        ) from e
    return meta


def _tiny_config(meta: dict[str, Any], path: Path) -> TinyConfig:
    """The sizes of a small model, as its metadata at ``path`` records them, refused where the
    builders cannot build them (a damaged file: before, a ZeroDivisionError or TypeError)."""
    try:
        cfg = TinyConfig(**meta.get("tiny_config", {}))
    except TypeError as e:  # a key TinyConfig does not have, or no mapping at all
        why: str | None = str(e)
    else:
        why = _unbuildable(cfg)
    if why is not None:
        raise SourceError(
            f"{path} records a tiny_config this version cannot read ({why}): save the model again with "
            "save_checkpoint()"
        )
    return cfg


def _unbuildable(cfg: TinyConfig) -> str | None:
    """What in ``cfg`` the builders cannot build, or None: a size that is no positive whole number,
    a T3 width its heads do not split, a flow width S3Gen's group norms (8 groups) do not split,
    or a HiFT width its three halvings bring to 0."""
    for name, value in asdict(cfg).items():
        n = as_int(value)
        if n is None or n < 1:
            return f"{name} is {value!r}, not a positive whole number"
    if cfg.t3_hidden % cfg.t3_heads:
        return f"t3_hidden {cfg.t3_hidden} is no multiple of t3_heads {cfg.t3_heads}"
    if cfg.cfm_channels % 8:
        return f"cfm_channels {cfg.cfm_channels} is no multiple of 8"
    if cfg.hift_channels < 8:
        return f"hift_channels {cfg.hift_channels} is below 8"
    return None


def _missing(folder: Path, family: Family, files: tuple[str, ...]) -> list[str]:
    """The files of layout ``files`` that ``folder`` lacks: of Turbo's, ``tokenizer.json`` only
    where the slow tokenizer's are missing too (upstream's hub repository has only those)."""
    missing = [f for f in files if not (folder / f).exists()]
    if family.name == "turbo" and "tokenizer.json" in missing:
        missing.remove("tokenizer.json")
        if not all((folder / f).exists() for f in TURBO_HUB_TOKENIZER[:2]):
            missing.append("tokenizer.json (or vocab.json and merges.txt)")
    return missing


def check_left_aside(folder: Path) -> None:
    """For a missing checkpoint ``folder``, a SourceError naming the previous checkpoint a save
    interrupted before it finished left aside, and how to put it back; none if there is none."""
    real = folder.resolve()  # for a link, the folder it names: the one moved aside, and mv's target
    aside = _stale_siblings(real, "old")
    if aside:
        raise SourceError(
            f"model folder {folder} does not exist, but a save interrupted before it finished "
            f"left the previous checkpoint in {aside[0]}: rename it to {real} "
            f"({shlex.join(['mv', str(aside[0]), str(real)])}), or save to {folder} again, which puts it "
            "back first"
        )


def folder_family(folder: Path, family: str | None = None) -> tuple[Family, tuple[str, ...], dict[str, Any]]:
    """The folder's family, the files of its layout and its metadata. The family is the one its
    ``tts_workbench.json`` records; without one (upstream's own layout), the one whose T3 file
    is there, or ``family`` where the folder holds two families' T3 files. A folder of another
    family than ``family`` is refused (``load_folder`` would refuse it)."""
    if folder.is_file():
        raise SourceError(f"model folder {folder} is a file; give the folder that holds it ({folder.parent})")
    if not folder.is_dir():
        check_left_aside(folder)
        raise SourceError(
            f"model folder {folder} does not exist: give a folder written by save_checkpoint() "
            "or by an upstream from_local layout"
        )
    meta_path = folder / METADATA_FILE
    meta = _metadata(meta_path)
    if meta.get("architecture") == "tiny":  # its sizes refused here, before anything is built or written
        _tiny_config(meta, meta_path)
    recorded = meta.get("family")
    # a list or a mapping (unhashable: a TypeError below) is no family's name either
    if recorded is not None and (not isinstance(recorded, str) or recorded not in FAMILIES):
        raise SourceError(
            f"{meta_path} records an unknown family {recorded!r} (known: {', '.join(FAMILIES)}): "
            "save the model again with save_checkpoint()"
        )
    # Files of another family copied in do not decide: the recorded family's own are read.
    layouts = [(f, files) for f, files in LAYOUTS if recorded in (None, f.name)]
    present = [(f, files) for f, files in layouts if (folder / files[1]).exists()]
    if not present and recorded is not None:
        _check_recorded(folder, recorded)
    if not present and recorded is None:
        expected = "; ".join(f"{f.name}: {', '.join(f.files)}" for f in FAMILIES.values())
        raise SourceError(f"model folder {folder} holds no T3 weights of any family ({expected})")
    found: dict[str, str] = {}  # family: its T3 file; two only where no family is recorded
    for f, files in present:
        found.setdefault(f.name, files[1])
    if len(found) > 1:
        if family not in found:
            both = " and ".join(f"{name} ({t3})" for name, t3 in found.items())
            # another family asked for: the family is at fault; none asked: the folder is ambiguous
            raise (SourceError if family is None else FamilyError)(
                f"model folder {folder} holds the T3 weights of {both}, and no {METADATA_FILE} records "
                "which to load (upstream's standard and multilingual models come from one hub "
                f"repository): give family={' or '.join(map(repr, found))} to load_model, load_folder or "
                f"PerformanceOptimizedTTS.from_local (on the command line: --family "
                f"{' or --family '.join(found)})"
            )
        present = [(f, files) for f, files in present if f.name == family]
    chosen, files = (present or layouts)[0]
    if family is not None and family != chosen.name:
        raise FamilyError(
            f"model folder {folder} holds a {chosen.name} model ({files[1]}), not a {family} one: "
            f"load it as {chosen.name} (family={chosen.name!r}, on the command line --family "
            f"{chosen.name}) or leave the family out"
        )
    missing = _missing(folder, chosen, files)
    if missing:
        recorded_by = f" (the family its {METADATA_FILE} records)" if recorded else ""
        raise SourceError(
            f"{chosen.name} model folder {folder} is missing {', '.join(missing)}{recorded_by}: "
            "copy them in, or save the model again with save_checkpoint()"
        )
    return chosen, files, meta


def _check_recorded(folder: Path, recorded: str) -> None:
    """Refuse checkpoint ``folder``, whose metadata records the family ``recorded`` but which lacks
    that family's T3 file, where it holds other families' T3 files: the metadata is wrong, or that
    file is lost (else it is only missing files, named as such)."""
    others: dict[str, str] = {}  # family: its T3 file in the folder
    for f, files in LAYOUTS:
        if (folder / files[1]).exists():
            others.setdefault(f.name, files[1])
    if others:
        held = " and ".join(f"{t3} ({name})" for name, t3 in others.items())
        names = " or ".join(f'"{name}"' for name in others)  # as JSON writes them
        raise SourceError(
            f"{METADATA_FILE} in {folder} records {recorded}, but the folder holds no {recorded} T3 weights "
            f"({FAMILIES[recorded].files[1]}), only {held}: if those are the weights to load, set "
            f'"family" in {METADATA_FILE} to {names} (or, for upstream\'s full-size weights, delete it); '
            f"if not, copy in {FAMILIES[recorded].files[1]}"
        )


def load_folder(
    folder: str | Path, device: str = "cpu", keep_dtype: bool = True, family: str | None = None
) -> TTSModel:
    """Load a checkpoint folder of any family (safetensors, or the fork's ``.pt`` layout).

    The family is the one ``tts_workbench.json`` records, or for a folder without one (upstream's
    own layout) the one whose T3 file is there; ``family`` refuses a folder of another one, and
    picks one where a folder without that file holds two families' T3 files.
    ``keep_dtype=True`` keeps each tensor's saved dtype (a float16 file stays float16).
    ``keep_dtype=False`` loads the way upstream ``from_local`` does: ``load_state_dict`` copies
    into freshly built float32 parameters, so a float16 checkpoint silently comes back as float32.
    Either way the model's weights are its own: files copied over the folder later leave it as it is.
    """
    folder = Path(folder)
    dev = check_device(device)
    found, layout, meta = folder_family(folder, family)
    handling = sys.exc_info()[1]  # the caller's error, if it loads in an except block: not the load's
    try:
        return _load(folder, dev, found, layout, meta, keep_dtype)
    except BaseException as e:
        # A traceback keeps its frames' locals, and IPython keeps the last error's
        # (sys.last_traceback) until the next one: a failed load would hold every weight it read
        # (GBs at full size; without keep_dtype, views of the files, mapped). The lines stay.
        _clear_frames(e, handling)
        raise


def _clear_frames(error: BaseException, outer: BaseException | None) -> None:
    """Drop the locals of the finished frames in the tracebacks of ``error`` and of the errors
    it was raised from or while handling (torch's ``load_state_dict`` holds a copy of a state),
    up to ``outer``, an error handled before."""
    seen: set[int] = set()
    chained: BaseException | None = error
    while chained is not None and chained is not outer and id(chained) not in seen:
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__


def _load(
    folder: Path,
    dev: torch.device,
    found: Family,
    layout: tuple[str, ...],
    meta: dict[str, Any],
    keep_dtype: bool,
) -> TTSModel:
    """``load_folder`` of ``folder``, which ``folder_family`` found holds a ``found`` model in
    ``layout``, with metadata ``meta``."""
    architecture = meta.get("architecture", "full")
    states = {name: _read_state(folder / name, owned=keep_dtype) for name in layout[:3]}
    cfg = _tiny_config(meta, folder / METADATA_FILE) if architecture == "tiny" else None
    # The construction and the assembly (upstream's watermarker) draw: from their own generator, so a
    # load leaves the global one (and other threads' draws from it) alone.
    with own_random_state():
        with no_init():  # every weight is overwritten below
            t3, s3gen, ve = build_t3(found.name, cfg), build_s3gen(found.name, cfg), VoiceEncoder()
        _load_weights(folder, found.name, layout, meta, states, (ve, t3, s3gen), keep_dtype)
        tokenizer = _read_tokenizer(folder, found.name, layout[3])
        tts = assemble(found.name, t3, s3gen, ve, tokenizer, dev)
    if (folder / "conds.pt").exists():
        tts.conds = _read_voice(folder, found).to(str(dev))
    return tts


def _read_tokenizer(folder: Path, family: str, name: str) -> Any:
    """The text front end of checkpoint ``folder``: its file ``name``, or Turbo's files; one of
    another family (a right name, a wrong file) is named with the fix."""
    try:
        if family == "turbo":  # AutoTokenizer reads the folder, and does not say which file failed
            present = [f for f in GPT2_TOKENIZER_FILES if (folder / f).exists()]
            what = f"Turbo's tokenizer (one of {', '.join(present)})"
            tokenizer = _read(folder, what, lambda: read_tokenizer(family, folder))
            name = name if (folder / name).exists() else TURBO_HUB_TOKENIZER[0]  # what it read
        else:
            tokenizer = _read(folder, name, lambda: read_tokenizer(family, folder / name))
    except AssertionError as e:  # upstream EnTokenizer's and MTLTokenizer's `assert SOT in voc`
        raise _another_familys(folder, family, name, "[START]/[STOP] token") from e
    lacks = missing_tokens(family, tokenizer)
    if lacks is not None:
        raise _another_familys(folder, family, name, lacks)
    return tokenizer


def _another_familys(folder: Path, family: str, name: str, lacks: str) -> SourceError:
    return SourceError(
        f"{name} in {folder} has no {lacks}: another family's tokenizer? Copy in the "
        f"{family} model's own {name}, or re-export it with save_checkpoint()"
    )


def _read_voice(folder: Path, family: Family) -> Any:
    """The voice saved in checkpoint ``folder`` (``conds.pt``); a file of another kind is named
    with the fix."""
    conds: Any = family.conditionals
    try:
        return _read(folder, "conds.pt", lambda: conds.load(folder / "conds.pt", map_location="cpu"))
    except (KeyError, TypeError) as e:  # upstream's load: cls(T3Cond(**kwargs["t3"]), kwargs["gen"])
        raise SourceError(
            f"conds.pt in {folder} is not a {family.name} Conditionals file, a voice saved with the model "
            f"({type(e).__name__}: {e}): copy in the model's own conds.pt, or delete it and prepare a voice "
            "from a reference"
        ) from e


def _load_weights(
    folder: Path,
    family: str,
    layout: tuple[str, ...],
    meta: dict[str, Any],
    states: dict[str, Any],
    modules: tuple[VoiceEncoder, T3, S3Gen],
    keep_dtype: bool,
) -> None:
    """Load ``states`` (read from ``folder``'s files of ``layout``) into the VoiceEncoder, T3 and
    S3Gen ``modules``, refusing weights that do not fit or are missing (``load_folder``)."""
    ve, t3, s3gen = modules
    t3_state: Any = states[layout[1]]
    if "model" in t3_state:  # upstream from_local accepts this wrapped form too
        t3_state = t3_state["model"][0]
    loaded = []
    for module, state, strict in (
        (ve, states[layout[0]], True),
        (t3, t3_state, True),
        (s3gen, states[layout[2]], False),
    ):
        try:
            loaded.append(module.load_state_dict(state, strict=strict, assign=keep_dtype))
        except RuntimeError as e:
            raise SourceError(_misfit(folder, family, meta, e)) from e
    unexpected = sorted(loaded[2].unexpected_keys)
    # Even where extra tensors are allowed, Turbo's meanflow ones are no spare buffers: its S3Gen
    # loaded into the standard one ran 10 steps with what a one-step meanflow learned (before
    # 2026-12-07, silently).
    if unexpected and (
        family not in S3GEN_EXTRA_TENSORS_ALLOWED or any(k.startswith(MEANFLOW_ONLY) for k in unexpected)
    ):
        raise SourceError(
            f"{layout[2]} in {folder} is not this family's S3Gen: {len(unexpected)} of its tensors are "
            f"not in the {family} S3Gen ({_first_three(unexpected)}), as in another family's; copy "
            f"in the {family} model's own {layout[2]}, or re-export it with save_checkpoint()"
        )
    # S3Gen loads non-strictly, for the buffers upstream's own files may lack (rebuilt by the
    # constructor); any other missing weight would stay uninitialised memory.
    missing = [k for k in loaded[2].missing_keys if k not in S3Gen.ignore_state_dict_missing]
    if missing and all(k.startswith(MEANFLOW_ONLY) for k in missing):
        raise SourceError(
            f"{layout[2]} in {folder} is not this family's S3Gen: it lacks the {family} S3Gen's meanflow "
            f"tensors ({_first_three(missing)}), as the standard or multilingual model's S3Gen does; copy "
            f"in the {family} model's own {layout[2]}, or re-export it with save_checkpoint()"
        )
    if missing:
        raise SourceError(
            f"{layout[2]} in {folder} lacks {len(missing)} of S3Gen's tensors ({_first_three(missing)}): "
            "the file is incomplete; copy it again or re-export it with save_checkpoint()"
        )


def _first_three(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _misfit(folder: Path, family: str, meta: dict[str, Any], e: RuntimeError) -> str:
    """Why the weights in ``folder`` do not fit: torch's first size mismatch (which tells the
    sizes apart) or else its first complaint, and where the folder records no architecture, that
    it was read as upstream's full-size model."""
    # torch's message: "Error(s) in loading state_dict for T3:", then a line per complaint
    # ("Missing key(s) in state_dict: ...", "size mismatch for ...")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sizes = [line for line in lines if line.startswith("size mismatch")]
    first = (sizes or lines[1:] or lines)[0].rstrip(".")
    first = first if len(first) <= 300 else f"{first[:300]} ..."  # a list of every missing key
    architecture = meta.get("architecture", "full")
    why = f"weights in {folder} do not fit the {family} {architecture} architecture: {first}"
    if "architecture" in meta:
        return (
            f"{why}; the weights are not the ones its {METADATA_FILE} describes: copy in the "
            f"{METADATA_FILE} saved with them (for upstream's full-size weights, delete it), or save the "
            "model again"
        )
    return (
        f"{why}; with no {METADATA_FILE} recording its architecture the folder was read as upstream's "
        f"full-size model: copy {METADATA_FILE} in with the weights, or save the model again with "
        "save_checkpoint()"
    )
