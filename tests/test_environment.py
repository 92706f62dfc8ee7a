"""The pinned environment: one set of versions in three files, and the torchaudio workaround."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==") for d in deps)


def test_environment_yml_gives_python_and_leaves_the_packages_to_make() -> None:
    """Before 2026-12-04 it listed the pins for conda to pip-install with their dependencies, which
    cannot resolve (chatterbox-tts 0.1.7 asks for torch==2.6.0 and numpy<2)."""
    text = (ROOT / "environment.yml").read_text()
    assert "python=3.11" in text and "make test" in text
    assert not re.findall(r"^\s+- [A-Za-z0-9_.\-]+==\S+$", text, flags=re.M)


def test_lock_file_contains_every_top_level_pin() -> None:
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        lock[name.lower().replace("_", "-")] = version
    for name, version in _pyproject_pins().items():
        assert lock.get(name.lower().replace("_", "-")) == version, name


def test_installed_versions_match_the_pins() -> None:
    from importlib.metadata import version

    for name, pin in _pyproject_pins().items():
        assert version(name).split("+")[0] == pin, name


def test_torchaudio_pure_python_parts_work_without_its_cuda_extension() -> None:
    import torchaudio
    import torchaudio.compliance.kaldi as kaldi

    assert not torchaudio._extension._IS_TORCHAUDIO_EXT_AVAILABLE
    x = torch.randn(1, 16000)
    assert kaldi.fbank(x, num_mel_bins=80).shape == (98, 80)
    assert torchaudio.transforms.Resample(24000, 16000)(x).shape == (1, 10667)


def test_make_venv_stops_saying_what_to_do_when_torch_does_not_import(tmp_path: Path) -> None:
    # A machine without the CPU wheel gets PyPI's CUDA torch, which cannot import without the
    # NVIDIA libraries the lock leaves out: the recipe's check must fail and name the fixes.
    # The recipe is read from `make -n` (nothing runs) and its check run against a python
    # that cannot import torch.
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} -c "import no_such_module_here"\n')
    fake.chmod(0o755)
    out = subprocess.run(
        ["make", "-n", "-W", "requirements.lock", "venv", f"BIN={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    commands = out.replace("\\\n", "").splitlines()
    check = next(c for c in commands if c.startswith(f'{fake} -c "import torch"'))
    run = subprocess.run(["sh", "-c", check], capture_output=True, text=True)
    assert run.returncode != 0
    assert "torch does not import" in run.stderr
    assert "PIP_FIND_LINKS" in run.stderr and "make clean" in run.stderr
