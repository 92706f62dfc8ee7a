"""``tts-workbench`` command line. Bad input ends with one ``error:`` line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .generation import UPSTREAM_SENTENCE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="tiny | random | pretrained | PATH to a checkpoint folder")
    p.add_argument("--tokens", type=_positive, default=150, help="cap on generated speech tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _diagnose(args: argparse.Namespace) -> tuple[dict[str, Any], Callable[[dict[str, Any]], str]]:
    from .diagnose import format_report, run_diagnosis
    from .dtypes import parse_dtype

    report = run_diagnosis(
        model=args.model,
        text=args.text,
        reference=args.reference,
        tokens=args.tokens,
        seed=args.seed,
        device=args.device,
        outdir=args.out,
        dtype=parse_dtype(args.dtype),
        autocast=parse_dtype(args.autocast) if args.autocast else None,
    )
    return report, format_report


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tts-workbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("diagnose", help="one generation on a model, with a report")
    _common(d)
    d.add_argument("--text", default=UPSTREAM_SENTENCE)
    d.add_argument("--reference", help="WAV of the voice to clone (default: a generated voice-like signal)")
    d.add_argument("--out", default="runs/diagnose", help="folder for the WAV and plot")
    d.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="cast the components to this dtype for the precision diagnosis",
    )
    d.add_argument(
        "--autocast", choices=["float16", "bfloat16"], help="run the precision diagnosis under autocast"
    )
    d.set_defaults(run=_diagnose)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .sources import SourceError  # heavy import (torch, chatterbox) after argument parsing

    try:
        # Upstream code prints progress to stdout (e.g. "loaded PerthNet"); keep stdout for the report.
        with contextlib.redirect_stdout(sys.stderr):
            report, fmt = args.run(args)
    except (SourceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else fmt(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
