"""Keep the committed notebooks clean and paired, and refresh the outputs that nbval guards.

Each notebook has one source, edited either way: ``notebooks/NN_name.py`` (a jupytext percent
script) and ``notebooks/NN_name.ipynb`` are a jupytext pair, kept together by ``jupytext --sync``
(``make fmt``). The committed ``.ipynb`` carries no outputs except those of cells whose first line
is ``# NBVAL_CHECK_OUTPUT`` (nbval compares those), no widget state and no papermill metadata:
this is what jupytext and nbstripout do not do for us. From the repository root::

    python -m rpnlab.lab.nbclean refresh notebooks/01_anchors.ipynb   # run, keep guarded outputs
    python -m rpnlab.lab.nbclean clean notebooks/*.ipynb               # strip, keep guarded outputs
    python -m rpnlab.lab.nbclean check notebooks/*.ipynb               # exit 1 if not clean or not in sync

``refresh`` executes the notebook with its default parameters (papermill, python3 kernel) and
copies the outputs of the guarded cells back; guarded cells must therefore print things that do
not depend on ``smoke`` (CI runs nbval on a smoke-parameterised copy).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nbformat

CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
_CELL_KEYS_KEPT = {"tags"}


def is_checked(cell) -> bool:
    return cell.cell_type == "code" and cell.source.lstrip().startswith(CHECK_MARK)


def _merge_streams(outputs: list) -> list:
    """Consecutive stdout (or stderr) chunks as one output, as a reader would see them."""
    merged = []
    for o in outputs:
        if merged and o.output_type == "stream" and merged[-1].output_type == "stream" and o.name == merged[-1].name:
            merged[-1].text += o.text
        else:
            merged.append(o)
    return merged


def clean(nb):
    """Strip outputs (except guarded cells'), widget state, papermill metadata and cell ids' noise."""
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("execution", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    kept_cells = []
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            continue
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in _CELL_KEYS_KEPT}
        if cell.cell_type == "code":
            if is_checked(cell):
                # Only text goes into the repository: no images, no widget views.
                cell.outputs = _merge_streams([o for o in cell.outputs if o.output_type == "stream" or
                                               set(o.get("data", {})) <= {"text/plain"}])
                for o in cell.outputs:
                    if o.output_type == "execute_result":
                        o.execution_count = 1
                cell.execution_count = 1 if cell.outputs else None
            else:
                cell.outputs = []
                cell.execution_count = None
        kept_cells.append(cell)
    nb.cells = kept_cells
    return nb


def problems(nb) -> list[str]:
    """Why ``nb`` is not clean (empty list if it is)."""
    out = []
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        out.append("kernelspec is not python3")
    for key in ("widgets", "papermill"):
        if key in nb.metadata:
            out.append(f"metadata.{key} present")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.outputs and not is_checked(cell):
            out.append(f"cell {i} has outputs but is not marked {CHECK_MARK}")
        if "papermill" in cell.metadata or "injected-parameters" in cell.metadata.get("tags", []):
            out.append(f"cell {i} carries papermill metadata")
    return out


def refresh(path: Path) -> None:
    """Execute ``path`` with its defaults and store the outputs of its guarded cells, clean."""
    import papermill

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        executed = papermill.execute_notebook(
            str(path), str(Path(tmp) / path.name), kernel_name="python3", progress_bar=False,
            cwd=str(path.parent), parameters={"record_path": str(Path(tmp) / "record.json")},
        )
    by_source = {}
    for cell in executed.cells:
        if is_checked(cell):
            by_source[cell.source] = cell.outputs
    for cell in nb.cells:
        if is_checked(cell):
            cell.outputs = by_source[cell.source]
    nbformat.write(clean(nb), path)


def pair_problems(path: Path) -> list[str]:
    """How ``path`` (a ``.ipynb``) and its jupytext pair ``path.with_suffix(".py")`` differ.

    Compares what a reader edits: cell types, sources and tags (outputs live only in the
    ``.ipynb``). An empty list means the pair is in sync.
    """
    import jupytext

    script = path.with_suffix(".py")
    if not script.exists():
        return [f"{script} is missing: pair it with `jupytext --set-formats ipynb,py:percent {path}`"]
    nb = nbformat.read(path, as_version=4)
    formats = nb.metadata.get("jupytext", {}).get("formats", "")
    out = [] if "py:percent" in formats else [f"{path}: not paired (metadata.jupytext.formats={formats!r})"]
    text = jupytext.read(script)
    cells_nb = [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]
    cells_py = [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in text.cells]
    if len(cells_nb) != len(cells_py):
        out.append(f"{path}: {len(cells_nb)} cells, {script.name}: {len(cells_py)}")
    for i, (a, b) in enumerate(zip(cells_nb, cells_py)):
        if a != b:
            first = next((la for la, lb in zip(a[1].splitlines(), b[1].splitlines()) if la != lb), a[1][:60])
            out.append(f"{path}: cell {i} differs from {script.name} (first differing line: {first!r})")
            break
    if out:
        out.append("run `make fmt` (jupytext --sync) after editing either file")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("refresh", "clean", "check"):
        p = sub.add_parser(name)
        p.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    status = 0
    for path in args.notebooks:
        if args.command == "refresh":
            refresh(path)
        elif args.command == "clean":
            nbformat.write(clean(nbformat.read(path, as_version=4)), path)
        else:
            found = problems(nbformat.read(path, as_version=4)) + pair_problems(path)
            for problem in found:
                print(f"{path}: {problem}")
            status |= bool(found)
    return status


if __name__ == "__main__":
    sys.exit(main())
