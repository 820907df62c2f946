"""The exercises: every solution passes its check, every blank stub in the notebooks fails it, the
instructor edition (generated from the notebooks and the solutions) passes, and typical mistakes
are caught by the case whose hint explains them."""

from __future__ import annotations

import ast
import inspect
import math

import nbformat
import pytest
import torch
import torch.nn.functional as F

from rpnlab.lab.exercises import EXERCISES, all_exercises, check, exercise, instructor, solutions
from rpnlab.lab.exercises.core import FAIL, PASS, TODO, run
from tests.test_fpn import FPN_MISTAKES
from tests.test_notebooks import NOTEBOOK_DIR

EXERCISE_IDS = [e.name for e in all_exercises()]
NOTEBOOK_OF = {e.name: stem for stem, group in EXERCISES.items() for e in group}


def _notebook(stem: str):
    return nbformat.read(NOTEBOOK_DIR / f"{stem}.ipynb", as_version=4)


def _statements(source: str, kinds: tuple) -> list:
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    return [n for n in ast.parse(code).body if isinstance(n, kinds)]


def _define(source: str, function: str, nb=None, index: int = 0):
    """The function ``function`` defined by a cell's source (its imports and defs run, calls
    skipped), after the imports of the notebook's cells before it, as in a top-to-bottom run."""
    earlier = [c.source for c in nb.cells[:index] if c.cell_type == "code"] if nb is not None else []
    body = [n for s in earlier for n in _statements(s, (ast.Import, ast.ImportFrom))]
    body += _statements(source, (ast.Import, ast.ImportFrom, ast.FunctionDef))
    namespace: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), "<exercise cell>", "exec"), namespace)  # noqa: S102
    return namespace[function]


def _stub(name: str):
    nb = _notebook(NOTEBOOK_OF[name])
    index = instructor.exercise_cells(nb)[name]
    return _define(nb.cells[index].source, f"my_{name}", nb, index)


# --------------------------------------------------------------------------- where the exercises are


@pytest.mark.parametrize("stem", sorted(EXERCISES))
def test_each_notebook_has_its_exercises(stem):
    nb = _notebook(stem)
    cells = instructor.exercise_cells(nb)
    names = [e.name for e in EXERCISES[stem]]
    assert len(names) >= 2, "at least two exercises per notebook"
    assert sorted(cells) == sorted(names)
    for name in names:
        index = cells[name]
        source = nb.cells[index].source
        assert f"check.{name}(my_{name})" in source, "the exercise cell ends with its one-line check"
        # The stub region is blank: only the raise.
        lines = source.splitlines()
        begin = lines.index(f"    {instructor.BEGIN}")
        assert [line.strip() for line in lines[begin + 1:begin + 3]] == ["raise NotImplementedError", instructor.END]
        # The learner's signature is the solution's, so the instructor edition's code fits the stub.
        assert inspect.signature(_stub(name)).parameters.keys() == inspect.signature(getattr(solutions, name)).parameters.keys()
        prose = nb.cells[index - 1]
        assert prose.cell_type == "markdown" and f"Write `my_{name}(" in prose.source and "Why it matters" in prose.source


# --------------------------------------------------------------------------- solutions pass, stubs fail


@pytest.mark.parametrize("name", EXERCISE_IDS)
def test_solution_passes(name):
    result = run(exercise(name), getattr(solutions, name), quiet=True)
    assert result.status == PASS, result.message
    assert result and "right on all" in result.message


@pytest.mark.parametrize("name", EXERCISE_IDS)
def test_blank_stub_fails_and_says_not_done(name, capsys):
    result = getattr(check, name)(_stub(name))
    assert result.status == TODO and not result
    out = capsys.readouterr().out
    assert "not done yet" in out and f"my_{name}" in out


def test_instructor_edition_passes_every_check(tmp_path, capsys):
    assert instructor.main(["--out", str(tmp_path)] + [str(NOTEBOOK_DIR / f"{s}.ipynb") for s in EXERCISES]) == 0
    assert f"{len(EXERCISES)} notebooks" in capsys.readouterr().out
    for stem, group in EXERCISES.items():
        student, edition = _notebook(stem), nbformat.read(tmp_path / f"{stem}.ipynb", as_version=4)
        assert edition.cells[0].source == student.cells[0].source, "the title stays first"
        assert "Instructor edition" in edition.cells[1].source
        cells = instructor.exercise_cells(edition)
        for e in group:
            filled = edition.cells[cells[e.name]].source
            assert "raise NotImplementedError" not in filled
            result = run(e, _define(filled, e.function, edition, cells[e.name]), quiet=True)
            assert result.status == PASS, f"{stem}: {result.message}"
        # Every other cell is the student's, unchanged.
        rest = [c.source for i, c in enumerate(edition.cells) if i != 1 and i not in cells.values()]
        student_cells = instructor.exercise_cells(student).values()
        assert rest == [c.source for i, c in enumerate(student.cells) if i not in student_cells]


def test_instructor_refuses_bad_input(tmp_path):
    with pytest.raises(SystemExit):
        instructor.main([str(tmp_path / "missing.ipynb"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="has no"):
        instructor.fill_source("def my_iou(a, b):\n    ### BEGIN SOLUTION\n    raise NotImplementedError\n")
    with pytest.raises(ValueError, match="no solution named"):
        instructor.fill_source("def my_nothing(a):\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION\n")


# --------------------------------------------------------------------------- typical mistakes


def _iou_no_clamp(b1, b2):
    lt, rb = torch.max(b1[:, None, :2], b2[None, :, :2]), torch.min(b1[:, None, 2:], b2[None, :, 2:])
    inter = (rb - lt).prod(-1)
    a1, a2 = (b1[:, 2:] - b1[:, :2]).prod(-1), (b2[:, 2:] - b2[:, :2]).prod(-1)
    return inter / (a1[:, None] + a2[None] - inter)


def _base_sizes_outer(sizes, ratios):
    order = [(s, r) for s in sizes for r in ratios]
    return torch.tensor([[-s / math.sqrt(r) / 2, -s * math.sqrt(r) / 2, s / math.sqrt(r) / 2, s * math.sqrt(r) / 2]
                         for s, r in order]).round()


def _encode_x_over_height(anchors, boxes):
    deltas = solutions.encode(anchors, boxes)
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    return torch.stack([deltas[:, 0] * wa / ha, deltas[:, 1], deltas[:, 2], deltas[:, 3]], dim=1)


def _labels_no_low_quality(iou, high, low):
    best = iou.max(dim=0).values
    return torch.where(best >= high, 1.0, torch.where(best < low, 0.0, -1.0))


def _labels_first_best_only(iou, high, low):
    labels = _labels_no_low_quality(iou, high, low)
    labels[iou.argmax(dim=1)] = 1.0
    return labels


def _sample_first_ones(labels, batch_size, positive_fraction):
    pos, neg = torch.where(labels == 1)[0], torch.where(labels == 0)[0]
    num_pos = min(len(pos), int(batch_size * positive_fraction))
    pos_mask, neg_mask = torch.zeros_like(labels, dtype=torch.bool), torch.zeros_like(labels, dtype=torch.bool)
    pos_mask[pos[:num_pos]] = True
    neg_mask[neg[:batch_size - num_pos]] = True
    return pos_mask, neg_mask


def _rpn_loss_masked_by_product(objectness, deltas, labels, targets):
    sampled, positive = labels >= 0, (labels == 1).float()[..., None]
    loss_obj = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
    return loss_obj, F.smooth_l1_loss(deltas * positive, targets * positive, beta=1 / 9, reduction="sum") / sampled.sum()


def _rpn_over_positives(objectness, deltas, labels, targets):
    loss_obj, loss_box = solutions.rpn_loss(objectness, deltas, labels, targets)
    return loss_obj, loss_box * (labels >= 0).sum() / (labels == 1).sum()


def _nms_all_pairs(boxes, scores, iou_threshold):
    order = scores.argsort(descending=True)
    iou = solutions.iou(boxes[order], boxes[order])
    beaten = (iou.triu(diagonal=1) > iou_threshold).any(dim=0)  # by ANY higher box, kept or not
    return order[~beaten]


def _nms_at_or_above(boxes, scores, iou_threshold):
    return solutions.nms(boxes, scores, iou_threshold - 1e-6)


def _roi_pool_torch_round(feature, roi, output_size, i, j):
    # torch.round sends halves to the even neighbour; shifting by a hair below reproduces it here
    return solutions.roi_pool_bin(feature, torch.round(roi) - 1e-3, output_size, i, j)


def _bilinear_unclamped(feature, y, x):
    y0, x0 = int(y), int(x)
    fy, fx = y - y0, x - x0
    top = (1 - fx) * feature[y0, x0] + fx * feature[y0, x0 + 1]
    bottom = (1 - fx) * feature[y0 + 1, x0] + fx * feature[y0 + 1, x0 + 1]
    return (1 - fy) * top + fy * bottom


def _proposal_labels_ones(proposals, gt_boxes, gt_labels, fg, bg_high, bg_low):
    return solutions.proposal_labels(proposals, gt_boxes, gt_labels, fg, bg_high, bg_low).clamp(max=1)


def _proposal_labels_no_bg_low(proposals, gt_boxes, gt_labels, fg, bg_high, bg_low):
    return solutions.proposal_labels(proposals, gt_boxes, gt_labels, fg, bg_high, 0.0)


def _fast_rcnn_loss_over_foreground(class_logits, box_regression, labels, targets):
    loss_cls, loss_box = solutions.fast_rcnn_loss(class_logits, box_regression, labels, targets)
    return loss_cls, loss_box * len(labels) / max(int((labels > 0).sum()), 1)


MISTAKES = [
    ("iou", _iou_no_clamp, "do not overlap", "clamp"),
    ("base_anchors", _base_sizes_outer, "sizes 16, 32", "ratios outer, sizes inner"),
    ("anchor_grid", lambda base, size, stride, offset: solutions.anchor_grid(base, size, stride, 0.0), "offset 0.5", "offset"),
    ("encode", _encode_x_over_height, "moved 10 px right", "WIDTH"),
    ("decode", lambda d, a: solutions.decode(torch.cat([d[:, :2], d[:, 2:].exp() - 1], 1), a), "tw = log 2", "exp"),
    ("label_anchors", _labels_no_low_quality, "no anchor overlaps by 0.7", "rule (i)"),
    ("label_anchors", _labels_first_best_only, "tie", "not only the first one"),
    ("sample", _sample_first_ones, "4 positives", "random"),
    ("smooth_l1", lambda x, t, b: solutions.smooth_l1(x, t, b) / x.numel(), "small differences", "quadratic"),
    ("rpn_loss", _rpn_loss_masked_by_product, "inf targets", "0 * inf"),
    ("clip_boxes", lambda b, size: solutions.clip_boxes(b, size[::-1]), "wide image", "(height, width)"),
    ("nms", _nms_all_pairs, "chain", "only KEPT boxes"),
    ("nms", _nms_at_or_above, "exactly at the threshold", "strictly above"),
    ("roi_pool_bin", _roi_pool_torch_round, "x.5", "halves away from zero"),
    ("bilinear", _bilinear_unclamped, "last row", "no neighbour"),
    ("proposal_labels", _proposal_labels_ones, "classes 2 and 1", "CLASS"),
    ("proposal_labels", _proposal_labels_no_bg_low, "lower background threshold", "ignored"),
    ("fast_rcnn_loss", _fast_rcnn_loss_over_foreground, "divisor", "ALL RoIs"),
    ("fast_rcnn_loss", lambda c, b, lab, t: solutions.fast_rcnn_loss(c, b[:, :4].repeat(1, c.shape[1]), lab, t),
     "class 1", "OWN class"),
    # Dividing by the positives: 0 / 0 on the first case already, whose hint says so.
    ("rpn_loss", _rpn_over_positives, "negatives only", "not NaN"),
    ("rpn_loss", lambda o, d, lab, t: _rpn_over_positives(o, d, lab.clamp(max=1), t) if (lab == 1).any()
     else solutions.rpn_loss(o, d, lab, t), "divisor", "SAMPLED"),
    *FPN_MISTAKES,  # notebook 10's, defined with their helpers in tests/test_fpn.py
]


@pytest.mark.parametrize(("name", "fn", "case", "hint"), MISTAKES, ids=[f"{m[0]}-{m[2]}" for m in MISTAKES])
def test_typical_mistake_fails_with_its_hint(name, fn, case, hint):
    result = run(exercise(name), fn, quiet=True)
    assert result.status == FAIL, result.message
    assert case in result.case, result.message
    assert "hint: wrong, because" in result.message and hint in result.message


def test_errors_and_wrong_types_are_reported_with_the_case(capsys):
    def broken(boxes1, boxes2):
        raise ValueError("oops")

    result = check.iou(broken)
    assert result.status == FAIL and "it raised ValueError: oops" in capsys.readouterr().out
    assert "hidden case 1" in result.message and "inputs:" in result.message
    assert check.iou(lambda a, b: a.tolist(), quiet=True).status == FAIL
    assert "shape" in check.iou(lambda a, b: torch.zeros(1), quiet=True).message
    assert "pass the function itself" in check.iou(42, quiet=True).message
    with pytest.raises(AttributeError, match="the exercises are: .*iou"):
        check.no_such_exercise  # noqa: B018
    assert set(EXERCISE_IDS) <= set(dir(check))


def test_checks_leave_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert check.rpn_loss(solutions.rpn_loss, quiet=True)
    assert check.sample(_sample_first_ones, quiet=True).status == FAIL  # draws nothing itself
    torch.testing.assert_close(torch.rand(3), expected)
