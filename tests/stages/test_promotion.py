"""Promotion: gates, atomicity, 'worse never replaces better', pickle-free loading, provenance."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stages.promotion import ArtifactModule, GateError, evaluate_gates, load_artifact, promote

REPO = Path(__file__).resolve().parents[2]


def _linear(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _modules(layer: torch.nn.Linear) -> dict[str, ArtifactModule]:
    return {"head": ArtifactModule("torch.nn.Linear", {"in_features": 4, "out_features": 3}, layer.state_dict())}


def _promote(tmp_path: Path, layer: torch.nn.Linear, cosine: float, **kw):
    return promote(
        stage="stage1",
        modules=_modules(layer),
        metrics={"val/cosine": cosine, "val/utilisation": 0.5},
        artifacts_dir=tmp_path,
        gates={"val/cosine": {"min": 0.5}, "val/utilisation": {"min": 0.1}},
        compare_metric="val/cosine",
        provenance={"data": {"shards": [{"url": "train-000000.tar", "samples": 7}]}, "parents": [{"path": "p", "sha256": "ab"}]},
        **kw,
    )


def test_gates_report_each_failure():
    failures = evaluate_gates({"a": 0.2, "b": float("nan")}, {"a": {"min": 0.5}, "b": {"max": 1.0}, "c": {"min": 0}})
    assert len(failures) == 3 and "a = 0.2" in failures[0] and "NaN" in failures[1] and "no such metric" in failures[2]


def test_gate_failure_promotes_nothing(tmp_path):
    with pytest.raises(GateError, match="utilisation"):
        promote(stage="stage1", modules=_modules(_linear(0)), metrics={"val/utilisation": 1 / 2048},
                artifacts_dir=tmp_path, gates={"val/utilisation": {"min": 0.05}})
    assert not (tmp_path / "stage1" / "current").exists()
    assert not list((tmp_path / "stage1").glob("v*"))


def test_artifact_reloads_equal_outputs_and_provenance(tmp_path):
    layer = _linear(0)
    result = _promote(tmp_path, layer, 0.9)
    assert result.became_current and (tmp_path / "stage1" / "current").resolve() == result.path
    loaded = load_artifact(tmp_path / "stage1" / "current")
    x = torch.randn(5, 4)
    assert torch.equal(loaded["modules"]["head"](x), layer(x))
    prov = json.loads((result.path / "provenance.json").read_text())
    assert prov["data"]["shards"][0]["samples"] == 7 and prov["parents"][0]["sha256"] == "ab"
    assert "commit" in prov["code"]
    card = (result.path / "README.md").read_text()
    assert "val/cosine" in card and "0.9000" in card


def test_worse_run_does_not_replace_current_unless_forced(tmp_path):
    good = _promote(tmp_path, _linear(0), 0.9)
    worse = _promote(tmp_path, _linear(1), 0.8)
    assert not worse.became_current
    assert (tmp_path / "stage1" / "current").resolve() == good.path
    forced = _promote(tmp_path, _linear(1), 0.8, force=True)
    assert forced.became_current and (tmp_path / "stage1" / "current").resolve() == forced.path


def test_a_version_over_another_encoder_is_not_compared(tmp_path):
    enc = {"kind": "gemma4_audio", "dim": 4}
    good = _promote(tmp_path, _linear(0), 0.9, info={"encoder": enc})
    assert not _promote(tmp_path, _linear(1), 0.8, info={"encoder": enc}).became_current
    # Centered states give lower cosines by construction: that is another space, not a worse run.
    other = _promote(tmp_path, _linear(1), 0.8, info={"encoder": {**enc, "center_states": True}})
    assert other.became_current and good.path != (tmp_path / "stage1" / "current").resolve() == other.path


def test_loading_never_unpickles(tmp_path, monkeypatch):
    _promote(tmp_path, _linear(0), 0.9)

    def boom(*a, **k):
        raise AssertionError("artifact loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    load_artifact(tmp_path / "stage1" / "current")


def test_promotion_killed_half_way_leaves_current_intact(tmp_path):
    good = _promote(tmp_path, _linear(0), 0.9)
    before = load_artifact(tmp_path / "stage1" / "current")["modules"]["head"].weight.clone()
    # A second promotion dies (SIGKILL-like os._exit) after writing its weights, before finishing.
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        import stages.promotion as P
        real = P._write_json
        def dying(path, data):
            if path.name == "metrics.json":
                os._exit(9)
            real(path, data)
        P._write_json = dying
        torch.manual_seed(5)
        layer = torch.nn.Linear(4, 3)
        P.promote(stage="stage1", artifacts_dir={str(tmp_path)!r}, metrics={{"val/cosine": 0.99}},
                  modules={{"head": P.ArtifactModule("torch.nn.Linear", {{"in_features": 4, "out_features": 3}}, layer.state_dict())}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    stage_dir = tmp_path / "stage1"
    assert (stage_dir / "current").resolve() == good.path
    assert not (stage_dir / "v2").exists()
    after = load_artifact(stage_dir / "current")["modules"]["head"].weight
    assert torch.equal(before, after)
    # The next promotion still works and takes the next complete version number.
    assert _promote(tmp_path, _linear(2), 0.95).path.name == "v2"
