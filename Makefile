# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint lab docs clean browser-test

venv: $(STAMP)

# Everything is pinned in requirements.lock and installed with --no-deps: chatterbox-tts's own
# metadata asks for torch==2.6.0 (CUDA, ~6 GB) and gradio, which we do not want (README).
# PyPI's torchaudio wheels carry a C extension linked against CUDA torch; chatterbox only uses
# torchaudio's pure-Python parts (kaldi fbank, Resample), so the extension is removed and
# torchaudio falls back to them (tests/test_environment.py checks both calls work).
# Bytecode is compiled after the install on every core (pip compiles one file at a time: 45 s
# more on 2 cores). It must be compiled: this environment sets PYTHONDONTWRITEBYTECODE, so a
# module without a .pyc is compiled again by every process that imports it. compileall's exit
# code is ignored: a few wheel files are not Python 3.11 (torch's py312 test helpers), which
# pip skipped the same way.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip==26.3"
	$(BIN)/pip install -q --no-deps --no-compile -r requirements.lock
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	rm -f $$($(BIN)/python -c "import importlib.util,pathlib;print(pathlib.Path(importlib.util.find_spec('torchaudio').origin).parent/'lib')")/*.so
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: venv
	$(BIN)/tts-workbench diagnose --model tiny

# The docs build runs first, its log shown only on failure (not `mkdocs -q`: in mkdocs 1.6 --quiet
# also hides the warnings that --strict counts, so a broken link would pass).
# The tests run in two pytest-xdist workers, one per core, each file (each notebook) whole on one
# worker, and one OpenMP thread each: most tests here are small-model steps bound by Python
# dispatch, so two workers use both cores where one process used about one, and two threads per
# worker would only fight over the cores (docs/measurements.md, "make test").
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile
test: venv lint
	out=$$(NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site 2>&1) || { printf '%s\n' "$$out"; exit 1; }
	$(PYTEST) -q tests notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=300 --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider

# JupyterLab and TensorBoard in headless Chromium (browser_tests/): Debian's chromium and
# chromium-driver are installed when missing (as root, or through sudo).
browser-test: venv
	$(BIN)/pip install -q --no-deps -r requirements-browser.lock
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }
	$(BIN)/ruff check browser_tests && $(BIN)/mypy browser_tests
	SE_OFFLINE=true $(BIN)/python -m pytest -q browser_tests -p no:cacheprovider

lint: venv
	$(BIN)/ruff check tts_workbench tests
	$(BIN)/mypy tts_workbench
	$(BIN)/lint-imports

lab: venv
	$(BIN)/jupyter lab notebooks

# The documentation site (mkdocs.yml, docs/, the notebooks with their stored outputs) into site/.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs
