"""The CLI users run: the installed `lightning` is ours, every shipped YAML resolves, re-runs work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_installed_lightning_command_is_ours():
    script = Path(sys.executable).parent / "lightning"
    assert script.exists(), "install the project (scripts/setup.sh): it provides `lightning` and `speechless`"
    assert "stages.cli" in script.read_text(), "another package's `lightning` script shadows ours; use `speechless`"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "speechless" in out.stdout


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO)) for c in CONFIGS])
def test_every_shipped_config_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].startswith("stages.")
    assert resolved["data"]["class_path"].startswith("datamodules.")


def test_python_dash_m_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "stages", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "speechless" in out.stdout


def test_rerun_into_the_same_log_directory(tiny_corpus, make_stage1_config, tmp_path):
    config = make_stage1_config(tiny_corpus, tmp_path, max_epochs=1)
    for _ in range(2):  # the second run finds config.yaml of the first in version_0 and overwrites it
        cli(["fit", "--config", str(config), "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])
    assert (tmp_path / "stage1" / "version_0" / "config.yaml").exists()
