"""``Table``: rows of dicts that print as an aligned text table (reports, position listings)."""
from __future__ import annotations


class Table(list):
    """Rows (dicts with the same keys) that print as an aligned text table."""

    def __str__(self) -> str:
        if not self:
            return "(empty)"
        columns = list(self[0])
        cells = [[_format(row.get(c, "")) for c in columns] for row in self]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        return "\n".join(lines)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)
