"""mmft from a built wheel, outside the checkout: the package data and the imports a user gets.

Tests elsewhere import mmft from the checkout, where the demo configs and every subpackage are on disk
whether or not the wheel would carry them. Here the project is built into a wheel from a copy of its
sources, installed into a folder of its own, and run from an unrelated directory with only that folder
on PYTHONPATH (the torch stack comes from the current environment): `mmft demo --help`, the demo
configs read as package data, and a few steps of `mmft train` on a tiny random model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_VIT, make_pairs

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

PROBE = """
import json, os, sys
from importlib.resources import files
import mmft
from mmft.config import load_config
configs = files("mmft.demo") / "configs"
names = sorted(p.name for p in configs.iterdir() if p.name.endswith(".yaml"))
for name in names:
    load_config(str(configs / name), [])
print(json.dumps({"file": mmft.__file__, "sys_path": [os.path.abspath(p) for p in sys.path],
                  "configs": str(configs), "names": names}))
"""


def _run(args: list[str], cwd: Path, site: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _pip(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"pip {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(site folder holding the installed wheel, a working directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    shutil.copytree(ROOT / "mmft", src / "mmft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # setuptools from this environment when it has one, so the build needs no index
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _pip(["wheel", str(src), "--no-deps", *isolation, "-w", str(tmp / "wheel")], tmp)
    wheels = list((tmp / "wheel").glob("mmft-*.whl"))
    assert len(wheels) == 1, f"expected one mmft wheel, found {wheels}"
    site = tmp / "site"
    _pip(["install", "--no-deps", "--target", str(site), str(wheels[0])], tmp)
    work = tmp / "work"
    work.mkdir()
    return site, work


def test_imports_and_demo_configs_come_from_the_wheel(installed):
    site, work = installed
    proc = _run(["-c", PROBE], work, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(seen["file"]).resolve().is_relative_to(site.resolve())
    assert Path(seen["configs"]).resolve().is_relative_to(site.resolve())
    checkout = ROOT.resolve()
    on_path = [p for p in seen["sys_path"] if Path(p).resolve() in (checkout, checkout / "mmft")]
    assert not on_path, f"the checkout is on sys.path: {on_path}"
    assert {"align.yaml", "domain_head.yaml", "domain_lora.yaml"} <= set(seen["names"])


def test_demo_help_from_the_wheel(installed):
    site, work = installed
    proc = _run(["-m", "mmft", "demo", "--help"], work, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: mmft demo") and "--quick" in proc.stdout


def test_tiny_train_from_the_wheel(installed):
    site, work = installed
    images = work / "images"
    images.mkdir()
    for i, (img, caption, _) in enumerate(make_pairs(32)):
        img.save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(caption + "\n")
    proc = _run(["-m", "mmft", "shards", "images", "shards", "--splits", "train=1.0", "--quiet"], work, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = {"model": {"name": "tiny-vit", "model_cfg": TINY_VIT},
           "data": {"train": ["shards/train-*.tar"], "batch_size": 8, "num_workers": 0},
           "train": {"output_dir": "run", "steps": 3, "loss_impl": "chunked"}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    proc = _run(["-m", "mmft", "train", "--config", "tiny.yaml"], work, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = work / "run"
    assert (run / "config.yaml").is_file() and (run / "adapter-last" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line).get("step") for line in (run / "log.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 3
