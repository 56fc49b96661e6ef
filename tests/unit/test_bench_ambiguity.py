"""benchmarks/ambiguity.py: ties of a gold (subject name, relation) pair and accuracy by ties."""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from ambiguity import split_accuracy, tie_counts  # noqa: E402

from pipeline.artifacts import KnowledgeBase


def _kb():
    # entities 0-1 are both "paris", 2 is "lyon", 3 has no name; relations 0 and 1
    # facts: 0 (0, r0), 1 (1, r0), 2 (1, r1), 3 (2, r0), 4 (3, r0), 5 (0, r0) a second fact of 0
    return KnowledgeBase(
        entity_keys=np.array(["a", "b", "c", "d"], dtype=object),
        entity_names=["paris", "paris", "lyon", None],
        relation_keys=np.array(["r0", "r1"], dtype=object),
        fact_subject=np.array([0, 1, 1, 2, 3, 0]), fact_relation=np.array([0, 0, 1, 0, 0, 0]),
        object_offsets=np.arange(7), object_values=np.zeros(6, dtype=np.int64))


def test_ties_count_distinct_subjects_sharing_the_name_and_relation():
    kb = _kb()
    # fact 0: "paris" with r0 -> subjects 0 and 1 (0's two facts count once); fact 2: only 1
    # has "paris" with r1; fact 3: lyon alone; fact 4: unnamed
    assert tie_counts(kb, np.array([0, 1, 2, 3, 4, 5])).tolist() == [2, 2, 1, 1, 0, 2]


def test_accuracy_splits_by_ties_beside_the_name_only_guess():
    kb = _kb()
    # gold facts 0 (shared), 3 (unique), 4 (unnamed); predictions: the homonym's fact 1 (wrong
    # subject), fact 3 (right), fact 4 (right)
    pred = pa.table({"gold": [0, 3, 4], "pred_exact": [1, 3, 4], "pred_clustered": [5, 3, 0]})
    out = split_accuracy(kb, pred, ["exact", "clustered"])
    assert out["shared"] == {"questions": 1, "name_only_expected_accuracy": 0.5,
                             "accuracy_exact": 0.0, "accuracy_clustered": 1.0}  # fact 5: subject 0, r0
    assert out["unique"]["accuracy_exact"] == 1.0 and out["unique"]["name_only_expected_accuracy"] == 1.0
    assert out["unnamed"]["accuracy_exact"] == 1.0 and out["unnamed"]["accuracy_clustered"] == 0.0
    assert abs(out["all"]["name_only_expected_accuracy"] - 0.5) < 1e-9  # (0.5 + 1 + 0) / 3
    assert abs(out["ceiling_unique_share"] - 1 / 3) < 1e-9
