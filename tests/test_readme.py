"""The README's commands work as a new user types them.

Every line of the README's ``bash`` blocks is read: each ``rpnlab`` command (also after
``torchrun ... -m rpnlab``) must parse with the real parser, each ``-p NAME`` of ``rpnlab run`` /
``rpnlab sweep`` must be a parameter its notebook declares, each ``make`` target must exist in the
Makefile, and each program must be reachable as written (a system tool, or in the virtual
environment the README tells the reader to activate). The quick ones run: ``rpnlab
export-samples`` (in a scratch folder) and ``papermill --help-notebook``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rpnlab import cli
from rpnlab.lab.runner import list_notebooks, notebook_parameters, resolve_notebook

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
# Programs a reader has before the virtual environment exists (or that it does not provide).
SYSTEM_TOOLS = {"make", "python3", "source", "touch", "conda", "pip", "git"}
# Programs of a cluster's login node, shown for SLURM users: not on a laptop.
CLUSTER_TOOLS = {"sbatch"}


def readme_commands() -> list[list[str]]:
    """Each command line of the README's bash blocks, as argv (comments and continuations removed)."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):  # VAR=value before a program
                argv = argv[1:]
            if argv:
                commands.append(argv)
    return commands


COMMANDS = readme_commands()


def _program(argv: list[str]) -> str:
    return Path(argv[0]).name


def _rpnlab_argv(argv: list[str]) -> list[str] | None:
    """The arguments given to ``rpnlab`` by this command line, or None if it does not run rpnlab."""
    if _program(argv) == "rpnlab":
        return argv[1:]
    if "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["rpnlab"]:
        return argv[argv.index("-m") + 2:]
    return None


def _parse(args: list[str]):
    """Parse ``rpnlab ARGS`` as ``rpnlab.cli.main`` does (``sweep collect`` has a parser of its own)."""
    if args[:2] == ["sweep", "collect"]:
        parsed = cli._collect_parser().parse_args(args[2:])
        parsed.command = "sweep"
        return parsed
    return cli.build_parser().parse_args(args)


def _ids(commands):
    return [" ".join(c)[:60] for c in commands]


RPNLAB = [c for c in COMMANDS if _rpnlab_argv(c) is not None]
MAKE = [c for c in COMMANDS if _program(c) == "make"]


def test_the_readme_has_commands_of_every_kind():
    assert len(RPNLAB) >= 8 and len(MAKE) >= 3, COMMANDS
    subcommands = {_rpnlab_argv(c)[0] for c in RPNLAB}
    assert {"run", "sweep", "train", "evaluate", "predict", "export-samples"} <= subcommands, subcommands


@pytest.mark.parametrize("argv", COMMANDS, ids=_ids(COMMANDS))
def test_every_program_is_reachable_as_written(argv):
    program = argv[0]
    if program.startswith(".venv/bin/"):
        assert (VENV_BIN / Path(program).name).exists(), f"{program}: not in the virtual environment"
    elif "/" not in program and program not in SYSTEM_TOOLS | CLUSTER_TOOLS:
        # A bare name works once `source .venv/bin/activate` ran, which the README says first.
        assert "source .venv/bin/activate" in README.read_text(encoding="utf-8")
        assert (VENV_BIN / program).exists(), f"{program}: neither a system tool nor in {VENV_BIN}"


@pytest.mark.parametrize("argv", RPNLAB, ids=_ids(RPNLAB))
def test_every_rpnlab_command_parses(argv):
    args = _rpnlab_argv(argv)
    try:
        parsed = _parse(args)
    except SystemExit as exc:  # argparse's way of saying no
        pytest.fail(f"'rpnlab {' '.join(args)}' does not parse (exit {exc.code})")
    assert parsed.command == args[0]


NOTEBOOK_COMMANDS = [c for c in RPNLAB if _rpnlab_argv(c)[0] in ("run", "sweep") and _rpnlab_argv(c)[1:2] != ["collect"]]


@pytest.mark.parametrize("argv", NOTEBOOK_COMMANDS, ids=_ids(NOTEBOOK_COMMANDS))
def test_every_notebook_parameter_is_declared(argv):
    parsed = cli.build_parser().parse_args(_rpnlab_argv(argv))
    names = [entry[0] for entry in parsed.parameter]
    if parsed.command == "sweep":
        notebooks = [resolve_notebook(parsed.notebook)]
    else:
        notebooks = [resolve_notebook(n) for n in parsed.notebooks] or list_notebooks()
    declared = [set(notebook_parameters(nb)) for nb in notebooks]
    for name in names:
        if parsed.command == "sweep" or parsed.notebooks:
            missing = [nb.stem for nb, d in zip(notebooks, declared) if name not in d]
            assert not missing, f"-p {name}: not a parameter of {', '.join(missing)}"
        else:
            assert any(name in d for d in declared), f"-p {name}: no notebook declares it"


@pytest.mark.parametrize("argv", MAKE, ids=_ids(MAKE))
def test_every_make_target_exists(argv):
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", makefile, flags=re.MULTILINE))
    variables = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", makefile, flags=re.MULTILINE))
    for word in argv[1:]:
        if "=" in word:
            name = word.split("=", 1)[0]
            assert name in variables, f"make {word}: the Makefile has no variable {name}"
        else:
            assert word in targets, f"make {word}: no such target (have {sorted(targets)})"


def test_export_samples_runs_as_written(tmp_path):
    command = next(c for c in RPNLAB if _rpnlab_argv(c)[0] == "export-samples")
    args = _rpnlab_argv(command)
    done = subprocess.run([sys.executable, "-m", "rpnlab", *args], check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / cli.build_parser().parse_args(args).out
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 2 and (out / "annotations.json").is_file()
    # The predict example reads files export-samples wrote.
    predict = next(c for c in RPNLAB if _rpnlab_argv(c)[0] == "predict")
    images = cli.build_parser().parse_args(_rpnlab_argv(predict)).images
    assert all((tmp_path / image).is_file() for image in images), (images, [p.name for p in pngs])


def test_help_notebook_runs_as_written():
    command = next(c for c in COMMANDS if _program(c) == "papermill")
    done = subprocess.run([str(VENV_BIN / "papermill"), *command[1:]], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    notebook = resolve_notebook(Path(command[-1]).stem)
    for name in notebook_parameters(notebook):
        assert name in done.stdout, f"{name} missing from:\n{done.stdout}"


def test_outputs_land_under_runs():
    # Every path an example writes is under runs/, which git ignores.
    for argv in RPNLAB:
        args = _parse(_rpnlab_argv(argv))
        for option in ("out", "out_dir", "json"):
            value = getattr(args, option, None)
            if value:
                assert Path(value).parts[0] == "runs", f"{' '.join(argv)}: writes {value} outside runs/"
    assert "/runs/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def _env():
    import os

    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.xdist_group("notebooks")
def test_run_ends_naming_the_summary(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "rpnlab", "run", "00", "--smoke", "--no-progress", "--out", str(out)],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "without encryption" not in done.stderr, done.stderr[-2000:]  # IPC, not TCP, on POSIX
    last = done.stdout.strip().splitlines()[-1]
    assert str(out / "summary.md") in last, last
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "| seconds |" in summary and "00_setup" in summary
