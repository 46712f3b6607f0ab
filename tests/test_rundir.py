"""The run directory: its readers and writers, and that no other module spells its names."""
import ast
from pathlib import Path

import pytest

from mmft.config import Config
from mmft.rundir import RunDir

PACKAGE = Path(__file__).resolve().parent.parent / "mmft"


def test_config_and_summary_round_trip(tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = Config()
    cfg.train.lr, cfg.data.batch_size = 3e-4, 7
    run.write_config(cfg)
    back = run.config()
    assert back.train.lr == 3e-4 and back.data.batch_size == 7 and back == cfg
    run.write_summary({"steps": 5, "best": {"score": 1.5}})
    assert run.summary() == {"steps": 5, "best": {"score": 1.5}}


def test_a_run_is_complete_once_its_summary_is_written(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_complete()
    run.adapter("best").mkdir()
    run.adapter("last").mkdir()
    assert not run.is_complete()  # adapters without a summary: training stopped before its end
    with pytest.raises(FileNotFoundError, match="has not finished"):
        run.summary()
    run.write_summary({"steps": 1})
    assert run.is_complete()


def test_adapter_paths_and_the_best_fallback(tmp_path):
    run = RunDir(tmp_path)
    assert run.adapter("best").name == "adapter-best" and run.adapter("last").name == "adapter-last"
    run.adapter("last").mkdir()
    assert run.find_adapter("best") == run.adapter("last")  # no best kept: the last one
    run.adapter("best").mkdir()
    assert run.find_adapter("best") == run.adapter("best")
    assert run.find_adapter(str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
    with pytest.raises(ValueError, match="'middle'"):
        run.adapter("middle")


def test_a_folder_without_config_is_refused_in_a_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not an mmft run directory \(config.yaml is missing\)"):
        RunDir(tmp_path).config()


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_only_rundir_spells_the_run_directory_names():
    """Readers go through RunDir, so a renamed file cannot leave a reader behind."""
    names = {RunDir.CONFIG, RunDir.LOG, RunDir.SUMMARY, RunDir.CHECKPOINTS, "adapter-best", "adapter-last",
             "adapter-"}
    assert "adapter-" in _string_constants(PACKAGE / "rundir.py")  # the check below does see f-string parts
    offenders = {str(p.relative_to(PACKAGE)): sorted(names & _string_constants(p))
                 for p in PACKAGE.rglob("*.py") if p.name != "rundir.py"}
    assert {p: n for p, n in offenders.items() if n} == {}
