"""The record of a notebook beside a committed reference run (notebook 08 and docs/results)."""

import json
from pathlib import Path

import pytest

from rpnlab.lab import records


def test_beside_reference_pairs_a_fresh_record_with_a_committed_run(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"record": {"joint_map_50": 0.8371, "joint_iterations": 5100}}))
    rows = records.beside_reference({"joint_map_50": 0.81234, "other": 1}, path, ["joint_map_50", "joint_iterations"])
    assert rows == [{"figure": "joint_map_50", "this run": 0.812, "reference": 0.837},
                    {"figure": "joint_iterations", "this run": "-", "reference": 5100}]
    assert records.beside_reference({}, "", ["x"]) == [] and records.beside_reference({}, tmp_path / "no.json", ["x"]) == []
    path.write_text("[1, 2]")
    with pytest.raises(TypeError, match="ref.json"):
        records.beside_reference({}, path, ["x"])


def test_the_committed_notebook_08_reference_has_what_08_shows():
    reference = json.loads((Path(__file__).parents[1] / "docs/results/end_to_end_cpu.json").read_text())
    for key in ("joint_map_50", "alternating_map_50", "alternating_minus_joint_map_50", "joint_iterations"):
        assert isinstance(reference["record"][key], (int, float)), key
