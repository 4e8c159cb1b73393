"""Benchmark tables in docs/benchmarks.md: each benchmark owns one '## Section' and appends rows to it."""

from __future__ import annotations

from rxray import storage


def render_section(title: str, intro: str, header: str, rows: list[str], after_table: list[str]) -> str:
    """One section: title, what is measured, the table of every recorded run, then the notes and prose under it."""
    lines = [title, "", intro, "", header, "|" + "---|" * (header.count("|") - 1), *rows, ""]
    if after_table:
        lines += [*after_table, ""]
    return "\n".join(lines)


def _with_note(after_table: list[str], note: str) -> list[str]:
    """The lines under a table with ``- note`` added after the last run note (before any prose that follows)."""
    last_note = max((i for i, line in enumerate(after_table) if line.startswith("- ")), default=None)
    if last_note is None:
        return [f"- {note}", *([""] if after_table else []), *after_table]
    return [*after_table[:last_note + 1], f"- {note}", *after_table[last_note + 1:]]


def record_row(path: str, title: str, intro: str, header: str, row: str, note: str | None = None) -> None:
    """Append a row (and a note) to the `title` section of a markdown file; everything else stays as it is.

    The intro is rewritten; rows already in the table, the run notes and any prose
    written under the table are kept.
    """
    record_rows(path, title, intro, header, [row], note)


def record_rows(path: str, title: str, intro: str, header: str, new_rows: list[str], note: str | None = None,
                replace: bool = False) -> None:
    """Add rows (and a note) to the `title` section of a markdown file, or with ``replace`` make them its table.

    With ``replace`` the previous rows and run notes go (one run owns the table);
    prose written under the table is kept either way.
    """
    lines = storage.read_text(path).splitlines() if storage.exists(path) else []
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    rows: list[str] = []
    after_table: list[str] = []
    if start is None:
        before, after = lines, []
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        section = lines[start + 1:end]
        table = [i for i, line in enumerate(section) if line.startswith("|")]
        table_end = table[-1] + 1 if table else 0
        rows = [line for line in section[:table_end] if line.startswith("| ") and line != header]
        after_table = "\n".join(section[table_end:]).strip("\n").splitlines()
        before, after = lines[:start], lines[end:]
    if replace:
        rows = []
        after_table = [line for line in after_table if not line.startswith("- ")]
        after_table = "\n".join(after_table).strip("\n").splitlines()
    rows.extend(new_rows)
    if note:
        after_table = _with_note(after_table, note)
    head = "\n".join(before).rstrip("\n")
    tail = "\n".join(after).strip("\n")
    body = render_section(title, intro, header, rows, after_table)
    storage.write_text(path, (head + "\n\n" if head else "") + body + ("\n" + tail + "\n" if tail else ""))
