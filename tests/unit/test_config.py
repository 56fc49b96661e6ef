import dataclasses

import pytest

from hmn.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    describe,
    load_config,
)


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg == RunConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_presets_load():
    import glob

    presets = sorted(glob.glob("configs/*.yaml"))
    assert {"configs/fb2m.yaml", "configs/fb5m.yaml", "configs/fb2m-synthetic.yaml",
            "configs/fb5m-synthetic.yaml", "configs/smoke.yaml", "configs/sq32k.yaml"} <= set(presets)
    for preset in presets:
        cfg = load_config(preset)
        assert cfg.name in preset


def test_fb_scale_presets_keep_the_memory_factorised_and_the_union_small():
    for preset, facts in (("configs/fb2m-synthetic.yaml", 10_800_000), ("configs/fb5m-synthetic.yaml", 12_000_000)):
        cfg = load_config(preset)
        assert cfg.synthetic.facts == facts
        assert cfg.memory.layout == "factorised"
        assert len(cfg.memory.branching) >= 2  # leaves of a hierarchical index
        leaves = 1
        for b in cfg.memory.branching:
            leaves *= b
        per_question = cfg.reader.top_clusters * facts / leaves
        assert cfg.train.batch_size * per_question < 0.15 * facts  # on average leaves
        # k-means' leaves are uneven (FB2M: up to 12.8k facts against a mean of 331); the cap
        # bounds what a batch can read even when every question lands in the biggest leaves
        assert 0 < cfg.memory.max_leaf_size <= 2 * facts / leaves
        worst = cfg.train.batch_size * cfg.reader.top_clusters * cfg.memory.max_leaf_size
        assert worst < 0.25 * facts


def test_overrides_are_converted_by_type():
    cfg = load_config(None, ["reader.k=3", "memory.branching=8,4", "train.use_gpu=true",
                             "train.lr=0.5", "eval.readers=[exact]"])
    assert cfg.reader.k == 3
    assert cfg.memory.branching == (8, 4)
    assert cfg.train.use_gpu is True
    assert cfg.train.lr == 0.5
    assert cfg.eval.readers == ("exact",)


@pytest.mark.parametrize("override, message", [
    ("reader.k=0", "reader.k=0: must be > 0"),
    ("reader.k=abc", "reader.k='abc': expected an integer"),
    ("train.nonsense=1", "unknown key 'train.nonsense'"),
    ("nonsense.k=1", "unknown key 'nonsense'"),
    ("memory.U=1.5", "memory.U=1.5: must be in (0, 1)"),
    ("train.loss=mse", "train.loss='mse'"),
    ("train.use_gpu=maybe", "train.use_gpu='maybe': expected true or false"),
    ("eval.readers=[pca]", "eval.readers"),
    ("reader.top_clusters=1000", "reader.top_clusters=1000: more than the 32 leaves"),
    ("data.source=web", "data.source='web': must be one of synthetic, files, scaling"),
    ("scaling.size=5k", "scaling.size='5k': unknown; known: 29k, 131k, 1m, 3m, 10m"),
    ("scaling.facts=-1", "scaling.facts=-1: must be >= 0"),
    ("scaling.homonym_p=0", "scaling.homonym_p=0.0: must be in (0, 1]"),
])
def test_errors_name_the_field_and_value(override, message):
    overrides = [override]
    if override.startswith("reader.top_clusters"):
        overrides.append("train.reader=clustered")
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_files_source_needs_files():
    with pytest.raises(ConfigError, match="data.facts"):
        load_config(None, ["data.source=files"])


def test_scaling_spec_is_the_scaling_section():
    from hmn.scaling import ScalingSpec

    cfg = load_config("configs/sq-scaling.yaml", ["scaling.size=1m", "scaling.facts=5000",
                                                  "scaling.homonym_share=0.2"])
    assert cfg.data.source == "scaling"
    spec = ScalingSpec.from_config(cfg.scaling)
    assert dataclasses.asdict(spec) == dataclasses.asdict(cfg.scaling)
    assert spec.target_facts() == 5000 and spec.with_fb15k()
    assert ScalingSpec(size="29k").target_facts() is None and not ScalingSpec(size="29k").with_fb15k()
    assert ScalingSpec(size="3m").target_facts() == 3_000_000


def test_describe_lists_every_field():
    lines = describe()
    assert any(line.startswith("train.batch_size = 128") for line in lines)
    assert any(line.startswith("memory.U = 0.75") for line in lines)


def test_smoke_preset_is_the_embedded_default():
    assert load_config("configs/smoke.yaml") == load_config()


def test_inference_spends_the_training_read_budget_on_top_clusters():
    cfg = load_config(None, ["reader.top_clusters=3", "reader.sample_clusters=2", "reader.rand_blocks=1"])
    assert cfg.reader.params("clustered", training=True)["top_clusters"] == 3
    infer = cfg.reader.params("clustered", training=False)
    assert infer["top_clusters"] == 6 and infer["sample_clusters"] == 0 and infer["rand_blocks"] == 0


def test_stable_fields_count_in_the_fingerprint_only_off_their_default():
    from hmn.config import MemoryConfig, config_to_dict, fingerprint

    cfg = MemoryConfig()
    plain = {**config_to_dict(cfg), **MemoryConfig.RETIRED}
    assert plain["max_leaf_size"] == 0
    stable = {f.name for f in dataclasses.fields(MemoryConfig) if f.metadata.get("stable")}
    assert {"max_leaf_size", "use_gpu", "gpus_per_shard"} <= stable
    without = {k: v for k, v in plain.items() if k not in stable}
    # a run made before the fields existed keeps its fingerprint (and its finished stages)
    assert fingerprint("memory", cfg, "up") == fingerprint("memory", without, "up")
    changed = dataclasses.replace(cfg, max_leaf_size=1000)
    assert fingerprint("memory", changed, "up") != fingerprint("memory", cfg, "up")
    assert fingerprint("memory", changed, "up") == fingerprint(
        "memory", {**without, "max_leaf_size": 1000}, "up")
    # fields not marked stable always count
    assert fingerprint("memory", dataclasses.replace(cfg, seed=0), "up") != fingerprint(
        "memory", {k: v for k, v in plain.items() if k != "seed"}, "up")


def test_retired_field_accepts_its_value_rejects_others_and_keeps_fingerprints():
    from hmn.config import MemoryConfig, config_to_dict, fingerprint

    assert load_config(overrides=["memory.batched_levels=true"]) == load_config()
    with pytest.raises(ConfigError, match="memory.batched_levels=False: this setting was removed"):
        load_config(overrides=["memory.batched_levels=false"])
    assert "batched_levels" not in config_to_dict(MemoryConfig())
    assert config_to_dict(MemoryConfig(), omit_stable_defaults=True)["batched_levels"] is True
    assert fingerprint(MemoryConfig()) != fingerprint(MemoryConfig(seed=1))


def test_reader_section_is_made_from_the_reader_registry():
    from hmn.config import ReaderConfig
    from hmn.reader_registry import READERS

    names = [f.name for f in dataclasses.fields(ReaderConfig)]
    assert names == ["k", "top_clusters", "sample_clusters", "rand_blocks", "temperature", "scan",
                     "scan_rerank",
                     "pca_depth", "pca_probes", "wta_bands", "wta_perms", "wta_window",
                     "ivf_nlist", "ivf_nprobe", "baseline_seed"]
    described = {line.split(" = ")[0]: line for line in describe() if line.startswith("reader.")}
    assert set(described) == {f"reader.{n}" for n in names}
    assert all(line.split("  # ", 1)[1] for line in described.values())  # every field has help
    cfg = load_config(None, ["reader.pca_depth=6", "reader.baseline_seed=2"])
    assert cfg.reader.params("pca-tree", training=True) == {"depth": 6, "probes": 1, "seed": 2}
    assert cfg.reader.params("faiss-ivf", training=False) == {"nlist": 128, "nprobe": 8, "seed": 2}
    assert cfg.reader.params("exact", training=True) == {}
    # every declared default is the section's default
    for entry in READERS.values():
        assert entry.from_config(ReaderConfig()) == entry.params()


@pytest.mark.parametrize("override, message", [
    ("reader.pca_depth=21", "reader.pca_depth=21: must be in [1, 20]"),
    ("reader.pca_probes=300", "reader.pca_probes=300: must be in [1, 2^pca_depth = 256]"),
    ("reader.wta_window=1", "reader.wta_window=1: must be >= 2"),
    ("reader.wta_perms=40", "reader.wta_perms=40: wta_window ** wta_perms must fit 62 bits"),
    ("reader.ivf_nprobe=200", "reader.ivf_nprobe=200: must be <= reader.ivf_nlist (128)"),
    ("reader.ivf_nlist=0", "reader.ivf_nlist=0: must be > 0"),
    ("reader.temperature=0", "reader.temperature=0.0: must be > 0"),
    ("reader.sample_clusters=-1", "reader.sample_clusters=-1: must be >= 0"),
])
def test_reader_errors_name_the_config_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_config_imports_neither_torch_nor_faiss():
    import subprocess
    import sys

    code = "import sys, hmn.config; print(sorted({'torch', 'faiss'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
