"""Build ``notebooks/*.ipynb`` from the reviewable sources in ``notebooks/src/*.py`` (outputs empty).

The sources use the "percent" cell format: a line ``# %%`` starts a code cell, ``# %% [markdown]`` a Markdown
cell whose lines are comments (``# text``). Cell ids are derived from the file name, so regenerating an unchanged
source gives a byte-identical notebook.

    python notebooks/make_notebooks.py           # (re)write the notebooks
    python notebooks/make_notebooks.py --check   # exit 1 if a notebook differs from its source
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def parse_cells(text: str) -> list[tuple[str, str]]:
    """``[(kind, source)]`` with kind ``"code"`` or ``"markdown"``."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"text before the first '# %%' marker: {line!r}")
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            bad = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
            if bad:
                raise ValueError(f"Markdown cell line is not a comment: {bad[0]!r}")
            lines = [ln[2:] if ln.startswith("# ") else ln[1:] for ln in lines]
        source = "\n".join(lines).strip("\n")
        if source:
            out.append((kind, source))
    return out


def build(src: Path) -> nbformat.NotebookNode:
    cells = []
    for i, (kind, source) in enumerate(parse_cells(src.read_text())):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cells.append(make(source, id=f"{src.stem.replace('_', '-')}-{i}"))
    nb = nbformat.v4.new_notebook(cells=cells, metadata=METADATA)
    nbformat.validate(nb)
    return nb


def render(src: Path) -> str:
    return nbformat.writes(build(src)) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a notebook is out of date")
    args = ap.parse_args(argv)
    stale = []
    for src in sorted(SRC.glob("*.py")):
        target = HERE / f"{src.stem}.ipynb"
        text = render(src)
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(target.name)
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date with notebooks/src: {', '.join(stale)}; run python notebooks/make_notebooks.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
