"""MkDocs hook: list every notebook in the nav without naming each one in mkdocs.yml.

A nav entry that is a folder (``notebooks/``) is replaced by one entry per ``*.ipynb`` file in it,
in file-name order, each titled by the notebook's first ``# `` heading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _title(notebook: Path) -> str:
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return notebook.stem


def _expand(entries: list[Any], docs: Path) -> list[Any]:
    out: list[Any] = []
    for entry in entries:
        if isinstance(entry, str) and entry.endswith("/"):
            out += [
                {_title(nb): nb.relative_to(docs).as_posix()} for nb in sorted((docs / entry).glob("*.ipynb"))
            ]
        elif isinstance(entry, dict):
            out.append({k: _expand(v, docs) if isinstance(v, list) else v for k, v in entry.items()})
        else:
            out.append(entry)
    return out


def on_config(config: Any) -> Any:
    if config.nav:
        config.nav = _expand(config.nav, Path(config.docs_dir))
    return config
