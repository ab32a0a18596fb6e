"""Tables of figures as text: aligned plain-text columns for the terminal, or a markdown table for a file.

Ground floor: imports nothing of the package, nor TensorFlow.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False,
                 align: Optional[str] = None) -> str:
    """`rows` under `headers`, one line each; a missing value (None) shows as "-".

    `align` gives each column "l" (left) or "r" (right); by default the first
    column is left-aligned and the others right-aligned. Plain text pads every
    column to its widest cell; markdown leaves the padding to the renderer and
    says the alignment in its separator line (`|---|---:|`).
    """
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[_cell(value) for value in row] for row in rows]
    if markdown:
        line = lambda values: "| " + " | ".join(values) + " |"  # noqa: E731
        separator = "|" + "|".join("---:" if side == "r" else "---" for side in align) + "|"
        return "\n".join([line(headers), separator, *(line(row) for row in cells)])
    widths = [max([len(header), *(len(row[index]) for row in cells)]) for index, header in enumerate(headers)]
    line = lambda values: "  ".join(value.rjust(width) if side == "r" else value.ljust(width)  # noqa: E731
                                    for value, width, side in zip(values, widths, align))
    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in cells)])


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
