"""hmn.ids: the partitioned window hashing and the NUL check of window_ids (the other ids tests
live in test_formats.py next to the parsers that use them)."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from hmn import ids


def _reference(cols):
    """window_ids by codes + local_unique (no hashing)."""
    codes = np.concatenate([ids.prefixed_mid_codes(c) for c in cols])
    return ids.local_unique(codes)


@pytest.mark.parametrize("partition_min", [1, 64, 1 << 40])
def test_window_ids_partitioned_equals_reference(monkeypatch, partition_min):
    """Partitioned or not, the codes and positions are those of prefixed_mid_codes +
    local_unique: many keys, repeats, every suffix length, several columns, sliced arrays."""
    monkeypatch.setattr(ids, "_PARTITION_MIN", partition_min)
    rng = np.random.default_rng(partition_min % 97)
    chars = np.array(list(ids.MID_CHARS))
    pool = ["".join(rng.choice(chars, int(rng.integers(1, 9)))) for _ in range(3000)]
    cols = []
    for prefix in ids.MID_PREFIXES:
        n = int(rng.integers(2000, 5000))
        col = pa.array([prefix + pool[int(rng.integers(0, len(pool)))] for _ in range(n)])
        cols.append(col.slice(3, n - 10))
    got = ids.window_ids(cols)
    assert got is not None
    uniq, inv = _reference(cols)
    assert got[0].tolist() == uniq.tolist()
    assert [len(g) for g in got[1]] == [len(c) for c in cols]
    assert all(g.dtype == np.int32 for g in got[1])
    assert np.concatenate(got[1]).tolist() == inv.tolist()


@pytest.mark.parametrize("partition_min", [1, 1 << 40])
def test_window_ids_leading_nul_refused_in_any_order(monkeypatch, partition_min):
    """A suffix that begins with a NUL byte has the window of a shorter key: refused, also
    among many clean keys and in the partitioned path."""
    monkeypatch.setattr(ids, "_PARTITION_MIN", partition_min)
    clean = [f"/m/0{i:x}" for i in range(5000)]
    for bad in ("/m/\x00ab", "/m/\x00\x00abc"):
        keys = clean[:2500] + [bad, "/m/ab"] + clean[2500:]
        assert ids.window_ids([pa.array(keys)]) is None
    assert ids.window_ids([pa.array(clean)]) is not None


def test_nul_free():
    assert ids._nul_free(pa.array(["/m/0ab", "/m/0cd"]))
    assert not ids._nul_free(pa.array(["/m/0ab", "/m/\x00cd"]))
    assert ids._nul_free(pa.array([], pa.string()))
    assert ids._nul_free(pa.array(["", ""]))
    # a slice looks only at its own characters
    arr = pa.array(["/m/\x00a", "/m/0b", "/m/0c", "x\x00"])
    assert ids._nul_free(arr.slice(1, 2))
    assert not ids._nul_free(arr.slice(2, 2))
    # a flattened split (the objects column of the fast path)
    flat = pc.list_flatten(pc.split_pattern(pa.array(["/m/0a /m/0b", "/m/0c"]), " "))
    assert ids._nul_free(flat)
