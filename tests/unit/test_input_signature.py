"""Stage fingerprints follow the input files' content, not their mtime."""

import json
import os

from pipeline.run import _input_signature


def test_signature_follows_content_not_mtime(tmp_path):
    cache = tmp_path / "run" / ".input-digests.json"
    a = tmp_path / "kb.txt"
    a.write_text("m.1\tr\tm.2\n")
    first = _input_signature((str(a),), cache)
    assert json.loads(cache.read_text())[os.path.realpath(a)]["digest"] == first[0][2]

    # the same bytes written again later (a fresh copy of shared data): same signature
    os.utime(a, (1_000_000, 1_000_000))
    assert _input_signature((str(a),), cache) == first
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "kb.txt").write_bytes(a.read_bytes())
    assert _input_signature((str(copy / "kb.txt"),), cache)[0][1:] == first[0][1:]

    # other content of the same size (the write changes the mtime): a new digest
    a.write_text("m.1\tr\tm.3\n")
    changed = _input_signature((str(a),), cache)
    assert changed[0][1] == first[0][1] and changed[0][2] != first[0][2]


def test_missing_file_and_no_cache(tmp_path):
    sig = _input_signature((str(tmp_path / "absent.txt"),))
    assert sig == [[os.path.realpath(tmp_path / "absent.txt"), None, None]]
    b = tmp_path / "b.txt"
    b.write_text("x")
    assert _input_signature((str(b),))[0][2] == _input_signature((str(b),))[0][2]
