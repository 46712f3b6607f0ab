"""The CLI in-process: each verb is one library call, errors are one sentence."""
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_VIT

from mmft.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DEMO_CONFIGS = ROOT / "mmft" / "demo" / "configs"


def test_vit_b32_config_stops_at_once_offline(tmp_path, capsys):
    rc = main(["train", "--config", str(CONFIGS / "vit_b32_laion.yaml"), f"train.output_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no network" in err and "local checkpoint file" in err and "Traceback" not in err


def test_unknown_override_is_one_sentence(tmp_path, capsys):
    rc = main(["train", "--config", str(DEMO_CONFIGS / "domain_lora.yaml"), "train.lrr=1"])
    assert rc == 2 and "unknown config key 'train.lrr'" in capsys.readouterr().err


def _tiny_run(tmp_path) -> Path:
    """A real (tiny) training run through `mmft train`, on shards written by `mmft shards`."""

    from conftest import make_pairs

    src = tmp_path / "images"
    src.mkdir()
    for i, (img, caption, _) in enumerate(make_pairs(48)):
        img.save(src / f"{i:03d}.png")
        (src / f"{i:03d}.txt").write_text(caption + "\n")
    assert main(["shards", str(src), str(tmp_path / "shards"), "--splits", "train=0.75,test=0.25",
                 "--quiet"]) == 0
    torch.manual_seed(0)
    from mmft.config import ModelConfig
    from mmft.model.factory import create_model

    base = create_model(ModelConfig(name="tiny-vit", model_cfg=TINY_VIT))[0]
    torch.save(base.state_dict(), tmp_path / "base.pt")
    cfg = {"model": {"name": "tiny-vit", "model_cfg": TINY_VIT, "pretrained": str(tmp_path / "base.pt")},
           "data": {"train": [str(tmp_path / "shards" / "train-*.tar")], "batch_size": 8, "num_workers": 0},
           "train": {"output_dir": str(tmp_path / "run"), "steps": 4, "loss_impl": "chunked"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    return tmp_path / "run"


def test_train_export_index_query(tmp_path, capsys):
    run = _tiny_run(tmp_path)
    assert (run / "adapter-last" / "adapter_model.safetensors").is_file()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp" / "tiny.pt"),
                 "--lora-scale", "0.5"]) == 0
    assert (tmp_path / "exp" / "tiny.pt").is_file() and (tmp_path / "exp" / "tiny.json").is_file()
    test_shards = str(tmp_path / "shards" / "test-*.tar")
    assert main(["index", "build", "--run", str(run), "--shards", test_shards,
                 "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["index", "query", str(tmp_path / "idx"), "a red square", "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "a red square" and len(out) == 4  # the query, then three hits
    # an index built at another LoRA scale is refused for this run's model
    assert main(["index", "build", "--run", str(run), "--shards", test_shards,
                 "--out", str(tmp_path / "idx0"), "--lora-scale", "0.0"]) == 0
    from mmft.index.core import load_index
    from mmft.model.adapter import load_model

    with pytest.raises(Exception, match="LoRA scale|scale"):
        load_index(tmp_path / "idx0", model=load_model(run).model)

    # one config reaches embed and merge too: the scale, the loader and the factory come from it
    parts = tmp_path / "parts"
    assert main(["embed", "--run", str(run), "--shards", test_shards, "--out", str(parts), "--config",
                 str(tmp_path / "run.yaml"), "index.lora_scale=0.0"]) == 0
    assert yaml.safe_load((parts / "parts.json").read_text())["lora_scale"] == 0.0
    assert main(["index", "merge", str(parts), "--out", str(tmp_path / "merged"),
                 "index.factory=HNSW32"]) == 0
    merged = load_index(tmp_path / "merged")
    assert merged.manifest["factory"] == "HNSW32" and merged.manifest["adapter_sha256"] is None  # scale 0
    assert sorted(merged.ids.tolist()) == sorted(load_index(tmp_path / "idx0").ids.tolist())


def test_every_stage_verb_takes_config_and_overrides(tmp_path):
    from mmft.cli import parse_args

    verbs = [["train"], ["eval", "--run", "R"], ["index", "build", "--run", "R", "--shards", "a.tar"],
             ["index", "query", "IX", "a query"], ["index", "merge", "P", "--out", "X"],
             ["embed", "--run", "R", "--shards", "a.tar", "--out", "P"],
             ["export", "--run", "R", "--out", "m.pt"]]
    for verb in verbs:
        args = parse_args([*verb, "--config", "c.yaml", "index.nprobe=3", "data.batch_size=4"])
        assert args.config == "c.yaml" and args.overrides == ["index.nprobe=3", "data.batch_size=4"], verb
    # argparse gives the first override to --shards, the second stands after an option: both are config
    args = parse_args(["index", "build", "--run", "R", "--shards", "a.tar", "b/x=1.tar", "index.factory=Flat",
                       "--out", "X", "index.nprobe=2"])
    assert args.shards == ["a.tar", "b/x=1.tar"]
    assert args.overrides == ["index.factory=Flat", "index.nprobe=2"]
    args = parse_args(["index", "query", "IX", "a red.square=1 query", "index.nprobe=2"])
    assert args.query == ["a red.square=1 query"] and args.overrides == ["index.nprobe=2"]
    with pytest.raises(SystemExit):
        parse_args(["index", "merge", "P", "--out", "X", "stray"])
