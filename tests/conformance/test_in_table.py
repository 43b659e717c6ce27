"""The conformance table's rendering: rows grouped, counted, and written only between the markers."""

from __future__ import annotations

from pathlib import Path

import pytest
from table import END, START, render, write_readme

ROWS = [
    {"direction": "out", "writer": "weightsmith.save", "reader": "safetensors.torch.load_file",
     "check": "bit-identical", "versions": "safetensors 0.8.0"},
    {"direction": "in", "writer": "torch.save", "reader": "weightsmith", "check": "inspect exit 0",
     "versions": "torch 2.13.0"},
    {"direction": "in", "writer": "torch.save", "reader": "weightsmith", "check": "inspect exit 0",
     "versions": "torch 2.13.0"},
    {"direction": "in", "writer": "torch.save", "reader": "weightsmith", "check": "a|b", "versions": "torch 2.13.0"},
]


def test_rows_group_by_direction_writer_reader_versions_with_counts() -> None:
    lines = render(ROWS).splitlines()
    assert lines[0] == "| direction | writer | reader | checks | versions | count |"
    assert lines[2] == "| in | torch.save | weightsmith | inspect exit 0 ×2<br>a\\|b ×1 | torch 2.13.0 | 3 |"
    assert lines[3].startswith("| out | weightsmith.save | safetensors.torch.load_file | bit-identical ×1 |")
    assert "4 passing checks" in lines[-1]


def test_write_replaces_only_the_marked_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{START}\nold table\n{END}\nafter\n", encoding="utf-8")
    write_readme("| new |", readme)
    assert readme.read_text(encoding="utf-8") == f"# title\n\nbefore\n{START}\n| new |\n{END}\nafter\n"


def test_write_without_markers_changes_nothing(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# title\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no section between"):
        write_readme("| new |", readme)
    assert readme.read_text(encoding="utf-8") == "# title\n"
