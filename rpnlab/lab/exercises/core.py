"""How an exercise is checked: hidden cases, references, one line of verdict and a hint.

An ``Exercise`` names the function the learner writes (``my_<name>`` in the notebook), a set of
hidden ``Case``s (small inputs, each with a hint saying what a wrong answer there usually
misses) and a ``verify`` that compares the learner's output with the references (rpnlab's own
function and, where it has one, torchvision's). ``run`` tries the cases in order and stops at
the first failure:

- ``pass``: right on every case;
- ``todo``: the function still raises ``NotImplementedError`` (the blank stub); the notebook goes
  on, so a headless run of the student edition never stops at an exercise;
- ``fail``: the first failing case, what was expected, what came back, and the case's hint.

Inputs are cloned for every call, so a function that writes into its arguments cannot change
what the references see.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Case", "Exercise", "Result", "against", "compare_tensors", "run"]

PASS, FAIL, TODO = "pass", "fail", "todo"


@dataclass
class Case:
    """One hidden input: ``args`` for the learner's function, shown only when it fails.

    Attributes:
        name: what the case is about, e.g. "two boxes that do not overlap".
        args: positional arguments (tensors are cloned before every call).
        hint: why an answer typically goes wrong here ("wrong, because ...").
    """

    name: str
    args: tuple
    hint: str


@dataclass
class Result:
    """The verdict of one check; true when the exercise passed."""

    exercise: str
    status: str
    message: str
    case: str | None = None

    def __bool__(self) -> bool:
        return self.status == PASS

    def _ipython_display_(self) -> None:
        # The check printed its verdict already; a check on a cell's last line would otherwise
        # show it a second time as the cell's value.
        return None


# verify(args, got) -> None when right, else a description of what differs
Verify = Callable[[tuple, object], "str | None"]


@dataclass
class Exercise:
    """One exercise: the learner writes ``function``, ``verify`` judges it on ``cases()``."""

    name: str
    task: str  # one line: what the function computes, with shapes
    cases: Callable[[], list[Case]]
    verify: Verify
    agrees_with: str  # the references, for the pass line
    function: str = field(default="")

    def __post_init__(self):
        self.function = self.function or f"my_{self.name}"


def _show(value, limit: int = 6) -> str:
    """A short text of a case's input or output (first rows of a tensor, its shape)."""
    if isinstance(value, Tensor):
        shape = "x".join(map(str, value.shape)) or "scalar"
        body = value if value.dim() == 0 or value.shape[0] <= limit else value[:limit]
        if body.is_floating_point():
            body = body.detach().to(torch.float64).round(decimals=4)
        text = " ".join(str(body.detach().cpu().tolist()).split())
        more = f" ... ({value.shape[0] - limit} more rows)" if value.dim() and value.shape[0] > limit else ""
        return f"{value.dtype} ({shape}) {text}{more}".replace("torch.", "")
    if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value):
        return "(" + ", ".join(_show(v, limit) for v in value) + ")"
    return repr(value)


def compare_tensors(got, expected: Tensor, atol: float = 1e-4, rtol: float = 1e-4, what: str = "the result") -> str | None:
    """None when ``got`` is a tensor equal to ``expected`` (shape, and values up to tolerance)."""
    if not isinstance(got, Tensor):
        return f"{what} must be a torch.Tensor, got {type(got).__name__}"
    if tuple(got.shape) != tuple(expected.shape):
        return f"{what} has shape {tuple(got.shape)} where {tuple(expected.shape)} was expected"
    if expected.dtype == torch.bool or not expected.is_floating_point():
        if not torch.equal(got.to(expected.dtype), expected):
            return f"{what} differs: expected {_show(expected)}, got {_show(got)}"
        return None
    g = got.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not torch.allclose(g, e, atol=atol, rtol=rtol, equal_nan=True):
        gap = (g - e).abs().nan_to_num(float("inf"))
        where = tuple(int(i) for i in torch.unravel_index(gap.argmax(), gap.shape)) if gap.dim() else ()
        return (f"{what} differs: expected {_show(expected)}, got {_show(got)}"
                + (f" (largest gap at index {where})" if where else ""))
    return None


def against(*references: tuple[str, Callable], compare: Callable = compare_tensors) -> Verify:
    """A ``verify`` comparing the learner's output with each reference ``(label, fn(*args))``.

    A reference returning ``None`` does not apply to that case (e.g. torchvision has no anchor
    offset 0.5) and is skipped.
    """

    def verify(args: tuple, got) -> str | None:
        for label, reference in references:
            expected = reference(*_clone(args))
            if expected is None:
                continue
            problem = compare(got, expected)
            if problem:
                return f"{problem}   [reference: {label}]"
        return None

    return verify


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, Tensor) else copy.deepcopy(a) for a in args)


def run(exercise: Exercise, fn, *, quiet: bool = False) -> Result:
    """Check ``fn`` on the exercise's hidden cases; print the verdict unless ``quiet``."""
    name = exercise.function
    if not callable(fn):
        result = Result(exercise.name, FAIL, f"✗ {exercise.name}: pass the function itself, "
                        f"check.{exercise.name}({name}), not {type(fn).__name__}")
        return _say(result, quiet)
    cases = exercise.cases()
    for number, case in enumerate(cases, 1):
        try:
            got = fn(*_clone(case.args))
        except NotImplementedError:
            result = Result(exercise.name, TODO, f"… {exercise.name}: not done yet. Replace the "
                            f"`raise NotImplementedError` in {name} with your code: {exercise.task}.")
            return _say(result, quiet)
        except Exception as error:  # noqa: BLE001 - any error of the learner's code is reported with its case
            problem = f"it raised {type(error).__name__}: {error}"
        else:
            problem = exercise.verify(case.args, got)
        if problem:
            lines = [
                f"✗ {exercise.name}: wrong on hidden case {number} of {len(cases)}, {case.name}.",
                f"  inputs: {_show(case.args)}",
                f"  {problem}",
                f"  hint: wrong, because {case.hint}",
            ]
            return _say(Result(exercise.name, FAIL, "\n".join(lines), case.name), quiet)
    result = Result(exercise.name, PASS, f"✓ {exercise.name}: right on all {len(cases)} hidden cases "
                    f"(agrees with {exercise.agrees_with}).")
    return _say(result, quiet)


def _say(result: Result, quiet: bool) -> Result:
    if not quiet:
        print(result.message)
    return result


def seeded(seed: int) -> torch.Generator:
    """The generator every case set draws from, so hidden cases are the same on every machine."""
    return torch.Generator().manual_seed(seed)


def random_boxes(n: int, generator: torch.Generator, size: float = 64.0, min_side: float = 2.0) -> Tensor:
    """``(n, 4)`` float32 boxes with positive sides inside ``[0, size]`` squared."""
    xy = torch.rand(n, 2, generator=generator) * (size - min_side)
    wh = min_side + torch.rand(n, 2, generator=generator) * (size - xy).clamp(min=min_side) * 0.8
    return torch.cat((xy, (xy + wh).clamp(max=size)), dim=1)


def check_names(exercises: Sequence[Exercise]) -> None:
    names = [e.name for e in exercises]
    if len(set(names)) != len(names):
        raise ValueError(f"exercise names must be unique, got {names}")
