"""The serve config: strict keys and types, tenants, tokens from the environment, the start-up check."""
from __future__ import annotations

from pathlib import Path

import pytest
from serve_setup import deployment  # noqa: F401  (deployment is a fixture)

from mmft.config import ConfigError
from mmft.serve.config import check_config, load_serve_config, resolve_secret, serve_config_from_dict

TENANT = {"tenants": {"t": {"run": "runs/x", "index": "runs/x/index"}}}


@pytest.mark.parametrize("values,words", [
    ({"batching": {"max_wait": 3}}, "unknown config key 'batching.max_wait'"),
    ({**TENANT, "tenants": {"t": {"run": "r", "index": "i", "indx": "j"}}},
     "unknown config key 'tenants.t.indx'"),
    ({**TENANT, "limits": {"max_k": "ten"}}, "config key 'limits.max_k' expects int"),
    ({"tenants": {"baseline": {"index": "i"}}}, "tenant name 'baseline' is reserved"),
    ({"tenants": {"a b": {"index": "i"}}}, "tenant name 'a b' must be 1-64 letters"),
    ({"tenants": {"t": {"run": "r", "adapter": "a", "index": "i"}}}, "tenant 't' sets both run and adapter"),
    ({"tenants": {"t": {"run": "r"}}}, "tenant 't' has no index: set tenants.t.index"),
    ({}, "the config serves nothing"),
    ({**TENANT, "limits": {"max_k": 0}}, "'limits.max_k' must be positive, got 0"),
    ({**TENANT, "limits": {"default_k": 50, "max_k": 20}}, "limits.default_k=50 is over limits.max_k=20"),
    ({**TENANT, "base": {"backend": "tensorflow"}},
     "base.backend='tensorflow' is not one of 'torch', 'onnx'"),
])
def test_bad_configs_are_refused_by_name(values, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        serve_config_from_dict(values)


def test_yaml_overrides_and_the_demo_config(tmp_path, monkeypatch):
    cfg = load_serve_config("configs/serve.yaml", ["tenants.tuned.lora_scale=0.5", "server.workers=2"])
    assert cfg.tenants["tuned"].lora_scale == 0.5 and cfg.server.workers == 2
    assert cfg.tenants["tuned"].index == "runs/demo/index"
    assert cfg.baseline.index == "runs/demo/index-baseline"
    first = Path("configs/serve.yaml").read_text().splitlines()[0]
    assert first.startswith("# mmft serve --config configs/serve.yaml")
    with pytest.raises(ConfigError, match="serve config file 'nowhere.yaml' does not exist"):
        load_serve_config("nowhere.yaml")
    monkeypatch.setenv("MMFT_TEST_TOKEN", "s3cret")
    assert resolve_secret("env:MMFT_TEST_TOKEN", "x") == "s3cret" and resolve_secret("plain", "x") == "plain"
    monkeypatch.delenv("MMFT_TEST_TOKEN")
    with pytest.raises(ConfigError, match="tenants.t.token reads the environment variable MMFT_TEST_TOKEN"):
        resolve_secret("env:MMFT_TEST_TOKEN", "tenants.t.token")


def test_demo_prints_the_serve_command():
    from mmft.demo.runner import serve_command

    assert serve_command("runs/demo").endswith("serve --config configs/serve.yaml")
    moved = serve_command("/tmp/my demo")
    assert "'tenants.tuned.index=/tmp/my demo/index'" in moved
    assert "'baseline.index=/tmp/my demo/index-baseline'" in moved


def test_stale_index_is_refused_at_start_up(deployment, capsys):  # noqa: F811
    from mmft.cli import main
    from mmft.index import StaleIndexError

    check_config(serve_config_from_dict(deployment.config()))  # the matching config passes
    swapped = deployment.config()
    swapped["tenants"]["tuned"]["index"] = str(deployment.indexes["other"])
    with pytest.raises(StaleIndexError, match="built with .* but the model is .*adapter differs.*rebuild"):
        check_config(serve_config_from_dict(swapped))
    base_wrong = deployment.config(baseline={"index": str(deployment.indexes["tuned"])})
    with pytest.raises(StaleIndexError, match=r"with no adapter \(or at LoRA scale 0\) .*adapter differs"):
        check_config(serve_config_from_dict(base_wrong))
    scaled = deployment.config()
    scaled["tenants"]["tuned"]["lora_scale"] = 0.5
    with pytest.raises(StaleIndexError, match="the LoRA scale differs"):
        check_config(serve_config_from_dict(scaled))
    path = deployment.root / "stale.yaml"
    import json

    path.write_text(json.dumps(swapped))
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmft serve: error: index in ") and "Traceback" not in err
