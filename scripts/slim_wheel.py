"""Rewrite a wheel without some of its folders, so that it fits what a device call carries.

`scripts/prepare_gpu_wheels.sh --serve` slims Ray's wheel with it: 79.3 MB, over the 64 MiB a
call carries on its own, of which serving one deployment on a local Ray never uses the Java jar
(32 MB), the dashboard's web client (the serve step starts no dashboard) or the RLlib, Data, Tune,
Train and LLM libraries. The wheel's RECORD loses the dropped files' lines, so pip installs the
rest as a whole wheel; every kept entry keeps its bytes and mode (Ray's raylet and GCS server are
executables).

    python scripts/slim_wheel.py WHEEL FOLDER...   # e.g. gpu-serve/ray-*.whl ray/jars ray/rllib
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path


def slim(wheel: Path, drop: list[str]) -> tuple[int, int]:
    """Rewrite ``wheel`` in place without the files under the folders ``drop`` (paths inside the
    wheel); its bytes before and after. A folder that holds no file is refused (a misspelt name
    would drop nothing), and the wheel is left as it was."""
    prefixes = tuple(d.strip("/") + "/" for d in drop)
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        empty = [p for p in prefixes if not any(n.startswith(p) for n in names)]
        if empty:
            raise ValueError(f"{wheel.name} has no file under {', '.join(empty)}: nothing to drop there")
        slimmed = wheel.with_name(wheel.name + ".slim")
        with zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename.startswith(prefixes):
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if not line.startswith(prefixes)).encode()
                out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    before = wheel.stat().st_size
    slimmed.replace(wheel)
    return before, wheel.stat().st_size


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("drop", nargs="+", help="folders inside the wheel to leave out, e.g. ray/jars")
    args = ap.parse_args(argv)
    try:
        before, after = slim(args.wheel, args.drop)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        ap.error(str(e))
    print(f"{args.wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
