"""Rows of the conformance table: which writer's files were checked with which reader, and how.

Each conformance test calls `record(...)` once its check has passed. When the environment variable
``WS_CONFORMANCE_LOG`` names a file, every row is appended to it as one JSON line; the README's
table of what is tested against which writer, reader and version is rendered from those rows.
Without the variable, `record` does nothing, so the tests run the same either way.
"""

from __future__ import annotations

import json
import os


def record(*, direction: str, writer: str, reader: str, check: str, versions: str = "") -> None:
    """Note one passed check.

    Args:
        direction: ``"in"`` (another tool wrote, weightsmith read) or ``"out"`` (weightsmith wrote,
            another tool read).
        writer: who wrote the file, with the API used (``"safetensors.torch.save_file"``).
        reader: who read it (``"weightsmith.open"``, ``"transformers.from_pretrained"``).
        check: what was checked (``"keys, shapes, dtypes, bit-identical"``, ``"inspect exit 0"``).
        versions: the versions that matter (``"transformers 4.57.1"``), empty when none.
    """
    path = os.environ.get("WS_CONFORMANCE_LOG")
    if not path:
        return
    row = {"direction": direction, "writer": writer, "reader": reader, "check": check, "versions": versions}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
