"""The report document: a list of blocks (headings, text, figures, tables) rendered to Markdown and to HTML.

Both renderings come from the same blocks, so the tables behind the figures are identical in the two files.
Markdown embeds the PNGs (renders anywhere); HTML embeds the SVGs (sharp at any zoom).

Strings that come from results (suite names, GPU names, error text, paths) are plain text, never markup: table
cells are always plain, and inside headings, paragraphs and bullets such a string is wrapped in `literal(...)`.
Markdown then backslash-escapes it and HTML only HTML-escapes it (no `code`/**bold** conversion).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

# A literal span inside block text: private-use delimiters no result string contains (they are stripped from it).
_OPEN, _CLOSE = "\ue000", "\ue001"
_LITERAL = re.compile(f"{_OPEN}(.*?){_CLOSE}", re.DOTALL)
# Characters with an inline meaning in CommonMark/GFM mid-line (code, emphasis, links, HTML, tables, strike, math,
# entities); a backslash escapes any ASCII punctuation. Line-start markers (#, -, +) never start a cell or a span.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&$])")


def literal(text: object) -> str:
    """Mark `text` (from results) as plain text inside a Heading, Para or Bullets item."""
    return f"{_OPEN}{str(text).replace(_OPEN, '').replace(_CLOSE, '')}{_CLOSE}"


def md_escape(text: str) -> str:
    """Plain text as Markdown: special characters backslash-escaped, newlines as spaces."""
    return _MD_SPECIAL.sub(r"\\\1", text.replace(_OPEN, "").replace(_CLOSE, "")).replace("\r", " ").replace("\n", " ")


def _md_text(text: str) -> str:
    """Block text as Markdown: markup kept, literal spans escaped."""
    return _LITERAL.sub(lambda m: md_escape(m.group(1)), text)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    """A paragraph; `code` in backticks is kept as code."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Image:
    """A figure written as `<stem>.png` and `<stem>.svg` beside the report."""

    stem: str
    alt: str


@dataclass(frozen=True)
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    right: frozenset[int] = field(default_factory=frozenset)  # indices of right-aligned (numeric) columns


Block: TypeAlias = Heading | Para | Bullets | Image | Table


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {_md_text(block.text)}")
        elif isinstance(block, Para):
            out.append(_md_text(block.text))
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {_md_text(item)}" for item in block.items))
        elif isinstance(block, Image):
            out.append(f"![{md_escape(block.alt)}]({block.stem}.png)\n\n[SVG]({block.stem}.svg)")
        else:
            out.append(_markdown_table(block))
    return "\n\n".join(out) + "\n"


def _markdown_table(table: Table) -> str:
    def cell(text: str) -> str:
        return md_escape(text) or " "

    head = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---:" if i in table.right else "---" for i in range(len(table.columns))) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join([head, rule, *body])


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 75rem;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .88rem; }
th, td { border: 1px solid #ddd; padding: .25rem .55rem; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 .2rem; border-radius: 3px; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_plain_html(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Image):
            out.append(
                f'<figure><a href="{html.escape(block.stem)}.svg"><img src="{html.escape(block.stem)}.svg" '
                f'alt="{_plain_html(block.alt)}"></a></figure>'
            )
        else:
            out.append(_html_table(block))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_table(table: Table) -> str:
    def cls(i: int) -> str:
        return ' class="r"' if i in table.right else ""

    head = "".join(f"<th{cls(i)}>{_plain_html(c)}</th>" for i, c in enumerate(table.columns))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{_plain_html(v)}</td>" for i, v in enumerate(row)) + "</tr>"
        for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plain_html(text: str) -> str:
    return html.escape(text.replace(_OPEN, "").replace(_CLOSE, ""))


def _inline(text: str) -> str:
    """Escape, then turn `code` and **bold** into tags; literal spans are only escaped."""
    out: list[str] = []
    position = 0
    for match in _LITERAL.finditer(text):
        out.append(_markup_html(text[position : match.start()]))
        out.append(html.escape(match.group(1)))
        position = match.end()
    out.append(_markup_html(text[position:]))
    return "".join(out)


def _markup_html(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
