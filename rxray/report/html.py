"""HTML building blocks of the report: its style sheet, escaped tables, figures, links and provenance.

Every value that reaches the page goes through :func:`escape`, so a treatment or a
folder name can never break the markup; numbers are shown to four significant digits.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from rxray.report.step_outputs import StepOutput

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 90%; }
.table-scroll { overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figure.wide img { max-width: 1150px; }
figcaption { font-size: 85%; color: #555; max-width: 600px; }
.not-run { color: #999; font-style: italic; } .problem { color: #b00; }
code { background: #f6f6f6; padding: 0 .2em; } nav a { margin-right: 1em; }
"""


def escape(value: Any) -> str:
    """A value as text safe inside HTML elements and attributes."""
    return html.escape(str(value), quote=True)


def format_value(value: Any) -> str:
    """A value as shown in a table cell: floats to four significant digits, containers as JSON, "-" for none.

    A missing value reads as "-" (a multiclass classifier has no positive class or threshold), not "nan".
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (np.floating,)):
        return format_value(float(value))
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def html_table(frame: pd.DataFrame) -> str:
    """A DataFrame as an HTML table, every cell escaped; text columns left-aligned."""
    text_columns = {c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])}
    head = "".join(f'<th class="{"text" if c in text_columns else ""}">{escape(c)}</th>' for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = "".join(f'<td class="{"text" if c in text_columns else ""}">{escape(format_value(v))}</td>'
                        for c, v in zip(frame.columns, values))
        rows.append(f"<tr>{cells}</tr>")
    return f"<div class=\"table-scroll\"><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def kv_table(values: dict[str, Any]) -> str:
    """A two-column (name, value) table."""
    return html_table(pd.DataFrame({"name": list(values), "value": [format_value(v) for v in values.values()]}))


def figure_html(relative: str, caption: str, wide: bool = False) -> str:
    """An image that links to itself, with a caption."""
    src = escape(relative)
    return (f'<figure class="{"wide" if wide else ""}"><a href="{src}"><img src="{src}" alt="{escape(caption)}">'
            f"</a><figcaption>{escape(caption)}</figcaption></figure>")


def link_html(relative: str, text: str) -> str:
    """A relative link."""
    return f'<a href="{escape(relative)}">{escape(text)}</a>'


def provenance_html(output: StepOutput) -> str:
    """The manifest's config and versions, folded away."""
    detail = {"config": output.manifest.get("config"), "versions": output.manifest.get("versions"),
              "created": output.manifest.get("created")}
    return (f"<details><summary>config and versions</summary><pre>"
            f"{escape(json.dumps(detail, indent=2, default=str))}</pre></details>")
