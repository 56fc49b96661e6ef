"""Unit tests for pipeline.evaluate (the batch-evaluation CLI) that need no trained run or Ray."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from pipeline.evaluate import gold_facts


def test_gold_facts_counts_unknown_subjects_relations_and_pairs_apart():
    # facts 0: (/m/01, /r/b), 1: (/m/02, /r/a), 2: (/m/03, /r/b), fact ids not in pair order
    kb = SimpleNamespace(
        entity_keys=np.array(["/m/01", "/m/02", "/m/03"], dtype=object),
        relation_keys=np.array(["/r/a", "/r/b"], dtype=object),
        fact_subject=np.array([2, 1, 0]), fact_relation=np.array([1, 0, 1]),
    )
    table = pa.table({
        "subject": ["/m/03", "/m/01", "/m/02", "/m/09", "/m/02", "/m/09", "/m/01"],
        "relation": ["/r/b", "/r/a", "/r/b", "/r/a", "/r/z", "/r/z", "/r/b"],
        "question": ["a", "b", "c", "d", "e", "f", "g"],
    })  # fmt: skip
    gold, texts, counts = gold_facts(kb, table)
    assert gold.tolist() == [0, -1, -1, -1, -1, -1, 2]
    assert texts == ["a", "b", "c", "d", "e", "f", "g"]
    # rows 1 and 2: both keys known, the pair is not a fact; row 5: both unknown
    assert counts == {"unknown_subject": 2, "unknown_relation": 2, "unknown_fact": 2}
    _, _, none = gold_facts(kb, None)
    assert none == {"unknown_subject": 0, "unknown_relation": 0, "unknown_fact": 0}
