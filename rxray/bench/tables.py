"""Benchmark tables in docs/benchmarks.md: each benchmark owns one '## Section' and appends rows to it."""

from __future__ import annotations

from rxray import storage


def render_section(title: str, intro: str, header: str, rows: list[str], notes: list[str]) -> str:
    """One section: title, what is measured, the table of every recorded run, then the run notes."""
    lines = [title, "", intro, "", header, "|" + "---|" * (header.count("|") - 1), *rows, ""]
    if notes:
        lines += [*notes, ""]
    return "\n".join(lines)


def record_row(path: str, title: str, intro: str, header: str, row: str, note: str | None = None) -> None:
    """Append a row (and a note) to the `title` section of a markdown file; other sections stay as they are."""
    lines = storage.read_text(path).splitlines() if storage.exists(path) else []
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    rows: list[str] = []
    notes: list[str] = []
    if start is None:
        before, after = lines, []
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        section = lines[start + 1:end]
        rows = [line for line in section if line.startswith("| ") and line != header]
        notes = [line for line in section if line.startswith("- ")]
        before, after = lines[:start], lines[end:]
    rows.append(row)
    if note:
        notes.append(f"- {note}")
    head = "\n".join(before).rstrip("\n")
    tail = "\n".join(after).strip("\n")
    body = render_section(title, intro, header, rows, notes)
    storage.write_text(path, (head + "\n\n" if head else "") + body + ("\n" + tail + "\n" if tail else ""))
