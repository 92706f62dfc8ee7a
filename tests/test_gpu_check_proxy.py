"""Requests to a server on this machine's loopback go straight to it, whatever http_proxy says: the
GPU check's serve step (scripts/gpu_check.sh) and the Ray server tests (test_serve_ray) wait for
/health on 127.0.0.1, and a proxy, which cannot reach this machine's loopback, never answered."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_serve_ray import _health

GPU_CHECK = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


@pytest.fixture
def local_server(tmp_path: Path, serve_folder: Callable[[Path], Any]) -> Iterator[tuple[str, int]]:
    """(URL, pid) of a python http.server on 127.0.0.1 whose /health answers 200 with a JSON object."""
    (tmp_path / "health").write_text('{"status": "ok"}')
    with serve_folder(tmp_path) as server:
        yield server.url, server.process.pid


def test_the_serve_steps_probe_and_load_reach_the_local_server(
    behind_a_proxy: None, local_server: tuple[str, int]
) -> None:
    # The probe is an inline `$PY -c '…'` in the script: it is run here as the script runs it, after
    # the script's settings (everything before its `cd`, which has no side effects), so what they
    # export is what the probe and `load --url`'s httpx client (built from the environment) see.
    script = GPU_CHECK.read_text()
    settings, found = script.partition('\ncd "$(dirname "$0")/.."\n')[:2]
    probe = re.search(
        r"""\$PY -c '(\nimport [^']*urllib\.request[^']*)' "\$PORT" "\$WAIT_S" "\$SERVER\"""", script
    )
    assert found and probe
    url, pid = local_server
    run = f"""{settings}
"$PY" -c "$PROBE" "$PORT" 5 "$SERVER" &&
    "$PY" -c 'import httpx, sys; sys.exit(httpx.get(sys.argv[1] + "/health").status_code != 200)' "$URL"
"""
    port = url.rsplit(":", 1)[1]
    env = {
        **os.environ,
        "PY": sys.executable,
        "PROBE": probe.group(1),
        "PORT": port,
        "SERVER": str(pid),
        "URL": url,
    }
    p = subprocess.run(["bash", "-c", run], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "the server answered after" in p.stdout, p.stdout + p.stderr


def test_the_server_tests_health_check_reaches_the_local_server(
    behind_a_proxy: None, local_server: tuple[str, int]
) -> None:
    assert _health(local_server[0]) == {"status": "ok"}
