"""Unit tests for hmn.embedding_files (no Ray)."""

import gzip

import numpy as np
import pytest

from hmn.embedding_files import align_embeddings, detect_embedding_format, read_embeddings
from hmn.formats.parsed import FormatError

VEC = np.array([[0.5, -1.0, 2.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
KEYS = ["/m/01", "/m/02", "/a/b"]


def _openke(tmp_path, ids_text: str, matrix: np.ndarray, prefix: str = "entity"):
    ids = tmp_path / f"{prefix}2id.txt"
    ids.write_text(ids_text)
    vec = tmp_path / f"{prefix}2vec.bin"
    np.asarray(matrix, dtype="<f4").tofile(vec)
    return str(vec), str(ids)


def test_text_with_header_gzip(tmp_path):
    path = tmp_path / "e.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("3 3\nwww.freebase.com/m/01\t0.5 -1 2\nm.02 1 2 3\n/a/b 4 5 6\n")
    keys, vec = read_embeddings(str(path), expected_dim=3)
    assert keys == KEYS
    np.testing.assert_array_equal(vec, VEC)


def test_npy_with_key_list(tmp_path):
    np.save(tmp_path / "e.npy", VEC.astype(np.float64))
    (tmp_path / "keys.txt").write_text("www.freebase.com/m/01\nm.02\n/a/b\n")
    keys, vec = read_embeddings(str(tmp_path / "e.npy"), keys_path=str(tmp_path / "keys.txt"))
    assert keys == KEYS and vec.dtype == np.float32
    np.testing.assert_array_equal(vec, VEC)


def test_openke_binary(tmp_path):
    # ids out of file order: row i of the matrix belongs to the key with id i
    vec, ids = _openke(tmp_path, "3\n/a/b\t2\nm.01\t0\n/m/02\t1\n", VEC)
    assert detect_embedding_format(vec) == "openke"
    keys, got = read_embeddings(vec, expected_dim=3)  # entity2id.txt found beside
    assert keys == ["/m/01", "/m/02", "/a/b"]
    np.testing.assert_array_equal(got, VEC)
    keys2, _ = read_embeddings(vec, "openke", keys_path=ids)
    assert keys2 == keys


@pytest.mark.parametrize(
    "ids_text, matrix, dim, where, message",
    [
        ("3\n/m/01\t0\n/m/02\t1\n/a/b\t2\n", VEC, 4, "entity2vec.bin", "expected 4"),
        ("3\n/m/01\t0\n/m/02\t1\n/a/b\t2\n", VEC[:, :2].reshape(-1)[:5], None, "entity2vec.bin",
         "do not split into 3 rows"),
        ("3\n/m/01\t0\n/m/02\t1\n/a/b\t2\n", np.where(VEC == 5, np.nan, VEC), None,
         "entity2vec.bin", "row 2: non-finite"),
        ("3\n/m/01\t0\nm.01\t1\n/a/b\t2\n", VEC, None, "entity2id.txt:3",
         "duplicate key '/m/01' (first seen on line 2)"),
        ("4\n/m/01\t0\n/m/02\t1\n/a/b\t2\n", VEC, None, "entity2id.txt:1", "announces 4"),
        ("3\n/m/01\t0\n/m/02\t0\n/a/b\t2\n", VEC, None, "entity2id.txt:3", "id 0 is used 2"),
        ("3\n/m/01\t0\n/m/02\tx\n/a/b\t2\n", VEC, None, "entity2id.txt:3", "not an integer"),
        ("3\n/m/01\t0\nbad\t1\n/a/b\t2\n", VEC, None, "entity2id.txt:3", "invalid key 'bad'"),
        ("3\n/m/01\t0\nbad key\t1\n/a/b\t2\n", VEC, None, "entity2id.txt:3", "expected 'key<TAB>id'"),
        ("x\n", VEC, None, "entity2id.txt:1", "entry count"),
    ],
)  # fmt: skip
def test_openke_errors(tmp_path, ids_text, matrix, dim, where, message):
    vec, _ = _openke(tmp_path, ids_text, matrix)
    with pytest.raises(FormatError) as err:
        read_embeddings(vec, expected_dim=dim)
    assert where in str(err.value) and message in str(err.value)


def test_npy_errors(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("/m/01\n/m/02\n/m/01\n")
    np.save(tmp_path / "e.npy", VEC)
    with pytest.raises(FormatError, match=r"keys.txt:3: duplicate key '/m/01'"):
        read_embeddings(str(tmp_path / "e.npy"), keys_path=str(keys))
    keys.write_text("/m/01\n/m/02\n")
    with pytest.raises(FormatError, match="2 keys for the 3 rows"):
        read_embeddings(str(tmp_path / "e.npy"), keys_path=str(keys))
    keys.write_text("/m/01\n/m/02\n/m/03\n")
    with pytest.raises(FormatError, match="dimension 3 != expected dimension 2"):
        read_embeddings(str(tmp_path / "e.npy"), keys_path=str(keys), expected_dim=2)
    np.save(tmp_path / "inf.npy", np.where(VEC == 2, np.inf, VEC))
    with pytest.raises(FormatError, match=r"inf.npy: row 0: non-finite value inf in column 3"):
        read_embeddings(str(tmp_path / "inf.npy"), keys_path=str(keys))
    with pytest.raises(ValueError, match="needs keys_path"):
        read_embeddings(str(tmp_path / "e.npy"))
    with pytest.raises(ValueError, match="fmt='csv'"):
        read_embeddings(str(tmp_path / "e.npy"), "csv")


def test_text_errors_name_file_and_line(tmp_path):
    path = tmp_path / "e.txt"
    path.write_text("/m/01 1 2\n/m/02 1 2 3\n")
    with pytest.raises(FormatError, match=r"e.txt:2: expected 2 values"):
        read_embeddings(str(path))


def test_align_fail_and_init():
    kb = ["/a/b", "/m/01", "/m/09", "/m/08"]
    with pytest.raises(ValueError) as err:
        align_embeddings(kb, KEYS, VEC, source="e.txt")
    assert "e.txt: 2 of 4 entity keys" in str(err.value) and "/m/09, /m/08" in str(err.value)
    aligned, missing = align_embeddings(kb, KEYS, VEC, policy="init", seed=3, source="e.txt")
    assert missing == 2 and aligned.shape == (4, 3) and aligned.dtype == np.float32
    np.testing.assert_array_equal(aligned[0], VEC[2])
    np.testing.assert_array_equal(aligned[1], VEC[0])
    bound = 6 / np.sqrt(3)
    assert np.all(np.abs(aligned[2:]) <= bound)
    again, _ = align_embeddings(kb, KEYS, VEC, policy="init", seed=3)
    np.testing.assert_array_equal(aligned, again)  # seeded
    full, missing = align_embeddings(KEYS[::-1], KEYS, VEC)
    assert missing == 0
    np.testing.assert_array_equal(full, VEC[::-1])
    with pytest.raises(ValueError, match="policy='zero'"):
        align_embeddings(kb, KEYS, VEC, policy="zero")
