"""``make browser-test``: the notebooks' widgets and the TensorBoard tab in a real browser.

JupyterLab and TensorBoard run on 127.0.0.1 at free ports; headless Chromium, driven by
Selenium, opens ``05_buffered_vocoder`` and ``06_profiler_traces`` in JupyterLab and runs all
their cells (on copies under ``runs/browser/lab``, so JupyterLab's autosave cannot touch the
committed notebooks), then opens TensorBoard's PyTorch Profiler page for notebook 06's trace.
Screenshots go to ``runs/browser/``. Both servers are stopped by their process ids, also when a
test fails. Not part of ``make test``: it needs Chromium (the Makefile installs Debian's).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tts_workbench.instruments.profiling import Server, free_port, start_server, start_tensorboard

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "browser"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
NOTEBOOK_TIMEOUT_S = 420
SPINNER = "[role=progressbar]"


@dataclass
class Lab(Server):
    token: str
    root: Path


def start_lab(root: Path) -> Lab:
    port, token = free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
        *(["--allow-root"] if os.geteuid() == 0 else []),  # CI runs as root
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = (RUNS / "jupyterlab.log").open("w+b")
    server = start_server(cmd, url, log, ready=f"/api/status?token={token}", timeout=120)
    return Lab(server.process, server.url, token, root)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    RUNS.mkdir(parents=True, exist_ok=True)
    root = RUNS / "lab"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("runs", ".*"))
    shutil.copytree(ROOT / "tests" / "data", root / "tests" / "data")  # notebook 06's example GPU trace
    server = start_lab(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    for flag in [*FLAGS, "--window-size=1400,1000"]:
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "chromium"
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_script_timeout(NOTEBOOK_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


# The notebook in the main area: JupyterLab's app object (exposed by expose_app_in_browser).
PANEL = "const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"


def run_all_cells(driver: WebDriver, lab: Lab, name: str) -> int:
    """Open a notebook in JupyterLab, wait for its kernel, run all cells, check none failed and
    every figure rendered as an image; returns the number of figures."""
    # reset: start from an empty workspace, not the tabs a previous session left open.
    driver.get(f"{lab.url}/lab/tree/notebooks/{name}.ipynb?token={lab.token}&reset")
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script(
            PANEL + "const k = w && w.sessionContext && w.sessionContext.session"
            " && w.sessionContext.session.kernel; return !!(k && k.status === 'idle' && w.context.isReady);"
        )
    )
    # NotebookActions.runAll resolves when the last cell has finished (false if a cell failed).
    ok = driver.execute_async_script(
        PANEL + "const done = arguments[arguments.length - 1];"
        " window.jupyterapp.commands.execute('notebook:run-all-cells').then(done, e => done(String(e)));"
    )
    cells: list[dict[str, Any]] = json.loads(
        driver.execute_script(PANEL + "return JSON.stringify(w.content.model.toJSON().cells);")
    )
    driver.save_screenshot(str(RUNS / f"{name}.png"))
    errors = [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, f"{name}: " + "\n".join(f"{e['ename']}: {e['evalue']}" for e in errors)
    assert ok is True, f"{name}: run-all-cells ended with {ok!r}"
    assert all(c["execution_count"] for c in cells if c["cell_type"] == "code"), f"{name}: cells not run"
    # Every figure shows as a picture: a matplotlib Figure without the inline backend's formatter
    # comes out as the text "<Figure size 900x295 with 1 Axes>" instead.
    shown = ("display_data", "execute_result")
    outputs = [o for c in cells for o in c.get("outputs", []) if o["output_type"] in shown]
    data = [o["data"] for o in outputs]
    as_text = [d for d in data if "image/png" not in d and "<Figure" in str(d.get("text/plain"))]
    assert not as_text, f"{name}: {len(as_text)} figure(s) shown as text: {as_text[0]['text/plain']}"
    pngs = sum("image/png" in d for d in data)
    # JupyterLab 4 keeps only the cells in view in the page: bring each into view and count the
    # images its outputs rendered, waiting (up to 10 s a cell, polled) for as many as its outputs
    # hold, so a slow page is waited for rather than miscounted.
    expected = [sum("image/png" in o.get("data", {}) for o in c.get("outputs", [])) for c in cells]
    images = driver.execute_async_script(
        PANEL + "const done = arguments[arguments.length - 1]; const want = arguments[0];"
        " const shown = i => w.content.widgets[i].node.querySelectorAll('.jp-RenderedImage img').length;"
        " (async () => { let n = 0;"
        " for (let i = 0; i < w.content.widgets.length; i++) { await w.content.scrollToItem(i, 'center');"
        " for (let t = 0; t < 200 && shown(i) < want[i]; t++) await new Promise(r => setTimeout(r, 50));"
        " n += shown(i); }"
        " return n; })().then(done, e => done(String(e)));",
        expected,
    )
    # (widget outputs, such as the A/B seam figure, render images the cells' outputs do not list)
    assert images >= pngs, f"{name}: {pngs} figures in the outputs but {images} rendered images"
    return pngs


def wav_header(driver: WebDriver, element: Any) -> dict[str, Any]:
    """Fetch an <audio> element's source in the page and read its RIFF/WAVE header."""
    return dict(
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0].src).then(r => r.arrayBuffer()).then(b => { const v = new DataView(b);"
            " const tag = i => String.fromCharCode(...new Uint8Array(b, i, 4));"
            " done({riff: tag(0), wave: tag(8), rate: v.getUint32(24, true), bytes: b.byteLength}); },"
            " e => done({error: String(e)}));",
            element,
        )
    )


def test_buffered_vocoder_notebook_plays_in_jupyterlab(lab: Lab, browser: WebDriver) -> None:
    figures = run_all_cells(browser, lab, "05_buffered_vocoder")
    assert figures >= 2, f"expected the timeline and seam figures as images, found {figures}"
    # The StreamPlayer rows: an ipywidgets Audio per chunk plus the whole utterance, per strategy.
    players = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-vbox audio")
    assert len(players) >= 4, f"expected the player widgets' <audio> elements, found {len(players)}"
    browser.execute_script("arguments[0].scrollIntoView();", players[0])
    browser.save_screenshot(str(RUNS / "05_buffered_vocoder_player.png"))
    for audio in (players[0], players[-1]):
        head = wav_header(browser, audio)
        assert head.get("riff") == "RIFF" and head.get("wave") == "WAVE", head
        assert head["rate"] == 24000 and head["bytes"] > 44, head


def test_tensorboard_lists_notebook_06_trace(lab: Lab, browser: WebDriver) -> None:
    run_all_cells(browser, lab, "06_profiler_traces")
    logdir = lab.root / "notebooks" / "runs" / "notebooks" / "profile"
    tb = start_tensorboard(logdir)
    try:
        tb.wait_for_run("generation")
        browser.get(f"{tb.url}/#pytorch_profiler")
        # The plugin's page sits in an iframe; its run selector must list notebook 06's run.
        # (WebDriverWait retries while the element is missing.)
        frame = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "iframe"))
        browser.switch_to.frame(frame)
        WebDriverWait(browser, 60).until(lambda d: "generation" in d.find_element(By.TAG_NAME, "body").text)
        # Give the overview time to render for the screenshot (not checked: a CPU-only trace can
        # keep its GPU panels loading).
        with contextlib.suppress(TimeoutException):
            WebDriverWait(browser, 20).until(lambda d: not d.find_elements(By.CSS_SELECTOR, SPINNER))
        browser.switch_to.default_content()
        browser.save_screenshot(str(RUNS / "tensorboard_pytorch_profiler.png"))
    finally:
        tb.stop()
