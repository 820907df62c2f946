"""The instructor edition: the committed (student) notebooks with every exercise's solution filled in.

The notebooks hold the exercises as stubs, the way nbgrader and otter-grader mark a solution
region inside a cell::

    def my_iou(boxes1, boxes2):
        \"\"\"...\"\"\"
        ### BEGIN SOLUTION
        raise NotImplementedError
        ### END SOLUTION

and ``rpnlab.lab.exercises.solutions`` holds one function per exercise with the same markers
around its answer. This module writes a copy of each notebook where the region of every
``my_<name>`` is the region of ``solutions.<name>`` (re-indented, markers kept), plus a cell after
the title saying it is the instructor edition. Nothing is copied by hand, so a changed solution
reaches the next edition; tests/test_exercises.py proves every stub fails and every filled-in
cell passes.

nbgrader and otter-grader go the other way: the solutions live in the instructor's notebooks and
a tool strips them (nbgrader also wants its course folder layout and a gradebook database). Here
the committed notebooks are the student edition, which CI runs headless, so the direction is
reversed: the student notebooks and one solutions module are the source, the instructor edition
is the generated file, and no grading tool is needed at an offline workshop. From the repository root::

    python -m rpnlab.lab.exercises.instructor --out runs/instructor     # make instructor
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from pathlib import Path

import nbformat

from rpnlab.lab.exercises import solutions

__all__ = ["BEGIN", "END", "exercise_cells", "fill_source", "solution_region", "write_edition"]

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
_DEF = re.compile(r"^\s*def my_(\w+)\(")
NOTE = ("**Instructor edition**: the exercises' solutions are filled in between the `### BEGIN SOLUTION` and "
        "`### END SOLUTION` markers. Generated from the student notebook and `rpnlab/lab/exercises/solutions.py` "
        "by `make instructor`; do not hand it to learners, and do not edit it (edit those two instead).")


def solution_region(name: str) -> list[str]:
    """The lines between the markers of ``solutions.<name>``, dedented."""
    fn = getattr(solutions, name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"no solution named {name!r} in rpnlab.lab.exercises.solutions")
    lines = inspect.getsource(fn).splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] <= starts[0]:
        raise ValueError(f"solutions.{name} must hold one {BEGIN} ... {END} region")
    return textwrap.dedent("\n".join(lines[starts[0] + 1 : ends[0]])).splitlines()


def _regions(lines: list[str]) -> list[tuple[str, int, int]]:
    """``(exercise name, begin line, end line)`` of each solution region in a cell's lines."""
    found, current = [], None
    for i, line in enumerate(lines):
        if m := _DEF.match(line):
            current = m.group(1)
        elif line.strip() == BEGIN:
            if current is None:
                raise ValueError(f"{BEGIN} at line {i + 1} is not inside a `def my_<name>(...)`")
            end = next((k for k in range(i + 1, len(lines)) if lines[k].strip() == END), None)
            if end is None:
                raise ValueError(f"{BEGIN} at line {i + 1} has no {END}")
            found.append((current, i, end))
    return found


def exercise_cells(nb) -> dict[str, int]:
    """``{exercise name: cell index}`` for every code cell of ``nb`` holding a solution region."""
    out = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            for name, _, _ in _regions(cell.source.splitlines()):
                out[name] = index
    return out


def fill_source(source: str) -> str:
    """A cell's source with each stub region replaced by its solution (markers kept)."""
    lines = source.splitlines()
    for name, begin, end in reversed(_regions(lines)):
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        body = [indent + line if line.strip() else "" for line in solution_region(name)]
        lines[begin + 1 : end] = body
    return "\n".join(lines)


def instructor_notebook(nb):
    """A copy of ``nb`` with the solutions filled in and a note first."""
    nb = nbformat.from_dict(nb)  # a deep copy
    for cell in nb.cells:
        if cell.cell_type == "code" and BEGIN in cell.source:
            cell.source = fill_source(cell.source)
    # After the title, so the notebook still opens on what it teaches.
    at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
    nb.cells.insert(at, nbformat.v4.new_markdown_cell(NOTE))
    return nb


def write_edition(notebooks: list[Path], out_dir: Path) -> list[Path]:
    """Write the instructor edition of each notebook that has exercises into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        if not exercise_cells(nb):
            continue
        target = out_dir / path.name
        nbformat.write(instructor_notebook(nb), target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="student notebooks (default: notebooks/NN_*.ipynb with exercises)")
    parser.add_argument("--out", type=Path, default=Path("runs/instructor"), help="folder to write the edition into")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(Path("notebooks").glob("[0-9][0-9]_*.ipynb"))
    missing = [str(p) for p in notebooks if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if not notebooks:
        parser.error("no notebooks found: run from the repository root or name them")
    written = write_edition(notebooks, args.out)
    for path in written:
        print(path)
    print(f"instructor edition: {len(written)} notebooks with solutions in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
