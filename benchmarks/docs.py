"""The one place benchmarks write into docs/ (only when a benchmark is run with --write-docs)."""
from __future__ import annotations

from pathlib import Path

from dsdm.io import atomic_write_text


def replace_section(doc: Path, marks: tuple[str, str], body: str, title: str) -> None:
    """Replace the text between `marks` in `doc` (append a titled section if absent), atomically."""
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\n"
    block = f"{marks[0]}\n{body}\n{marks[1]}"
    if marks[0] in text and marks[1] in text:
        head, rest = text.split(marks[0], 1)
        text = head + block + rest.split(marks[1], 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    atomic_write_text(doc, text)
