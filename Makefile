# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test checks lint lab docs clean browser-test integration-test

venv: $(STAMP)

# Everything is pinned in requirements.lock and installed with --no-deps: chatterbox-tts's own
# metadata asks for torch==2.6.0 (CUDA, ~6 GB) and gradio, which we do not want (docs/environment.md).
# uv installs the lock (pip is used only to install uv): it unpacks the wheels and compiles
# their bytecode in parallel, 1 min 3 s in a fresh clone against pip's 1 min 46 s
# (docs/measurements.md). The bytecode must be compiled: this environment sets
# PYTHONDONTWRITEBYTECODE, so a module without a .pyc is compiled again by every process that
# imports it. uv does not read pip's settings,
# so pip's find-links folder (where this machine keeps its CPU torch wheel) is passed on.
# Without it uv takes PyPI's torch, the CUDA build, which does not import without the NVIDIA
# libraries the lock leaves out: the recipe checks the import and says what to do.
# PyPI's torchaudio wheels carry a C extension linked against CUDA torch; chatterbox only uses
# torchaudio's pure-Python parts (kaldi fbank, Resample), so the extension is removed and
# torchaudio falls back to them (tests/test_environment.py checks both calls work).
UV_VERSION := 0.13.9
UV_INSTALL = $(BIN)/uv pip install -q --python $(BIN)/python --no-deps \
	$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "uv==$(UV_VERSION)"
	$(UV_INSTALL) --compile-bytecode -r requirements.lock
	rm -f $$($(BIN)/python -c "import importlib.util,pathlib;print(pathlib.Path(importlib.util.find_spec('torchaudio').origin).parent/'lib')")/*.so
	$(UV_INSTALL) --no-build-isolation -e .
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "error: torch does not import: \
	PyPI's torch 2.13.0 for Linux is the CUDA build, whose NVIDIA libraries the lock leaves out. Put \
	the CPU wheel (torch-2.13.0+cpu) in a folder and name it in PIP_FIND_LINKS, or try PyTorch's CPU \
	index (UV_INDEX=https://download.pytorch.org/whl/cpu), then make clean and make again \
	(docs/environment.md)" >&2; exit 1; }
	touch $(STAMP)

demo: venv
	$(BIN)/tts-workbench diagnose --model tiny

# Two tiers. `make test` (the developer's loop, under 10 minutes from a fresh clone): tests/ but
# what is marked `integration`, with lint and the docs build. `make integration-test`: the
# notebooks under nbval, the tests that start servers or pipelines of processes (the Ray
# Serve server, TensorBoard, the GPU check's dry run and its other process pipelines) and the
# coldest compiles (a stream's CFM estimator shapes, the engine's buckets, Turbo's and the
# bfloat16 T3 step), each seconds to a minute or two. Tests of what the workbench does around a
# compile (timing, reuse, guards) run dynamo with its eager backend (tests/conftest.py, traced_only).
# `.ci/run` runs both, then `make browser-test` (docs/measurements.md, "Set-up and test times").
# The tests run in two pytest-xdist workers, one per core, each file (each notebook) whole on one
# worker, and one OpenMP thread each: most tests here are small-model steps bound by Python
# dispatch, so two workers use both cores where one process used about one, and two threads per
# worker would only fight over the cores (docs/measurements.md, "make test").
# `checks` (lint, then the strict docs build) runs beside them, its log printed after the tests:
# in a fresh clone mypy alone takes ~28 s of one core, which the tests leave idle part of the time.
# Either failing fails `make test`.
# (Through SUBMAKE: a recipe line naming $(MAKE) itself would run even under `make -n`.)
# Inductor compiles each graph's C++ kernels in one thread (TORCHINDUCTOR_COMPILE_THREADS=1):
# its default pool of compile processes, started in every process that compiles (both workers,
# notebook kernels, CLI subprocesses), costs more CPU than it saves when both cores are busy
# (a cold compile of the tiny T3 step: 52 -> 39 CPU-s; docs/measurements.md, "make test").
# WARM fills, once and beside the checks, two caches that both workers would otherwise fill at
# the same moment in their first test: numba's JIT of librosa's kernels (~25 s of one core,
# kept in the venv) and Inductor's one-off probes of the C++ compiler (~15 s, kept in its cache).
PYTEST := OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile
WARM := OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 $(BIN)/python -c \
	"import librosa.core.audio, librosa.core.pitch, torch; torch.compile(lambda x: x.sin() + 1)(torch.ones(8))"
SUBMAKE = $(MAKE)
test: venv
	@log=$$(mktemp); $(SUBMAKE) --no-print-directory checks >"$$log" 2>&1 & checks=$$!; \
	trap 'kill $$checks 2>/dev/null; rm -f "$$log"; exit 130' INT TERM; \
	$(WARM); \
	$(PYTEST) -q tests -m "not integration" -p no:cacheprovider; tests=$$?; \
	wait $$checks; checked=$$?; cat "$$log"; rm -f "$$log"; \
	[ $$checked = 0 ] || echo "make test: lint or the docs build failed (above)"; \
	[ $$tests = 0 ] && [ $$checked = 0 ]

# Every notebook is an integration test (conftest.py marks them).
integration-test: venv
	$(WARM)
	$(PYTEST) -q tests notebooks -m integration --nbval-lax --nbval-current-env --nbval-cell-timeout=300 \
	  --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider

# The docs build's log is shown only on failure (not `mkdocs -q`: in mkdocs 1.6 --quiet also
# hides the warnings that --strict counts, so a broken link would pass).
checks: lint
	out=$$(NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site 2>&1) || { printf '%s\n' "$$out"; exit 1; }

# JupyterLab and TensorBoard in headless Chromium (browser_tests/): Debian's chromium and
# chromium-driver are installed when missing (as root, or through sudo).
browser-test: venv
	$(UV_INSTALL) -r requirements-browser.lock
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }
	$(BIN)/ruff check browser_tests && $(BIN)/ruff format --check browser_tests && $(BIN)/mypy browser_tests
	SE_OFFLINE=true $(BIN)/python -m pytest -q browser_tests -p no:cacheprovider

lint: venv
	$(BIN)/ruff check tts_workbench tests conftest.py notebooks scripts docs/hooks
	$(BIN)/ruff format --check tts_workbench tests conftest.py notebooks scripts docs/hooks
	$(BIN)/mypy tts_workbench scripts
	$(BIN)/lint-imports

lab: venv
	$(BIN)/jupyter lab notebooks

# The documentation site (mkdocs.yml, docs/, the notebooks with their stored outputs) into site/.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs notebooks/runs
