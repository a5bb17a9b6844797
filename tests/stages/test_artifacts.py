"""Promotion: gates, atomicity, 'worse never replaces better', pickle-free loading, provenance."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from models.rvq import ResidualVQ
from stages.artifacts import ArtifactModule, GateError, evaluate_gates, load_artifact, promote

REPO = Path(__file__).resolve().parents[2]


RVQ_ARGS = {"dim": 4, "num_quantizers": 2, "codebook_size": 3, "kmeans_init": False}


def _rvq(seed: int) -> ResidualVQ:
    return ResidualVQ(**RVQ_ARGS, seed=seed).eval()  # seeded random codebooks, a different set per seed


def _modules(layer: ResidualVQ) -> dict[str, ArtifactModule]:
    return {"quantizer": ArtifactModule("models.rvq.ResidualVQ", RVQ_ARGS, layer.state_dict())}


def _promote(tmp_path: Path, layer: ResidualVQ, cosine: float, **kw):
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
        promote(stage="stage1", modules=_modules(_rvq(0)), metrics={"val/utilisation": 1 / 2048},
                artifacts_dir=tmp_path, gates={"val/utilisation": {"min": 0.05}})
    assert not (tmp_path / "stage1" / "current").exists()
    assert not list((tmp_path / "stage1").glob("v*"))


def test_artifact_reloads_equal_outputs_and_provenance(tmp_path):
    layer = _rvq(0)
    result = _promote(tmp_path, layer, 0.9)
    assert result.became_current and (tmp_path / "stage1" / "current").resolve() == result.path
    loaded = load_artifact(tmp_path / "stage1" / "current")
    x = torch.randn(2, 5, 4)
    rebuilt = loaded["modules"]["quantizer"].eval()
    assert isinstance(rebuilt, ResidualVQ) and not torch.equal(rebuilt.codebooks, _rvq(1).codebooks)
    assert torch.equal(rebuilt(x).quantized, layer(x).quantized)
    prov = json.loads((result.path / "provenance.json").read_text())
    assert prov["data"]["shards"][0]["samples"] == 7 and prov["parents"][0]["sha256"] == "ab"
    assert "commit" in prov["code"]
    card = (result.path / "README.md").read_text()
    assert "val/cosine" in card and "0.9000" in card


def test_worse_run_does_not_replace_current_unless_forced(tmp_path):
    good = _promote(tmp_path, _rvq(0), 0.9)
    worse = _promote(tmp_path, _rvq(1), 0.8)
    assert not worse.became_current
    assert (tmp_path / "stage1" / "current").resolve() == good.path
    forced = _promote(tmp_path, _rvq(1), 0.8, force=True)
    assert forced.became_current and (tmp_path / "stage1" / "current").resolve() == forced.path


def test_a_version_over_another_encoder_is_not_compared(tmp_path):
    enc = {"kind": "gemma4_audio", "dim": 4}
    good = _promote(tmp_path, _rvq(0), 0.9, info={"encoder": enc})
    assert not _promote(tmp_path, _rvq(1), 0.8, info={"encoder": enc}).became_current
    # Centered states give lower cosines by construction: that is another space, not a worse run.
    other = _promote(tmp_path, _rvq(1), 0.8, info={"encoder": {**enc, "center_states": True}})
    assert other.became_current and good.path != (tmp_path / "stage1" / "current").resolve() == other.path


def test_loading_never_unpickles(tmp_path, monkeypatch):
    _promote(tmp_path, _rvq(0), 0.9)

    def boom(*a, **k):
        raise AssertionError("artifact loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    load_artifact(tmp_path / "stage1" / "current")


def test_promotion_killed_half_way_leaves_current_intact(tmp_path):
    good = _promote(tmp_path, _rvq(0), 0.9)
    before = load_artifact(tmp_path / "stage1" / "current")["modules"]["quantizer"].codebooks.clone()
    # A second promotion dies (SIGKILL-like os._exit) after writing its weights, before finishing.
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        import stages.artifacts as P
        real = P._write_json
        def dying(path, data):
            if path.name == "metrics.json":
                os._exit(9)
            real(path, data)
        P._write_json = dying
        from models.rvq import ResidualVQ
        layer = ResidualVQ(**{RVQ_ARGS!r}, seed=5)
        P.promote(stage="stage1", artifacts_dir={str(tmp_path)!r}, metrics={{"val/cosine": 0.99}},
                  modules={{"quantizer": P.ArtifactModule("models.rvq.ResidualVQ", {RVQ_ARGS!r}, layer.state_dict())}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    stage_dir = tmp_path / "stage1"
    assert (stage_dir / "current").resolve() == good.path
    assert not (stage_dir / "v2").exists()
    assert len(list(stage_dir.glob(".v2.tmp-*"))) == 1  # the killed promotion's half-written version
    after = load_artifact(stage_dir / "current")["modules"]["quantizer"].codebooks
    assert torch.equal(before, after)
    # The next promotion still works, takes the next complete version number and removes the leftover.
    assert _promote(tmp_path, _rvq(2), 0.95).path.name == "v2"
    assert not list(stage_dir.glob(".*tmp-*"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_promotion_removes_leftovers_of_dead_promotions_only(tmp_path):
    first = _promote(tmp_path, _rvq(0), 0.9)
    stage_dir = tmp_path / "stage1"
    dead, live = _dead_pid(), os.getppid()
    for pid in (dead, 999999):
        (stage_dir / f".v3.tmp-{pid}").mkdir()
        (stage_dir / f".v3.tmp-{pid}" / "quantizer.safetensors").write_bytes(b"half")
    os.symlink("v1", stage_dir / f".current.tmp-{dead}")
    (stage_dir / f".v7.tmp-{live}").mkdir()  # a concurrent promotion that is still running
    os.symlink("v1", stage_dir / f".current.tmp-{live}")
    if subprocess.run(["kill", "-0", "999999"], capture_output=True).returncode == 0:
        pytest.skip("PID 999999 is alive here")

    second = _promote(tmp_path, _rvq(1), 0.95)
    assert second.path.name == "v2" and (stage_dir / "current").resolve() == second.path != first.path
    assert sorted(p.name for p in stage_dir.iterdir()) == sorted(
        ["current", "v1", "v2", f".v7.tmp-{live}", f".current.tmp-{live}"]
    )
    assert torch.equal(load_artifact(stage_dir / "current")["modules"]["quantizer"].codebooks, _rvq(1).codebooks)


_DYING_PROMOTION = """
import os, sys
sys.path.insert(0, {repo!r})
import stages.artifacts as P
from models.rvq import ResidualVQ
where = sys.argv[1]
real_replace, real_symlink, real_save = os.replace, os.symlink, P.save_file
calls = []
def replace(a, b):
    calls.append(b)
    if where == "before-rename" and len(calls) == 1:
        os._exit(9)
    real_replace(a, b)
    if where == "after-rename" and len(calls) == 1:
        os._exit(9)
def symlink(a, b):
    real_symlink(a, b)
    if where == "after-link":
        os._exit(9)
def save_file(tensors, path):
    if where == "weights":  # dies half-way through writing the weights
        open(path, "wb").write(b"half")
        os._exit(9)
    real_save(tensors, path)
if where == "sigkill":  # blocks mid-write until the test kills it with SIGKILL
    real_json = P._write_json
    def blocking(path, data):
        real_json(path, data)
        if path.name == "config.json":
            open(sys.argv[2], "w").close()
            import time; time.sleep(120)
    P._write_json = blocking
os.replace, os.symlink, P.save_file = replace, symlink, save_file
layer = ResidualVQ(**{args!r}, seed=5)
P.promote(stage="stage1", artifacts_dir={root!r}, metrics={{"val/cosine": 0.99}},
          modules={{"quantizer": P.ArtifactModule("models.rvq.ResidualVQ", {args!r}, layer.state_dict())}})
"""


@pytest.mark.parametrize("where", ["weights", "before-rename", "after-rename", "after-link", "sigkill"])
def test_a_kill_at_any_point_leaves_current_and_the_next_promotion_cleans_up(tmp_path, where):
    good = _promote(tmp_path, _rvq(0), 0.9)
    stage_dir = tmp_path / "stage1"
    script = _DYING_PROMOTION.format(repo=str(REPO), args=RVQ_ARGS, root=str(tmp_path))
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", script, where, str(ready)], stderr=subprocess.PIPE)
    if where == "sigkill":
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == (-signal.SIGKILL if where == "sigkill" else 9), proc.stderr.read().decode()
    assert (stage_dir / "current").resolve() == good.path
    assert torch.equal(load_artifact(stage_dir / "current")["modules"]["quantizer"].codebooks, _rvq(0).codebooks)
    assert list(stage_dir.glob(".*tmp-*")) or where == "after-rename"  # something was left behind
    # A kill after the rename leaves a complete v2 that never became current: the next is v3.
    nxt = _promote(tmp_path, _rvq(2), 0.95)
    assert nxt.path.name == ("v3" if where in ("after-rename", "after-link") else "v2")
    assert (stage_dir / "current").resolve() == nxt.path
    assert not list(stage_dir.glob(".*tmp-*"))


# ---- gates overridden on purpose (force_gates) --------------------------------------------------


def test_force_gates_promotes_loudly_and_records_the_failed_gates(tmp_path, capsys):
    from stages.artifacts import GatesOverridden

    gates = {"val/cosine": {"min": 0.5}, "val/utilisation": {"min": 0.1}, "val/mse": {"max": 1.0}}
    metrics = {"val/cosine": 0.2, "val/utilisation": 0.5}  # cosine too low, mse missing
    with pytest.raises(GateError):
        promote(stage="stage1", modules=_modules(_rvq(0)), metrics=metrics, artifacts_dir=tmp_path, gates=gates)
    assert not list((tmp_path / "stage1").glob("v*"))
    with pytest.warns(GatesOverridden, match="val/cosine = 0.2 is below the minimum 0.5"):
        result = promote(stage="stage1", modules=_modules(_rvq(0)), metrics=metrics, artifacts_dir=tmp_path,
                         gates=gates, force_gates=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "GATES OVERRIDDEN" in err and "val/cosine = 0.2" in err and "val/mse: no such metric" in err
    assert result.became_current and load_artifact(result.path)["modules"]["quantizer"] is not None
    record = json.loads((result.path / "provenance.json").read_text())["gates"]
    assert record["override"] == "force_gates" and record["bounds"] == gates
    assert [(f["metric"], f["value"], f["bounds"]) for f in record["overridden"]] == [
        ("val/cosine", 0.2, {"min": 0.5}), ("val/mse", None, {"max": 1.0})]  # fmt: skip
    card = (result.path / "README.md").read_text()
    assert card.index("promoted with failed gates") < card.index("## Metrics")  # at the top
    assert "`val/cosine` = 0.2 (bounds: min 0.5)" in card and "`val/mse` = missing (bounds: max 1.0)" in card
    assert "| val/utilisation | min 0.1 | passed |" in card and "| val/cosine | min 0.5 | FAILED (overridden) |" in card


def test_force_gates_does_not_replace_a_better_current(tmp_path):
    good = _promote(tmp_path, _rvq(0), 0.9)
    with pytest.warns(UserWarning, match="GATES OVERRIDDEN"):
        forced = _promote(tmp_path, _rvq(1), 0.3, force_gates=True)  # below the 0.5 gate and worse
    assert not forced.became_current and (tmp_path / "stage1" / "current").resolve() == good.path
    # Gates that pass leave no override on the record.
    record = json.loads((good.path / "provenance.json").read_text())["gates"]
    assert record["overridden"] == [] and record["override"] is None
    assert "failed gates" not in (good.path / "README.md").read_text()


def test_a_failed_gate_exits_4_unless_overridden_in_fit_and_in_speechless_promote(
    tiny_corpus, make_stage1_config, tmp_path, capsys
):
    from stages.cli import GATE_EXIT, promote_main
    from stages.cli import main as cli

    torch.set_num_threads(1)
    config = make_stage1_config(tiny_corpus, tmp_path, max_epochs=1, gates={"val/cosine": {"min": 2.0}})
    current = tmp_path / "artifacts" / "stage1" / "current"
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(config)])
    assert exit_info.value.code == GATE_EXIT and not current.exists()
    assert "val/cosine" in capsys.readouterr().out

    run = tmp_path / "stage1" / "version_0"
    saved, averaged = str(run / "config.yaml"), str(run / "checkpoints" / "averaged.ckpt")
    assert promote_main(["--config", saved, "--ckpt_path", averaged, "--trainer.logger", "false"]) == GATE_EXIT
    assert not current.exists() and "below the minimum 2.0" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="GATES OVERRIDDEN"):
        code = promote_main(["--config", saved, "--ckpt_path", averaged, "--trainer.logger", "false", "--force-gates"])
    assert code == 0 and current.exists()
    assert "GATES OVERRIDDEN" in capsys.readouterr().err
    record = json.loads((current / "provenance.json").read_text())["gates"]
    assert [f["metric"] for f in record["overridden"]] == ["val/cosine"] and record["bounds"]["val/cosine"] == {"min": 2.0}
    assert "promoted with failed gates" in (current / "README.md").read_text()

    # The same override on the fit command line, without touching the YAML.
    with pytest.warns(UserWarning, match="GATES OVERRIDDEN"):
        cli(["fit", "--config", str(config), "--promote.force_gates", "true",
             "--trainer.logger.init_args.version", "1"])  # fmt: skip
    fitted = sorted((tmp_path / "artifacts" / "stage1").glob("v*"))[-1]
    assert fitted.name == "v2"
    prov = json.loads((fitted / "provenance.json").read_text())
    assert prov["gates"]["overridden"][0]["metric"] == "val/cosine" and prov["config"]["promote"]["force_gates"] is True
