"""The pinned environment: one set of versions in three files, and the torchaudio workaround."""

from __future__ import annotations

import os
import re
import subprocess
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
    # NVIDIA libraries the lock leaves out: the recipe must fail, name the fixes, and not stamp
    # the venv as installed (a `-` before its check would ignore the failure and stamp it).
    # The real `make venv` runs, every path it writes under tmp_path, against stubs: a python
    # that cannot import torch, and a pip and a uv that install nothing.
    venv = tmp_path / "venv"
    bin_dir = venv / "bin"
    bin_dir.mkdir(parents=True)  # what `$(PYTHON) -m venv` makes (PYTHON=true makes nothing)
    lib = tmp_path / "torchaudio_lib"  # where the recipe removes torchaudio's .so files
    stubs = {
        "python": f'#!/bin/sh\ncase "$2" in\n  "import torch") exit 1 ;;\n  *) echo {lib} ;;\nesac\n',
        "pip": "#!/bin/sh\nexit 0\n",
        "uv": "#!/bin/sh\nexit 0\n",
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    stamp = venv / ".installed"
    # an outer make's flags (`make -i test`: errors ignored) are not this make's
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    run = subprocess.run(
        ["make", "venv", "PYTHON=true", f"VENV={venv}", f"BIN={bin_dir}", f"STAMP={stamp}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0, run.stdout + run.stderr
    assert "torch does not import" in run.stderr
    assert "PIP_FIND_LINKS" in run.stderr and "make clean" in run.stderr
    assert not stamp.exists()
