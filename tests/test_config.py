import pytest

from mmft.config import ConfigError, load_config, parse_overrides


def test_defaults_and_yaml_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n  steps: 5\nlora:\n  image:\n    rank: 4\n")
    cfg = load_config(path)
    assert cfg.train.lr == 0.001 and cfg.train.steps == 5
    assert cfg.lora.image.rank == 4 and cfg.lora.text.rank == 8  # untouched tower keeps its default


def test_dotted_overrides_win_over_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=1e-4", "data.train=[a.tar, b.tar]", "lora.text.enabled=false"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.train == ["a.tar", "b.tar"]
    assert cfg.lora.text.enabled is False


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["train.lr=1"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


@pytest.mark.parametrize("override, key", [
    (["train.lrr=1e-4"], "train.lrr"),
    (["trian.lr=1e-4"], "trian"),
    (["lora.image.rnak=4"], "lora.image.rnak"),
])
def test_unknown_key_is_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, override)


def test_unknown_key_in_yaml_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match="data.batchsize"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    (["train.steps=many"], "train.steps"),
    (["train.lr=[1, 2]"], "train.lr"),
    (["data.train=a.tar"], "data.train"),
    (["train.resume=3"], "train.resume"),
])
def test_wrong_type_is_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.lr"])


def test_shipped_configs_load():
    from pathlib import Path

    from mmft.serve.config import load_serve_config

    root = Path(__file__).parent.parent
    configs = sorted([*(root / "configs").glob("*.yaml"), *(root / "mmft/demo/configs").glob("*.yaml")])
    serve = [p for p in configs if p.name.startswith("serve")]
    assert serve, "configs/serve.yaml is missing"
    for path in serve:  # the service's own schema (base model + tenants), not a run config
        load_serve_config(path)
    for path in sorted(set(configs) - set(serve)):
        load_config(path)


def test_eval_factory_of_earlier_configs_becomes_index_factory(caplog):
    import dataclasses

    from mmft.config import Config, config_from_dict

    old_run = dataclasses.asdict(Config())
    old_run["eval"]["factory"] = "Flat"  # what every run directory of earlier versions saved
    assert config_from_dict(old_run).index.factory == ""  # the old default: an empty factory picks Flat
    with caplog.at_level("WARNING", logger="mmft.config"):
        cfg = load_config(None, ["eval.factory=IVF4,Flat"])
    assert cfg.index.factory == "IVF4,Flat" and "'index.factory'" in caplog.text
    assert load_config(None, ["eval.factory=HNSW32", "index.factory=HNSW32"]).index.factory == "HNSW32"
    with pytest.raises(ConfigError, match="keep one value under index.factory"):
        load_config(None, ["eval.factory=IVF4,Flat", "index.factory=HNSW32"])
    with pytest.raises(ConfigError, match="unknown config key 'eval.nprobe'"):
        load_config(None, ["eval.nprobe=4"])


def test_shipped_eval_suites_load_and_search_with_the_index_section():
    from pathlib import Path

    import yaml

    suites = sorted((Path(__file__).parent.parent / "eval").glob("*.yaml"))
    assert suites
    for path in suites:
        assert "factory" not in yaml.safe_load(path.read_text())["eval"], path
        assert load_config(path).eval.domain, path
