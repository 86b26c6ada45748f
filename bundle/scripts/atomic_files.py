"""JSON records written to a temporary sibling and moved into place, so a crash never leaves half a file behind."""

from __future__ import annotations

import json
import os


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """``json.dump(data, indent=2)`` to ``path`` via ``path.tmp`` + ``os.replace``; values JSON lacks become text."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)
