"""The course setup: the one set of anchor and sampling settings every notebook starts from.

Notebooks 01-09 read their anchors (sizes, aspect ratios, stride, centre offset) and the RPN's
matching and sampling (IoU thresholds, anchors sampled per image, positive fraction) from here,
and ``course_setup()`` reads them from the model preset the detector is trained with
(``rpnlab.detector.model.synthetic_model_config``), so the early notebooks look at exactly the
anchors the later ones train, and retuning the preset retunes the course. A notebook that departs
from it (a parameter set by hand, or a lesson that needs another setting) prints so with
``departures``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CourseSetup", "course_setup", "departures", "resolve", "setup_of"]


@dataclass(frozen=True)
class CourseSetup:
    """Anchor and RPN sampling settings of the course (one feature level)."""

    anchor_sizes: tuple[float, ...]
    anchor_ratios: tuple[float, ...]  # height / width
    anchor_stride: int
    anchor_offset: float  # anchor centres at (i + offset) * stride
    high_threshold: float  # IoU at or above which an anchor is positive
    low_threshold: float  # IoU below which an anchor is negative
    batch_size_per_image: int  # anchors sampled per image for the RPN loss
    positive_fraction: float

    def describe(self) -> str:
        """One line per setting, for the notebook's "course setup" cell."""
        return "\n".join(f"{name:>20}: {_show(value)}" for name, value in asdict(self).items())


def course_setup() -> CourseSetup:
    """The course's settings, read from ``synthetic_model_config()`` (the model preset)."""
    from rpnlab.detector.model import synthetic_model_config

    return setup_of(synthetic_model_config())


def setup_of(model_config) -> CourseSetup:
    """The course settings of a ``ModelConfig`` (a checkpoint's ``model.config``, a sweep's base),
    so that ``departures(course_setup(), asdict(setup_of(cfg)))`` names what a model changed."""
    anchors, rpn = model_config.anchors, model_config.rpn
    if len(anchors.strides) != 1:
        raise ValueError(f"the course teaches one feature level; this model has strides {anchors.strides}")
    return CourseSetup(
        anchor_sizes=tuple(float(s) for s in anchors.sizes[0]),
        anchor_ratios=tuple(float(r) for r in anchors.aspect_ratios[0]),
        anchor_stride=int(anchors.strides[0]),
        anchor_offset=float(anchors.offset),
        high_threshold=float(rpn.fg_iou_thresh),
        low_threshold=float(rpn.bg_iou_thresh),
        batch_size_per_image=int(rpn.batch_size_per_image),
        positive_fraction=float(rpn.positive_fraction),
    )


def resolve(setup: CourseSetup, **given: Any) -> dict[str, Any]:
    """The notebook's values: each ``given`` value, or the course's where it is empty (``[]``, ``0``
    or ``None``, the parameters cell's "use the course setup"). Unknown names are errors."""
    fields = asdict(setup)
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"not course settings: {', '.join(unknown)} (known: {', '.join(fields)})")
    out = {}
    for name, value in given.items():
        empty = value is None or (isinstance(value, (list, tuple)) and len(value) == 0) or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)
        out[name] = fields[name] if empty else (tuple(value) if isinstance(value, list) else value)
    return out


def departures(setup: CourseSetup, used: Mapping[str, Any], reasons: Mapping[str, str] | None = None) -> list[str]:
    """A line for each setting in ``used`` that differs from the course's, with its reason."""
    fields, reasons = asdict(setup), dict(reasons or {})
    lines = []
    for name, value in used.items():
        if name not in fields:
            raise ValueError(f"not a course setting: {name!r} (known: {', '.join(fields)})")
        mine = tuple(value) if isinstance(value, list) else value
        theirs = fields[name]
        same = (tuple(float(v) for v in mine) == tuple(float(v) for v in theirs)
                if isinstance(theirs, tuple) else float(mine) == float(theirs))
        if not same:
            why = reasons.get(name, "set by a parameter of this run")
            lines.append(f"{name} = {_show(mine)} instead of the course's {_show(theirs)}: {why}")
    return lines


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
