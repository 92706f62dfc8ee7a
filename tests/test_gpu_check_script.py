"""The GPU check's scripts (scripts/gpu_check.sh, scripts/prepare_gpu_wheels.sh) and their page:
what a call carries and returns, what each step needs, what is documented. The GPU script's
full dry run is in test_profiling."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
WHEELS = ROOT / "scripts" / "prepare_gpu_wheels.sh"
PAGE = ROOT / "docs" / "gpu-check.md"
MIB = 1 << 20


def run_gpu_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/gpu_check.sh ARGS`` with its results file and step folder under tmp_path."""
    env = {
        **os.environ,
        "GPU_CHECK_OUT": str(tmp_path / "gpu.json"),
        "GPU_CHECK_DIR": str(tmp_path / "steps"),
        "PYTHON": sys.executable,
        "GPU_CHECK_DEADLINE_S": "540",  # its steps stop in time: none is left behind by a timeout here
        **env,
    }
    return subprocess.run(["bash", str(GPU_CHECK), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=580)  # fmt: skip


def gpu_check(
    tmp_path: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``scripts/gpu_check.sh ARGS`` with results under tmp_path; (process, results file)."""
    p = run_gpu_check(tmp_path, *args, **env)
    return p, json.loads((tmp_path / "gpu.json").read_text())


# The PYTHON of a dry run whose steps are stubs: each step's command is logged to SHIM_LOG (with
# SHIM_COPY set, the results file as it is then is copied there) and prints the report `{}`, then
# sleeps SHIM_SLEEP s; the script's own Python (its module look-up, the watchdog, the combine) runs.
STEP_STUB = """#!/bin/bash
case " $* " in
  *" -m tts_workbench.interface.cli "*|*" scripts/"*|*"environment(sys.argv"*)
    echo "${*//$'\\n'/ }" >> "$SHIM_LOG"  # one line a step (the environment step's code has several)
    [[ -z ${SHIM_COPY:-} ]] || cp "$GPU_CHECK_OUT" "$SHIM_COPY"
    echo '{}'
    exec sleep "${SHIM_SLEEP:-0}";;
esac
exec "$SHIM_PYTHON" "$@"
"""


def stubbed_gpu_check(
    tmp_path: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], list[str]]:
    """A dry run of the script's own logic in seconds: its steps stubbed (STEP_STUB), by default the
    environment and sampling steps alone; (process, results file, each step's command line)."""
    stub = tmp_path / "python"
    stub.write_text(STEP_STUB)
    stub.chmod(0o755)
    log = tmp_path / "steps.log"
    stubbed = {"PYTHON": str(stub), "SHIM_PYTHON": sys.executable, "SHIM_LOG": str(log)}
    # no bench or trace; a reference that is never read (the dry run makes one otherwise)
    settings = {
        "GPU_CHECK_POLICIES": "",
        "GPU_CHECK_TRACE": "0",
        "GPU_CHECK_REFERENCE": str(tmp_path / "no.wav"),
    }
    p, result = gpu_check(tmp_path, "--dry-run", **stubbed | settings | env)
    return p, result, log.read_text().splitlines() if log.exists() else []


def fake_python3(tmp_path: Path, pip: str) -> str:
    """A PATH whose python3 runs the bash lines PIP for ``python3 -m pip ...`` and this Python for
    anything else (the GPU run's steps and combine, the wheels script's download)."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(
        f'#!/bin/bash\nif [[ "$1 $2" == "-m pip" ]]; then\n{pip}\nfi\nexec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    return f"{fake.parent}:{os.environ['PATH']}"


def wheels_checkout(checkout: Path) -> Path:
    """A scratch git checkout holding a copy of the wheels script and requirements.lock (the script
    downloads into the checkout it is in); the copy's path."""
    (checkout / "scripts").mkdir(parents=True)
    script = checkout / "scripts" / WHEELS.name
    script.write_text(WHEELS.read_text())
    (checkout / "scripts" / "slim_wheel.py").write_text((ROOT / "scripts" / "slim_wheel.py").read_text())
    (checkout / "requirements.lock").write_text((ROOT / "requirements.lock").read_text())
    subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)
    return script


def carried_bytes() -> int:
    """What a device call carries of the checkout besides the wheels: tracked and untracked-not-ignored
    files (the oracle the script's own sum is checked against)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
    return sum(
        p.stat().st_size for n in names if n and (p := ROOT / n.decode()).is_file() and not p.is_symlink()
    )


@pytest.mark.parametrize("over", [True, False])
def test_wheel_size_check_counts_the_checkout(tmp_path: Path, over: bool) -> None:
    # A call carries 64 MiB in all, the checkout's ~8 MB of files included: wheels 1 MiB short of
    # 64 MiB on their own (under the 60 MiB the check warned at before) leave no room for them.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    size = 64 * MIB - carried_bytes() + (MIB if over else -MIB)
    subprocess.run(["truncate", "-s", str(size), str(wheels / "big-1.0-py3-none-any.whl")], check=True)
    p = subprocess.run(["bash", str(WHEELS), "--check-size", str(wheels)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert ("warning" in p.stderr) == over, p.stdout + p.stderr
    assert p.returncode == (1 if over else 0), p.stdout + p.stderr
    assert "64 MiB" in p.stdout


def test_wheel_size_check_names_a_folder_without_wheels(tmp_path: Path) -> None:
    # du on a glob that matched nothing failed with "cannot access" alone: say what to run instead
    p = subprocess.run(["bash", str(WHEELS), "--check-size", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"no wheels in {tmp_path}: run scripts/prepare_gpu_wheels.sh first" in p.stderr
    assert "cannot access" not in p.stderr


def test_a_failed_wheel_download_keeps_the_wheels_there_were(tmp_path: Path) -> None:
    # the script emptied gpu-wheels/ before downloading: an index it cannot reach left no wheels.
    # A copy of it in a scratch checkout, its index a closed port on this machine (no network).
    script = wheels_checkout(tmp_path)
    kept = tmp_path / "gpu-wheels" / "kept-1.0-py3-none-any.whl"
    kept.parent.mkdir()
    kept.write_bytes(b"wheel")
    # none of this machine's pip settings (its extra indexes and find-links hold wheels): only the port
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0"}
    p = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    said = p.stdout + p.stderr
    assert p.returncode != 0, said
    assert [w.name for w in kept.parent.iterdir()] == [kept.name], said
    left = {f.name for f in tmp_path.iterdir()}
    assert left == {".git", "gpu-wheels", "requirements.lock", "scripts"}  # not the folder it downloaded into


def test_the_wheels_are_for_the_images_python(tmp_path: Path) -> None:
    # The GPU image's Python is 3.12: wheels downloaded for another (cp311 builds) do not install
    # there. A python3 whose pip records what it was asked for and fails (no download).
    script = wheels_checkout(tmp_path / "checkout")
    asked = tmp_path / "pip.args"
    env = {k: v for k, v in os.environ.items() if k != "GPU_PYTHON_VERSION"}
    env["PATH"] = fake_python3(tmp_path, f'echo "$*" > {asked}; exit 1')
    subprocess.run(["bash", str(script)], cwd=script.parents[1], env=env, capture_output=True, timeout=60)
    assert "--python-version 3.12 " in asked.read_text()


def test_the_checkout_size_quoted_beside_the_wheels_holds() -> None:
    # the wheels' room under 64 MiB is quoted with the checkout's size (once "~6 MB", at 8.3 MB)
    for text in (WHEELS.read_text(), PAGE.read_text()):
        said = re.findall(r"the checkout's under (\d+) MB", text)
        assert said and all(carried_bytes() < int(mb) * 1_000_000 for mb in said), said


def test_wheel_pins_name_only_packages_in_the_lock() -> None:
    # a name that matches nothing in requirements.lock downloads nothing: a stale entry
    lists = dict(re.findall(r"^\s*download (gpu-[a-z]+) '([^']*)'", WHEELS.read_text(), re.M))
    assert set(lists) == {"gpu-wheels", "gpu-serve"}
    locked = {line.split("==")[0].lower() for line in (ROOT / "requirements.lock").read_text().splitlines()}
    assert [name for names in lists.values() for name in names.split("|") if name.lower() not in locked] == []


def fake_wheel(
    folder: Path, name: str = "demo", version: str = "1.0", files: dict[str, bytes] | None = None
) -> Path:
    """A wheel pip installs (``name``-``version``, py3-none-any), each file listed in RECORD with its
    hash. By default a package with an executable, a folder to drop and a file whose name starts
    as that folder's does."""
    files = files or {
        "demo/__init__.py": b"",
        "demo/bin/server": b"#!/bin/sh\necho serving\n",
        "demo/jars/big.jar": b"x" * 4096,
        "demo/jarsfile.py": b"KEPT = True\n",
    }
    info_dir = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{info_dir}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info_dir}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{n},sha256={digest(d)},{len(d)}\n" for n, d in files.items())
    record += f"{info_dir}/RECORD,,\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for member, data in [*files.items(), (f"{info_dir}/RECORD", record.encode())]:
            info = zipfile.ZipInfo(member)
            info.external_attr = (stat.S_IFREG | (0o755 if member.endswith("server") else 0o644)) << 16
            z.writestr(info, data)
    return wheel


def test_a_slimmed_wheel_installs_without_its_dropped_folder(tmp_path: Path) -> None:
    # Ray's wheel (79.3 MB) travels without its jar and more: what is left must still install as
    # a wheel (RECORD without the dropped lines) and keep its executables (Ray's raylet)
    wheel = fake_wheel(tmp_path)
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "slim_wheel.py"), str(wheel), "demo/jars"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(r"demo-1\.0-py3-none-any\.whl: [\d.]+ MB -> [\d.]+ MB\n", p.stderr)
    with zipfile.ZipFile(wheel) as z:
        assert not [n for n in z.namelist() if n.startswith("demo/jars/")]
        assert "demo/jars/" not in z.read("demo-1.0.dist-info/RECORD").decode()
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=120)  # fmt: skip
    assert not (site / "demo" / "jars").exists() and (site / "demo" / "jarsfile.py").is_file()
    server = subprocess.run([site / "demo" / "bin" / "server"], capture_output=True, text=True, timeout=60)
    assert server.stdout == "serving\n"


def test_the_serving_wheels_go_slimmed_into_a_folder_of_their_own(tmp_path: Path) -> None:
    # --serve: the lock's serving pins downloaded for the image's Python into gpu-serve/ (not
    # gpu-wheels/, which must travel in another call), Ray's wheel without what serving never
    # imports, then the size check. A python3 whose pip "downloads" a stand-in Ray wheel.
    script = wheels_checkout(tmp_path / "checkout")
    dropped = [
        "ray/jars/ray_dist.jar",
        "ray/dashboard/client/build/index.html",
        "ray/rllib/__init__.py",
        "ray/data/__init__.py",
        "ray/tune/__init__.py",
        "ray/train/__init__.py",
        "ray/llm/__init__.py",
    ]
    kept = ["ray/__init__.py", "ray/serve/__init__.py", "ray/dashboard/__init__.py"]
    (tmp_path / "index").mkdir()
    ray = fake_wheel(tmp_path / "index", "ray", "2.60.0", dict.fromkeys(dropped + kept, b"x"))
    asked = tmp_path / "pip.args"
    pip = f'echo "$*" > {asked}; while (($#)); do [[ $1 == -d ]] && cp {ray} "$2"/; shift; done; exit 0'
    env = {k: v for k, v in os.environ.items() if k != "GPU_PYTHON_VERSION"}
    env["PATH"] = fake_python3(tmp_path, pip)
    p = subprocess.run(["bash", str(script), "--serve"], cwd=script.parents[1], env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    checkout = script.parents[1]
    assert sorted(f.name for f in checkout.iterdir()) == [".git", "gpu-serve", "requirements.lock", "scripts"]
    with zipfile.ZipFile(checkout / "gpu-serve" / ray.name) as z:
        assert sorted(n for n in z.namelist() if not n.startswith("ray-2.60.0.dist-info/")) == sorted(kept)
    assert "gpu-serve: 0 MB of wheels" in p.stdout and "ray-2.60.0-py3-none-any.whl: " in p.stderr
    args = asked.read_text()
    assert "--python-version 3.12 " in args
    assert all(f" {pin}==" in args for pin in ("ray", "fastapi", "uvicorn"))
    assert " torch==" not in args and " chatterbox-tts==" not in args


def test_slimming_refuses_a_folder_the_wheel_does_not_hold(tmp_path: Path) -> None:
    # a misspelt folder would drop nothing and leave the wheel over the carry limit, unsaid
    wheel = fake_wheel(tmp_path)
    before = wheel.read_bytes()
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "slim_wheel.py"), str(wheel), "demo/jars",
                        "demo/jar"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 2
    assert "error: demo-1.0-py3-none-any.whl has no file under demo/jar/: nothing to drop there" in p.stderr
    assert wheel.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == [wheel.name]


@pytest.mark.parametrize(
    ("script", "some"),
    [(GPU_CHECK, {"GPU_CHECK_TOKENS", "GPU_CHECK_PORT", "GPU_CHECK_SERVE_CACHE", "PYTHON"}),
     (WHEELS, {"GPU_PYTHON_VERSION"})],
)  # fmt: skip
def test_every_variable_the_gpu_check_reads_is_documented(script: Path, some: set[str]) -> None:
    text = script.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    # under `set -u` a setting read from the environment is read with its default: ${NAME:-…} or ${NAME-…}
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):?-", body))
    assert some <= read
    page = PAGE.read_text()
    assert sorted(v for v in read if not re.search(rf"\b{v}\b", header)) == []
    assert sorted(v for v in read if not re.search(rf"`{v}\b", page)) == []


def test_the_plan_covers_the_default_load_levels() -> None:
    # issue 19 asks for 1, 8, 32 and 64 streams: the plan's calls together run every default level
    script = GPU_CHECK.read_text()
    default = re.search(r"LEVELS=\$\{GPU_CHECK_LOAD_LEVELS:-([\d,]+)\}\n", script)
    assert default and default.group(1) == "1,8,32,64"
    page = PAGE.read_text()
    plan = page.split("## Plan for the next session")[1]
    planned = {n for levels in re.findall(r"GPU_CHECK_LOAD_LEVELS=([\d,]+)", plan) for n in levels.split(",")}
    assert planned == set(default.group(1).split(","))
    assert "levels 1, 8, 32, 64" in (ROOT / "docs" / "index.md").read_text()
    # Each level's engine builds the step buckets up to it, by default the levels themselves (not
    # 1, 2, 4, ... as the page once said: "1, 4, 6 and 7 compiles for 1, 8, 32 and 64 streams").
    assert '--step-buckets "${GPU_CHECK_STEP_BUCKETS:-$LEVELS}"' in script
    levels = [int(n) for n in default.group(1).split(",")]
    builds = ", ".join(str(sum(b <= n for b in levels)) for n in levels)
    claims = re.findall(
        r"(\d[\d, ]* and \d+) (?:builds|compiles) for (\d[\d, ]* and \d+) streams", " ".join(page.split())
    )
    assert claims and all(c.replace(" and", ",") == builds for c, _ in claims), claims


def test_a_step_run_alone_runs_without_the_trace() -> None:
    # GPU_CHECK_TRACE defaults to 1: a command that turns the bench off (GPU_CHECK_POLICIES="") to run
    # another step on its own must turn the trace off too, or the trace runs before sampling anyway
    settings = r'(?:GPU_CHECK_\w+=(?:"[^"]*"|[^\s`"]+)\s+)+'
    commands = [
        c for text in (GPU_CHECK.read_text(), PAGE.read_text()) for c in re.findall(settings, text)
        if 'GPU_CHECK_POLICIES=""' in c and re.search(r"GPU_CHECK_(LOAD|SERVE|DIAGNOSE|MULTILINGUAL)=1", c)
    ]  # fmt: skip
    assert len(commands) >= 3  # the load study alone (page and header), and with serving
    assert [c for c in commands if "GPU_CHECK_TRACE=0" not in c] == []


def test_the_sampling_step_needs_what_the_model_steps_need(tmp_path: Path) -> None:
    # scripts/sampling_study.py imports studies.bench, which imports chatterbox: where chatterbox is
    # missing the step is not started (no model is built, so this takes seconds), the module named
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nsys.modules['chatterbox'] = None  # find_spec: None\n"
    )
    p, result = gpu_check(
        tmp_path, "--dry-run", PYTHONPATH=str(hide), GPU_CHECK_POLICIES="", GPU_CHECK_TRACE="0",
        GPU_CHECK_REFERENCE=str(tmp_path / "unused.wav"),
    )  # fmt: skip
    assert p.returncode == 1, p.stderr[-2000:] + p.stdout[-2000:]
    assert set(result["skipped"]) == {"environment", "sampling"}, result["errors"]
    assert "chatterbox" in result["skipped"]["sampling"]


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_combine_refuses_a_folder_without_steps(tmp_path: Path, folder: str) -> None:
    # --combine made a missing folder and wrote an empty "complete" results file over the one named:
    # by default results/gpu_check.json, the 2026-11-28 GPU result the docs cite
    steps = tmp_path / folder
    if folder == "empty":
        steps.mkdir()
    p = run_gpu_check(tmp_path, "--combine", GPU_CHECK_DIR=str(steps))
    assert p.returncode == 2, p.stderr[-2000:] + p.stdout[-2000:]
    assert str(steps) in p.stderr and "_steps.tar.gz" in p.stderr
    assert not (tmp_path / "gpu.json").exists()
    assert steps.exists() == (folder == "empty")  # not created


@pytest.mark.integration  # a pipeline of processes: two combines, each importing torch and chatterbox
def test_combine_names_the_kept_traces_relative_to_the_results_file(tmp_path: Path) -> None:
    # a GPU run's cut traces are copied to traces/ beside the results file; the file named them by
    # the device machine's absolute path, gone once the files come back (figures were relative).
    # The step runs `trace --cut-only`: its heading says the traces were cut, not read (no HTA there).
    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "mode").write_text("gpu\n")
    cut = tmp_path / "device" / "t3.decode.json.gz"
    cut.parent.mkdir()
    cut.write_bytes(b"the cut trace")
    report = {"note": "cut only", "table": [], "traces": {"eager": str(cut)}, "device_events": {"eager": 0}}
    (steps / "trace.json").write_text(json.dumps(report))
    p, result = gpu_check(tmp_path, "--combine")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-2000:]
    kept = result["trace"]["traces"]["eager"]
    assert kept == "traces/decode_eager.json.gz"
    assert (tmp_path / kept).read_bytes() == b"the cut trace"
    assert f"eager: {tmp_path / kept}" in p.stdout  # shown where it is here
    heading = next(line for line in p.stdout.splitlines() if line.startswith("## T3 decode"))
    assert "HolisticTraceAnalysis" not in heading and "not read" in heading
    # combined here from another machine's steps: its path is gone, the copy that came back is kept
    cut.unlink()
    p, result = gpu_check(tmp_path, "--combine")
    assert p.returncode == 0 and result["trace"]["traces"]["eager"] == "traces/decode_eager.json.gz"


@pytest.mark.integration  # a pipeline of processes, waiting for the deadline (~6 s)
def test_the_wheel_install_keeps_to_the_deadline(tmp_path: Path) -> None:
    # The install ran under its own `timeout 300`, which the deadline never cut, and a call killed
    # during it returned no results file. A python3 whose pip outlasts the deadline: the install is
    # stopped at the deadline's limit, a results file already there while it ran.
    path = fake_python3(
        tmp_path,
        '[[ -f $GPU_CHECK_OUT ]] && echo "a results file was there during the install"; sleep 30; exit 1',
    )
    p, result = gpu_check(tmp_path, PATH=path, GPU_CHECK_DEADLINE_S="8", GPU_CHECK_RESERVE_S="2")
    assert p.returncode == 1, p.stderr[-2000:] + p.stdout[-2000:]
    error = result["errors"]["install"]
    stopped = re.search(r"stopped at its time limit \((\d+) s\)", error)
    assert stopped and int(stopped.group(1)) <= 6, error  # the deadline's 8 s less the 2 s reserve
    assert "a results file was there during the install" in error


def test_the_gpu_run_keeps_to_its_default_deadline(tmp_path: Path) -> None:
    # On the GPU the deadline is on unless set (570 s, under the call's 600 s): without one the
    # install and each step get the whole 540 s step limit and a call can end before its results
    # file is written. "" reads as unset (${GPU_CHECK_DEADLINE_S:-570}); the install fails at once.
    p, result = gpu_check(tmp_path, PATH=fake_python3(tmp_path, "exit 1"), GPU_CHECK_DEADLINE_S="",
                          GPU_CHECK_RESERVE_S="100")  # fmt: skip
    assert p.returncode == 1, p.stderr[-2000:] + p.stdout[-2000:]
    assert result["steps"]["install"]["limit_s"] <= 570 - 100, result["steps"]


def test_a_steps_limit_is_cut_to_the_deadline(tmp_path: Path) -> None:
    # a step given the whole step limit (300 s in the dry run) runs past a 60 s deadline: each one
    # gets what is left of it less the reserve
    p, result, _ = stubbed_gpu_check(
        tmp_path, GPU_CHECK_DEADLINE_S="60", GPU_CHECK_RESERVE_S="10", GPU_CHECK_MIN_STEP_S="5"
    )
    limits = {name: step["limit_s"] for name, step in result["steps"].items()}
    assert set(limits) == {"environment", "sampling"} and all(0 < s <= 50 for s in limits.values()), limits


def test_a_step_the_deadline_leaves_too_little_is_not_started(tmp_path: Path) -> None:
    # 40 s less the 10 s reserve is under the 35 s a step gets at least: one started anyway would be
    # stopped midway with nothing to show; it is recorded as skipped, with why
    p, result, calls = stubbed_gpu_check(
        tmp_path, GPU_CHECK_DEADLINE_S="40", GPU_CHECK_RESERVE_S="10", GPU_CHECK_MIN_STEP_S="35"
    )
    assert calls == []
    assert set(result["skipped"]) == {"environment", "sampling"}, result["skipped"]
    assert all("deadline" in why for why in result["skipped"].values()), result["skipped"]


@pytest.mark.integration  # a pipeline of processes (the check and its stub steps, ~9 s)
def test_a_step_that_does_not_exit_after_its_report_is_stopped(tmp_path: Path) -> None:
    # Inductor's exit can wait 300 s for its compile workers after the report is out: the watchdog
    # stops such a step EXIT_GRACE s after its report is complete, long before its 40 s were up
    p, result, _ = stubbed_gpu_check(tmp_path, SHIM_SLEEP="40", GPU_CHECK_EXIT_GRACE="2")
    for step in result["steps"].values():
        assert step["stopped_after_report"] is True and step["seconds"] < 40, result["steps"]


@pytest.mark.integration  # a pipeline of processes (the check and its stub steps, ~10 s)
def test_a_step_its_limit_stops_after_its_report_says_so(tmp_path: Path) -> None:
    # the step's own time limit came before the watchdog's grace was up: stopped after its
    # report all the same (before: "stopped_after_report": false beside rc 124)
    # 5 s: the stub's report is out at once and the watchdog looks every second
    limits = {"GPU_CHECK_STEP_LIMIT": "5", "GPU_CHECK_MIN_STEP_S": "1", "GPU_CHECK_EXIT_GRACE": "30"}
    _, result, _ = stubbed_gpu_check(tmp_path, SHIM_SLEEP="40", **limits)
    for step in result["steps"].values():
        assert step["rc"] == 124 and step["stopped_after_report"] is True, result["steps"]


def test_a_results_file_written_during_a_step_is_not_complete(tmp_path: Path) -> None:
    # a call killed midway returns the file written as its last step started: it must not read as
    # a finished run
    during = tmp_path / "during.json"
    p, result, _ = stubbed_gpu_check(tmp_path, SHIM_COPY=str(during))
    assert json.loads(during.read_text())["complete"] is False and result["complete"] is True


def test_a_run_takes_no_step_an_earlier_call_left(tmp_path: Path) -> None:
    # the step folder is reused from call to call: an earlier call's load study is not this run's
    # (which ran none), though --combine takes every step there is
    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "load.json").write_text(json.dumps({"levels": []}))
    os.utime(steps / "load.json", (1000, 1000))
    p, result, _ = stubbed_gpu_check(tmp_path)
    assert result["load"] is None, result["load"]


def test_the_trace_runs_before_sampling(tmp_path: Path) -> None:
    # sampling is the step least needed, last of the default ones: a short deadline skips it, not the trace
    p, result, calls = stubbed_gpu_check(tmp_path, GPU_CHECK_TRACE="1")
    order = [
        "trace" if " trace " in c else "sampling" for c in calls if " trace " in c or "sampling_study" in c
    ]
    assert order == ["trace", "sampling"], calls


def test_the_load_step_gets_its_flow_settings(tmp_path: Path) -> None:
    # the compiled estimator is asked for with its windows per call capped at the largest level
    # (load refuses a larger size; each size is a compile)
    p, result, calls = stubbed_gpu_check(
        tmp_path, GPU_CHECK_LOAD="1", GPU_CHECK_LOAD_FLOW="compiled", GPU_CHECK_LOAD_LEVELS="1,2"
    )
    load = [c for c in calls if " load " in c]
    assert len(load) == 1 and "--streams 1,2 " in load[0], calls
    assert "--flow compiled --flow-batches 2 " in load[0], load


def test_the_served_engine_is_the_load_steps(tmp_path: Path) -> None:
    # the served figures are compared with the in-process ones: the server ran 64 streams over
    # the default buckets with the estimator eager, whatever the load step ran
    p, result, calls = stubbed_gpu_check(
        tmp_path,
        GPU_CHECK_LOAD="1",
        GPU_CHECK_SERVE="1",
        GPU_CHECK_LOAD_FLOW="compiled",
        GPU_CHECK_LOAD_LEVELS="1,2",
    )
    load = [c for c in calls if " load --model " in c]
    serve = [c for c in calls if " serve " in c]
    assert len(load) == 1 and len(serve) == 1, calls
    engine = "--decode compiled --dtype bfloat16 --step-buckets 1,2 --flow compiled --flow-batches 2 "
    assert engine in load[0] and engine in serve[0], calls
    assert "--max-streams 2 " in serve[0]
    # the stub exits at once: no load is sent to a server that is not there
    assert "the server exited" in result["errors"]["serve-load"], result["errors"]


def test_the_multilingual_bench_runs_the_wrapper_in_bfloat16(tmp_path: Path) -> None:
    # its default configs run the optimized wrapper, which the step runs in bfloat16 (the page says
    # so): bench is given the policy, or the wrapper runs in its own default
    p, result, calls = stubbed_gpu_check(tmp_path, GPU_CHECK_MULTILINGUAL="1")
    bench = [c for c in calls if "--model multilingual-tiny " in c]
    assert len(bench) == 1 and "--dtype bfloat16 " in bench[0], calls


def unpacked_steps(tmp_path: Path, name: str, files: dict[str, str], later: set[str]) -> Path:
    """A step folder as two calls' bundles unpacked into one leave it (tar keeps each file's time):
    the files of NAME, those in ``later`` a minute newer than the rest."""
    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "mode").write_text("gpu\n")
    for suffix, text in files.items():
        (steps / f"{name}.{suffix}").write_text(text)
        os.utime(steps / f"{name}.{suffix}", (1000 + 60 * (suffix in later),) * 2)
    return steps


SKIP = "not started: 28 s were left of the 570 s deadline\n"
STATUS = '{"rc": 0, "seconds": 40, "limit_s": 100, "stopped_after_report": false}\n'


@pytest.mark.parametrize("newer", ["report", "skip"])
def test_combine_keeps_a_report_over_either_calls_skip(tmp_path: Path, newer: str) -> None:
    # call 1 skipped sampling for time and call 2 ran it, or the other way round: the finished
    # report is kept either way (a later skip once dropped it), the later skip noted in `steps`
    report = {"rows": [], "batched_over_one_by_one": {"8": 0.5}}
    files = {"skipped": SKIP, "json": json.dumps(report), "err": "", "status": STATUS}
    unpacked_steps(
        tmp_path, "sampling", files, later={"skipped"} if newer == "skip" else set(files) - {"skipped"}
    )
    p, result = gpu_check(tmp_path, "--combine")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-2000:]  # every step there passed
    assert result["sampling"] == report and result["skipped"] == {} and result["errors"] == {}
    assert set(result["steps"]) == {"sampling"}  # no step that never ran, listed as null
    status = result["steps"]["sampling"]
    assert status["rc"] == 0
    assert status.get("skipped_by_a_later_call") == (SKIP.strip() if newer == "skip" else None)


@pytest.mark.parametrize("newer", ["error", "skip"])
def test_combine_keeps_a_skip_over_either_calls_error(tmp_path: Path, newer: str) -> None:
    # a report that does not parse is no result: another call's skip of the step is kept over it,
    # and its error kept as a note (the review of the rule: a failure's only record was dropped)
    failed = '{"rc": 1, "seconds": 3, "limit_s": 100, "stopped_after_report": false}\n'
    files = {"skipped": SKIP, "json": "", "err": "Traceback: boom\n", "status": failed}
    unpacked_steps(
        tmp_path, "sampling", files, later={"skipped"} if newer == "skip" else set(files) - {"skipped"}
    )
    p, result = gpu_check(tmp_path, "--combine")
    assert p.returncode == 1, p.stderr[-2000:] + p.stdout[-2000:]
    assert result["sampling"] is None and "deadline" in result["skipped"]["sampling"]
    assert result["errors"] == {} and "boom" in result["steps"]["sampling"]["error_of_another_call"]


def paths_in(value: Any) -> list[str]:
    """Every string in a JSON value that names a file (absolute, or with a file suffix)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in paths_in(v)]
    if isinstance(value, list):
        return [p for v in value for p in paths_in(v)]
    return [value] if isinstance(value, str) and re.search(r"^/|\.(png|json)$", value) else []


@pytest.mark.integration  # four processes, each importing torch; one builds the engine (~60 s)
def test_the_bench_and_load_steps_name_no_file_that_is_gone(tmp_path: Path, reference_wav: Path) -> None:
    # The bench and load steps wrote their JSON and figures to the run's temp folder, deleted at
    # exit, and the results file kept their paths (the bench's in its table's "wrote" line). Now
    # each figure is copied beside the results file (it comes back from a device call) and named
    # relative to it; the step's own JSON is in the step folder.
    p, result = gpu_check(
        tmp_path, "--dry-run", GPU_CHECK_LOAD="1", GPU_CHECK_LOAD_LEVELS="1", GPU_CHECK_CONFIGS="optimized",
        GPU_CHECK_TRACE="0", GPU_CHECK_REFERENCE=str(reference_wav),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-2000:]
    named = paths_in(result)
    assert named and all((tmp_path / path).is_file() for path in named), named
    run = result["runs"]["bfloat16"]
    assert run["figure"] == "gpu_bench-bfloat16_memory.png"
    assert f"figure: {tmp_path / run['figure']}" in p.stdout
    assert "flow_compile_fallback" in run and run["flow_compile_fallback"] is None  # nothing compiled
    load = result["load"]
    assert [s["streams"] for s in (level["summary"] for level in load["levels"])] == [1]
    # the estimator as asked (eager: no cap on windows per call but the engine's own)
    assert (load["flow"], load["flow_batches"]) == ("eager", None)
    assert load["step_buckets"] == [1]  # the levels' own sizes: one compile each on the GPU
    assert "files" not in load and load["figure"] == "gpu_load.png"
    assert f"figure: {tmp_path / 'gpu_load.png'}" in p.stdout
    # each finished level's summary in the log (the script's stderr), not only in the step folder
    assert re.search(r"^level 1: \{", p.stderr, re.M), p.stderr[-2000:]


@pytest.mark.integration  # the tiny model's step compiled four times (~1 min)
def test_the_fusion_step_compares_the_fused_step_with_the_unfused(
    tmp_path: Path, reference_wav: Path
) -> None:
    p, result = gpu_check(
        tmp_path, "--dry-run", GPU_CHECK_FUSION="1", GPU_CHECK_POLICIES="", GPU_CHECK_TRACE="0",
        GPU_CHECK_REFERENCE=str(reference_wav),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-2000:]
    fusion = result["fusion"]
    assert fusion["plan"].endswith("compiled step, fused")
    assert fusion["one_stream_compiled"]["same_tokens"] is True
    engine = fusion["engine_2_streams_compiled"]
    assert set(engine["median_ms"]) == {"unfused", "fused"} and engine["fused_over_unfused"] > 0


@pytest.mark.integration  # a process importing every module (~13 s)
def test_the_gpu_steps_import_without_the_notebook_packages() -> None:
    # The GPU image has no IPython, ipywidgets or Ray Serve: on 2026-12-04 a top-level IPython
    # import (core.progress) failed every step of a GPU call. Every module but the notebook
    # widgets (interface.playback) and serving must import without them, and the CLI must run.
    blocked = ("IPython", "ipywidgets", "ipykernel", "ray", "fastapi", "starlette", "uvicorn", "pydantic")
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "tts_workbench").rglob("*.py")
        if p.parent.name != "serving" and p.stem != "playback"
    )
    code = f"""
import importlib, importlib.util, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
for name in {modules!r}:
    importlib.import_module(name)
spec = importlib.util.spec_from_file_location("sampling_study", "scripts/sampling_study.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from tts_workbench.interface.cli import main
sys.exit(main(["load", "--help"]))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--streams" in p.stdout
    assert len(modules) > 40  # every module found (a path mistake would import none)
