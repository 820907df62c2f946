"""Self-checking exercises: the learner writes one piece of Faster R-CNN, one line checks it.

In a notebook::

    from rpnlab.lab.exercises import check

    def my_iou(boxes1, boxes2):
        ### BEGIN SOLUTION
        raise NotImplementedError
        ### END SOLUTION

    check.iou(my_iou)   # prints "✓ iou: right on all 7 hidden cases ..." or the first failing
                        # case, what was expected, what came back, and "hint: wrong, because ..."

Each check runs the function on hidden cases against rpnlab's own piece and, where it has one,
torchvision's (``rpnlab.lab.exercises.core``). The blank stub raises ``NotImplementedError``; its
check says "not done yet" and the notebook goes on, so the student edition runs headless.
The solutions live in ``rpnlab.lab.exercises.solutions`` (one function per exercise); the
instructor edition of the notebooks is written from them by ``rpnlab.lab.exercises.instructor``.

``EXERCISES`` lists every exercise by notebook.
"""

from __future__ import annotations

from rpnlab.lab.exercises import anchors, box_coding, fpn, matching, proposals, roi, roi_heads, rpn
from rpnlab.lab.exercises.core import Exercise, Result, check_names, run

__all__ = ["EXERCISES", "Result", "all_exercises", "check", "exercise"]

EXERCISES: dict[str, list[Exercise]] = {
    "01_anchors": [anchors.IOU, anchors.BASE_ANCHORS, anchors.ANCHOR_GRID],
    "02_box_coding": [box_coding.ENCODE, box_coding.DECODE],
    "03_matching_sampling": [matching.LABEL_ANCHORS, matching.SAMPLE],
    "04_rpn_head_losses": [rpn.SMOOTH_L1, rpn.RPN_LOSS],
    "05_proposals": [proposals.CLIP_BOXES, proposals.NMS],
    "06_roi_pooling": [roi.ROI_POOL_BIN, roi.BILINEAR],
    "07_fast_rcnn_head": [roi_heads.PROPOSAL_LABELS, roi_heads.FAST_RCNN_LOSS],
    "10_fpn": [fpn.FPN_LEVEL, fpn.TOP_K_PER_LEVEL],
}


def all_exercises() -> list[Exercise]:
    return [e for group in EXERCISES.values() for e in group]


check_names(all_exercises())
_BY_NAME = {e.name: e for e in all_exercises()}


def exercise(name: str) -> Exercise:
    """The exercise called ``name``; a clear error listing the names otherwise."""
    if name not in _BY_NAME:
        raise AttributeError(f"no exercise named {name!r}; the exercises are: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]


class _Checks:
    """``check.NAME(fn)`` checks ``fn`` for exercise ``NAME`` and prints the verdict (a ``Result``)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        ex = exercise(name)

        def run_check(fn, quiet: bool = False) -> Result:
            return run(ex, fn, quiet=quiet)

        run_check.__name__ = name
        run_check.__doc__ = f"Check {ex.function}: {ex.task}."
        return run_check

    def __dir__(self):
        return sorted(_BY_NAME)


check = _Checks()
