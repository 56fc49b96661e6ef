"""Unit tests for hmn.scaling (no Ray): a tiny real-format kb and FB15k-237 set in tmp_path."""

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from hmn.formats.coded import parse_grouped_coded
from hmn.scaling import ScalingSpec, Sources, build_memory
from hmn.synthetic import SyntheticSpec, generate
from pipeline.stages.ingest import IngestSources, run_ingest

SHARED = Path(__file__).parents[3] / "shared/data"
PREFIX = "www.freebase.com"
FACTS = 6000  # in all: about 700 real facts, the rest distractors


def _grouped(path: Path) -> dict[tuple[str, str], list[str]]:
    """(subject, relation) -> objects of a grouped file, lines of one pair merged in order."""
    facts: dict[tuple[str, str], list[str]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        s, r, o = line.split("\t")
        facts[(s, r)] += o.split(" ")
    return facts


def _names(path: Path) -> dict[str, str]:
    return dict(line.split("\t") for line in path.read_text(encoding="utf-8").splitlines())


def make_real_data(root: Path) -> Path:
    """``root/simplequestions/`` from one synthetic KB (400 facts, 150 train and 100 dev
    questions), ``root/fb15k-237/`` (``/m/`` triples) from another (300 facts; their random mids
    may coincide: shared entities)."""
    sq = root / "simplequestions"
    spec = SyntheticSpec(entities=400, relations=25, facts=400, train_questions=150,
                         dev_questions=100, test_questions=0, seed=1)  # fmt: skip
    generate(spec, str(sq))
    fb_src = root / "fb_src"
    generate(SyntheticSpec(entities=300, relations=15, facts=300, train_questions=0,
                           dev_questions=0, test_questions=0, seed=2), str(fb_src))  # fmt: skip
    fb = root / "fb15k-237"
    fb.mkdir()
    fb_facts = _grouped(fb_src / "kb.txt")
    triples = [f"{s[16:]}\t{r[16:]}\t{o[16:]}" for (s, r), objs in fb_facts.items() for o in objs]
    for name, part in (("train", triples[::3]), ("valid", triples[1::3]), ("test", triples[2::3])):
        (fb / f"{name}.txt").write_text("".join(t + "\n" for t in part), encoding="utf-8")
    (fb / "names.tsv").write_text(
        "".join(f"{k[16:]}\t{v}\n" for k, v in _names(fb_src / "names.tsv").items()), "utf-8"
    )
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_real_data(tmp_path_factory.mktemp("scaling_data"))


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling_out") / "memory"
    realism = build_memory(ScalingSpec(size="1m", facts=FACTS, seed=5),
                           Sources.from_data_dir(str(data)), str(out))  # fmt: skip
    return out, realism


def _fb15k_grouped(data: Path) -> dict[tuple[str, str], list[str]]:
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for split in ("train", "valid", "test"):
        for line in (data / f"fb15k-237/{split}.txt").read_text().splitlines():
            h, r, t = line.split("\t")
            grouped[(PREFIX + h, PREFIX + r)].append(PREFIX + t)
    return grouped


def test_every_real_fact_present_unchanged(data, built):
    out, realism = built
    memory = _grouped(out / "kb.txt")
    kb = _grouped(data / "simplequestions/kb.txt")
    fb = _fb15k_grouped(data)
    assert len(memory) == FACTS
    for pair, objs in kb.items():
        assert memory[pair] == objs
    for pair, objs in fb.items():  # a pair kb.txt has keeps kb.txt's objects
        assert sorted(memory[pair]) == sorted(kb.get(pair, objs))
    real_subjects = {s for s, _ in kb} | {s for s, _ in fb}
    distractor = [p for p in memory if p not in kb and p not in fb]
    assert len(distractor) == FACTS - len(set(kb) | set(fb))
    assert all(s.startswith(f"{PREFIX}/m/0a") and s not in real_subjects for s, _ in distractor)
    assert realism["counts"]["real_facts_present"] == len(set(kb) | set(fb))
    assert (out / "questions_dev.txt").read_bytes() == (
        data / "simplequestions/questions_dev.txt"
    ).read_bytes()


def test_homonyms_share_names_and_relations(data, built):
    """Measured from the files: share of real kb subjects whose exact name a distractor entity
    has, and of those, the share with a distractor namesake holding one of their relations."""
    out, realism = built
    names = _names(out / "names.tsv")
    kb = _grouped(data / "simplequestions/kb.txt")
    rels = defaultdict(set)
    for s, r in kb:
        rels[s].add(r)
    distractor_rels = defaultdict(set)  # name -> relations of distractor subjects so named
    for s, r in _grouped(out / "kb.txt"):
        if s.startswith(f"{PREFIX}/m/0a"):
            distractor_rels[names[s]].add(r)
    distractor_names = {v for k, v in names.items() if k.startswith(f"{PREFIX}/m/0a")}
    shared = [s for s in rels if names.get(s) in distractor_names]
    same = [s for s in shared if rels[s] & distractor_rels[names[s]]]
    assert len(shared) / len(rels) >= 0.30
    assert len(same) / len(shared) >= 0.5
    assert realism["homonyms"]["shared_with_distractor"] == len(shared)
    assert realism["homonyms"]["with_same_relation_fact"] == len(same)


def test_distractor_relations_follow_the_real_ones(data, built):
    """Total variation between the distractor and real relation distributions. Bound 0.1: with
    R relations and n distractor subjects drawn independently, the expected multinomial noise is
    at most 0.5 * sqrt(R) * sqrt(2 / (pi n)) (about 0.06 here: R = 40, n ~ 1,500), and drawing
    relations uniformly instead is far above it (checked)."""
    out, realism = built
    memory = _grouped(out / "kb.txt")
    real = set(_grouped(data / "simplequestions/kb.txt")) | set(_fb15k_grouped(data))
    real_counts = Counter(r for _, r in real)
    dis_counts = Counter(r for p in memory if p not in real for r in [p[1]])
    assert set(dis_counts) <= set(real_counts)
    rels = sorted(real_counts)
    p = np.array([real_counts[r] for r in rels], dtype=float)
    q = np.array([dis_counts[r] for r in rels], dtype=float)
    tvd = 0.5 * np.abs(p / p.sum() - q / q.sum()).sum()
    uniform = 0.5 * np.abs(p / p.sum() - 1 / len(rels)).sum()
    assert tvd < 0.1 < uniform
    assert realism["relations"]["total_variation_vs_real"] == pytest.approx(tvd, abs=1e-5)


def test_same_seed_same_bytes(data, built, tmp_path):
    out, _ = built
    src = Sources.from_data_dir(str(data))
    build_memory(ScalingSpec(size="1m", facts=FACTS, seed=5), src, str(tmp_path / "again"))
    for name in ("kb.txt", "names.tsv", "realism.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    build_memory(ScalingSpec(size="1m", facts=FACTS, seed=6), src, str(tmp_path / "other"))
    assert (tmp_path / "other/kb.txt").read_bytes() != (out / "kb.txt").read_bytes()


def test_real_facts_alone_without_fb15k(data, tmp_path):
    realism = build_memory(ScalingSpec(size="29k"), Sources.from_data_dir(str(data)),
                           str(tmp_path))  # fmt: skip
    assert (tmp_path / "kb.txt").read_bytes() == (data / "simplequestions/kb.txt").read_bytes()
    assert (tmp_path / "names.tsv").read_bytes() == (
        data / "simplequestions/names.tsv"
    ).read_bytes()
    assert realism["counts"]["distractor_facts"] == 0
    assert 0 < realism["ambiguity_ceiling"]["share"] <= 1


def test_too_small_for_the_namesakes_raises(data, tmp_path):
    with pytest.raises(ValueError, match="namesakes"):
        build_memory(ScalingSpec(size="1m", facts=720), Sources.from_data_dir(str(data)),
                     str(tmp_path))  # fmt: skip


def test_memory_ingests_on_the_fast_path(built, tmp_path):
    out, realism = built
    distractor_lines = [line for line in (out / "kb.txt").read_bytes().splitlines(keepends=True)
                        if line.startswith(f"{PREFIX}/m/0a".encode())]  # fmt: skip
    assert parse_grouped_coded(b"".join(distractor_lines), "kb.txt") is not None
    stats = run_ingest(
        IngestSources(facts=[str(out / "kb.txt")], names=[str(out / "names.tsv")],
                      questions={"train": [str(out / "questions_train.txt")],
                                 "dev": [str(out / "questions_dev.txt")]}),
        str(tmp_path / "ingest"),
    )  # fmt: skip
    totals = stats["totals"]
    assert totals["facts"] == FACTS and totals["rejected"] == 0
    assert totals["entities"] == realism["counts"]["entities"]


@pytest.mark.skipif(not (SHARED / "simplequestions/kb.txt").is_file(),
                    reason="needs ../shared/data")  # fmt: skip
def test_131k_counts_on_the_shared_data(tmp_path):
    realism = build_memory(ScalingSpec(size="131k"), Sources.from_data_dir(str(SHARED)),
                           str(tmp_path))  # fmt: skip
    counts = realism["counts"]
    assert counts["kb_facts"] == 29_423 and counts["fb15k_facts"] == 102_188
    assert counts["real_facts_present"] == counts["facts"] == 29_423 + 102_188 - counts[
        "fb15k_pairs_in_kb"]
    kb_lines = (SHARED / "simplequestions/kb.txt").read_bytes()
    assert (tmp_path / "kb.txt").read_bytes().startswith(kb_lines)
    memory = _grouped(tmp_path / "kb.txt")
    assert len(memory) == counts["facts"]
    assert {(s, r) for s, r in memory if s.startswith(f"{PREFIX}/m/")} == set(memory)
