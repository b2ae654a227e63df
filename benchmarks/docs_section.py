"""Each benchmark owns one section of docs/benchmarks.md, between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``, and rewrites only that section (the others keep their own runs)."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(name: str, body: str, doc: Path = DOC) -> Path:
    """Replace section ``name`` of ``doc`` with ``body`` (appended if the section is new)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote the {name} section of {doc}")
    return doc
