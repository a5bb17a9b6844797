"""``Promote(select="validated")``: the checkpoint that validates best after ``fit`` is the one promoted.

``best`` is ModelCheckpoint's pick among the checkpoints validated during training; a fit that
stops between validations leaves its last steps to ``final`` alone. The stage-1 fit here makes
ModelCheckpoint keep the *worst* epochs (``mode: min`` on a metric promotion maximises), so only the
post-fit validation can find the best candidate, and the promoted weights must be that candidate's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.cli import main as cli
from stages.promote import Promote


def test_choose_validated_ranks_by_the_compare_metric():
    results = {"averaged": {"val/wer": 0.7}, "best": {"val/wer": 0.9}, "final": {"val/wer": 0.6}}
    lowest = Promote(stage="s", select="validated", compare_metric="val/wer", compare_mode="min")
    assert lowest.choose_validated(results) == "final"
    highest = Promote(stage="s", select="validated", compare_metric="val/wer", compare_mode="max")
    assert highest.choose_validated(results) == "best"
    # Ties go to the earlier of averaged, best, final; a NaN never wins; no metric: no choice.
    assert lowest.choose_validated({"final": {"val/wer": 0.5}, "best": {"val/wer": 0.5}}) == "best"
    assert lowest.choose_validated({"averaged": {"val/wer": float("nan")}, "final": {"val/wer": 0.9}}) == "final"
    assert lowest.choose_validated({"final": {"val/loss": 0.1}}) is None
    assert Promote(stage="s", select="best", compare_metric="val/wer").choose_validated(results) is None


def test_validated_needs_a_metric_and_unknown_selections_are_refused():
    with pytest.raises(ValueError, match="needs a compare_metric"):
        Promote(stage="s", select="validated")
    with pytest.raises(ValueError, match="select must be"):
        Promote(stage="s", select="latest")  # type: ignore[arg-type]


def _worst_best_config(tiny_corpus, tmp_path, make_stage1_config) -> Path:
    config_path = make_stage1_config(tiny_corpus, tmp_path, max_epochs=3)
    config = yaml.safe_load(config_path.read_text())
    checkpoint, _, promote = config["trainer"]["callbacks"]
    checkpoint["init_args"].update(mode="min", save_top_k=1)  # ModelCheckpoint's "best": the lowest cosine
    promote["init_args"]["select"] = "validated"  # promotion: the highest cosine (compare_metric, max)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def test_fit_promotes_the_checkpoint_that_validates_best_with_its_weights(tiny_corpus, tmp_path, make_stage1_config, capsys):
    cli(["fit", "--config", str(_worst_best_config(tiny_corpus, tmp_path, make_stage1_config))])
    _check_promoted_winner(tmp_path, capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_agree_on_the_validated_winner(tiny_corpus, tmp_path, make_stage1_config, offline_env):
    # Every collective after fit (validations, the broadcast pick, the re-validation, promotion) on 2 gloo ranks.
    config = _worst_best_config(tiny_corpus, tmp_path, make_stage1_config)
    cmd = [sys.executable, "-m", "stages", "fit", "--config", str(config), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_promoted_winner(tmp_path, proc.stdout)


def _check_promoted_winner(tmp_path: Path, out: str) -> None:
    run = tmp_path / "stage1" / "version_0"
    table = json.loads((run / "checkpoint_metrics.json").read_text())
    cosines = {name: m["val/cosine"] for name, m in table["metrics"].items()}
    winner = max(cosines, key=cosines.get)
    # The provisional choice (averaged, of the worst epochs) lost: the re-validation path ran.
    assert winner != "averaged" and cosines[winner] > cosines["averaged"], cosines
    assert f"select validated -> {winner} (val/cosine {cosines[winner]:.4f})" in out

    current = tmp_path / "artifacts" / "stage1" / "current"
    provenance = json.loads((current / "provenance.json").read_text())
    assert provenance["selected"] == winner
    assert Path(provenance["checkpoint"]) == Path(table["candidates"][winner]).resolve()
    assert json.loads((current / "metrics.json").read_text())["val/cosine"] == pytest.approx(cosines[winner])
    promoted = load_file(str(current / "quantizer.safetensors"))
    state = torch.load(table["candidates"][winner], map_location="cpu", weights_only=True)["state_dict"]
    for key, value in promoted.items():
        torch.testing.assert_close(value, state[f"quantizer.{key}"], msg=key)
