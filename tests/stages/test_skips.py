"""Skipped samples on the record: in TensorBoard, ``checkpoint_metrics.json``, provenance and the gates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.shards import ShardWriter, iter_tar_samples, resolve_shards
from stages.cli import GATE_EXIT, SpeechlessCLI, promote_main
from stages.cli import main as cli
from stages.skips import SkipTally, explain_skips

REPO = Path(__file__).resolve().parents[2]
BAD_TRAIN = {1: "flac", 4: "json", 9: "flac", 16: "json", 22: "flac", 27: "json"}  # 6 of the 30
BAD_VAL = {3: "flac", 8: "json"}  # 2 of the 12


def corrupt_copy(src: Path, dst: Path, bad: dict[int, str]) -> Path:
    """The shards of ``src`` again in ``dst``, the samples at positions ``bad`` broken (still indexed)."""
    with ShardWriter(dst, prefix="shard", max_samples=7) as writer:
        n = 0
        for path in resolve_shards(src).paths():
            for raw in iter_tar_samples(path):
                seconds = json.loads(raw["json"])["duration"]
                kind = bad.get(n)
                if kind == "flac":
                    raw["flac"] = b"not a flac at all"
                elif kind == "json":
                    raw["json"] = b"{broken"
                writer.write(raw, seconds=seconds)
                n += 1
    return dst


@pytest.fixture(scope="module")
def corrupt_corpus(tiny_corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corrupt")
    return {
        **tiny_corpus,
        "train": corrupt_copy(tiny_corpus["train"], root / "train", BAD_TRAIN),
        "val": corrupt_copy(tiny_corpus["val"], root / "val", BAD_VAL),
    }


def with_gates(config: Path, gates: dict, out: Path, artifacts_dir: Path | None = None) -> Path:
    data = yaml.safe_load(config.read_text())
    promote = next(cb for cb in data["trainer"]["callbacks"] if cb["class_path"] == "stages.promote.Promote")
    promote["init_args"]["gates"] = gates
    if artifacts_dir is not None:
        promote["init_args"]["artifacts_dir"] = str(artifacts_dir)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def tensorboard_scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ---- the tally itself -------------------------------------------------------------------------


def test_tally_counts_reasons_and_real_samples_only():
    tally = SkipTally()
    tally.add("train", {"skipped": {"bad_flac": 2}, "sample_weight": torch.tensor([1.0, 1.0, 1.0])})
    tally.add("train", {"skipped": {"bad_json": 1, "bad_flac": 1}, "sample_weight": torch.tensor([1.0])})
    tally.add("train", {"skipped": {}, "sample_weight": torch.tensor([0.0]), "pad": True})  # a padding batch
    tally.add("train", {"input_ids": torch.zeros(2, 5, dtype=torch.long)})  # stage 3: no skipped, no weights
    assert tally.record("train") is None  # nothing is reported before the ranks are summed
    tally.sync()
    assert tally.record("train") == {
        "reasons": {"bad_flac": 3, "bad_json": 1},
        "total": 4,
        "used": 6,
        "fraction": 0.4,
    }
    assert tally.metrics("train") == {
        "skipped/train/bad_flac": 3.0,
        "skipped/train/bad_json": 1.0,
        "skipped/train/total": 4.0,
        "skipped/train/used": 6.0,
        "skipped/train/fraction": 0.4,
    }
    assert "4 of 10 samples skipped (40.0 %): bad_flac 3, bad_json 1" in tally.describe("train")
    resumed = SkipTally()
    resumed.load_state_dict(tally.state_dict())
    resumed.add("train", {"skipped": {"bad_flac": 1}, "sample_weight": torch.tensor([1.0])})
    resumed.sync()
    assert (
        resumed.record("train")["reasons"] == {"bad_flac": 4, "bad_json": 1}
        and resumed.record("train")["used"] == 7
    )
    message = explain_skips(
        "stage1: not promoted, gates failed:\n  - skipped/train/fraction = 0.4 is above the maximum 0.01",
        tally,
    )
    assert "bad_flac 3" in message and "40.0 %" in message
    assert "no skip counts for val" in explain_skips("- skipped/val/fraction: no such metric", tally)


def test_every_trainer_gets_one_tally(tiny_corpus, make_stage1_config, tmp_path):
    config = make_stage1_config(tiny_corpus, tmp_path)  # lists trainer.callbacks, none of them a tally
    built = SpeechlessCLI(args=["--config", str(config)], run=False)
    assert sum(isinstance(cb, SkipTally) for cb in built.trainer.callbacks) == 1
    named = SpeechlessCLI(
        args=["--config", str(config), "--trainer.callbacks+=stages.skips.SkipTally"], run=False
    )
    assert sum(isinstance(cb, SkipTally) for cb in named.trainer.callbacks) == 1


# ---- a fit over corrupt shards ----------------------------------------------------------------


@pytest.fixture(scope="module")
def corrupt_fit(corrupt_corpus, tmp_path_factory, make_stage1_config):
    run_dir = tmp_path_factory.mktemp("corrupt_run")
    config = make_stage1_config(
        corrupt_corpus,
        run_dir,
        gates={"skipped/train/fraction": {"max": 0.25}, "skipped/val/fraction": {"max": 0.25}},
    )
    cli(["fit", "--config", str(config)])  # 2 epochs; 20 % of train and 17 % of val are corrupt
    return {"run": run_dir, "config": config, "log": run_dir / "stage1" / "version_0"}


def test_corrupt_fit_logs_skips_to_tensorboard(corrupt_fit):
    scalars = tensorboard_scalars(corrupt_fit["log"])
    # Cumulative over the fit: 3 + 3 per epoch of each reason, 24 real samples per epoch.
    assert scalars["skipped/train/bad_flac"] == [3.0, 6.0] and scalars["skipped/train/bad_json"] == [3.0, 6.0]
    assert scalars["skipped/train/total"] == [6.0, 12.0] and scalars["skipped/train/used"] == [24.0, 48.0]
    assert scalars["skipped/train/fraction"] == pytest.approx([0.2, 0.2])
    # Each validation counts its own pass over the 12 val samples (not the sanity batches).
    assert scalars["skipped/val/total"][:2] == [2.0, 2.0] and scalars["skipped/val/used"][:2] == [10.0, 10.0]


def test_corrupt_fit_records_skips_per_candidate_and_in_provenance(corrupt_fit):
    summary = json.loads((corrupt_fit["log"] / "checkpoint_metrics.json").read_text())
    assert summary["skipped"]["train"] == {
        "reasons": {"bad_flac": 6, "bad_json": 6},
        "total": 12,
        "used": 48,
        "fraction": 0.2,
    }
    for name, metrics in summary["metrics"].items():
        assert metrics["skipped/val/total"] == 2 and metrics["skipped/val/bad_flac"] == 1, name
        assert metrics["skipped/train/total"] == 12, name  # the best one is the last epoch's here
        assert metrics["skipped/val/fraction"] == pytest.approx(2 / 12)
    current = corrupt_fit["run"] / "artifacts" / "stage1" / "current"
    provenance = json.loads((current / "provenance.json").read_text())
    assert provenance["data"]["samples"] == 30  # as indexed; the skips stand beside it
    assert provenance["data"]["skipped"]["train"] == summary["skipped"]["train"]
    assert provenance["data"]["skipped"]["val"]["reasons"] == {"bad_flac": 1, "bad_json": 1}
    metrics = json.loads((current / "metrics.json").read_text())
    assert metrics["skipped/train/fraction"] == pytest.approx(0.2) and metrics["skipped/val/total"] == 2


def test_checkpoints_carry_the_fit_s_train_counts(corrupt_fit):
    ckpts = corrupt_fit["log"] / "checkpoints"
    for name in ("final.ckpt", "averaged.ckpt"):
        state = torch.load(ckpts / name, map_location="cpu", weights_only=True)["callbacks"]["SkipTally"]
        assert state == {"train": {"reasons": {"bad_flac": 6, "bad_json": 6}, "used": 48}}, name


def test_resumed_fit_goes_on_counting(corrupt_fit, tmp_path):
    config = with_gates(
        corrupt_fit["config"], {}, tmp_path / "resume.yaml", artifacts_dir=tmp_path / "artifacts"
    )
    cli(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs",
            "3",
            "--ckpt_path",
            str(corrupt_fit["log"] / "checkpoints" / "last.ckpt"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    summary = json.loads((tmp_path / "stage1" / "version_0" / "checkpoint_metrics.json").read_text())
    assert summary["skipped"]["train"] == {
        "reasons": {"bad_flac": 9, "bad_json": 9},
        "total": 18,
        "used": 72,
        "fraction": 0.2,
    }
    assert tensorboard_scalars(tmp_path / "stage1" / "version_0")["skipped/train/total"] == [18.0]


def test_gate_below_the_corrupt_fraction_refuses_promotion(
    corrupt_corpus, make_stage1_config, tmp_path, capsys
):
    config = make_stage1_config(
        corrupt_corpus, tmp_path, max_epochs=1, gates={"skipped/train/fraction": {"max": 0.01}}
    )
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(config)])
    assert exit_info.value.code == GATE_EXIT
    out = capsys.readouterr().out
    assert "skipped/train/fraction = 0.2 is above the maximum 0.01" in out
    assert "6 of 30 samples skipped (20.0 %): bad_flac 3, bad_json 3" in out
    assert not (tmp_path / "artifacts" / "stage1" / "current").exists()
    summary = json.loads((tmp_path / "stage1" / "version_0" / "checkpoint_metrics.json").read_text())
    assert summary["skipped"]["train"]["total"] == 6  # the record is written before the gate refuses


def test_promote_command_reads_the_skips_from_the_checkpoint(corrupt_fit, tmp_path, capsys):
    current = corrupt_fit["run"] / "artifacts" / "stage1" / "current"
    before = os.path.realpath(current)
    strict = with_gates(
        corrupt_fit["config"], {"skipped/train/fraction": {"max": 0.1}}, tmp_path / "strict.yaml"
    )
    averaged = str(corrupt_fit["log"] / "checkpoints" / "averaged.ckpt")
    assert (
        promote_main(["--config", str(strict), "--ckpt_path", averaged, "--trainer.logger", "false"])
        == GATE_EXIT
    )
    assert "12 of 60 samples skipped (20.0 %)" in capsys.readouterr().err
    assert os.path.realpath(current) == before
    lenient = with_gates(
        corrupt_fit["config"], {"skipped/train/fraction": {"max": 0.3}}, tmp_path / "lenient.yaml"
    )
    assert (
        promote_main(
            ["--config", str(lenient), "--ckpt_path", averaged, "--trainer.logger", "false", "--force"]
        )
        == 0
    )
    provenance = json.loads((current / "provenance.json").read_text())
    assert os.path.realpath(current) != before and provenance["selected"] == "averaged"
    assert (
        provenance["data"]["skipped"]["train"]["total"] == 12
        and provenance["data"]["skipped"]["val"]["total"] == 2
    )


# ---- two gloo ranks ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_sum_their_skips_and_both_stop_at_the_gate(corrupt_corpus, make_stage1_config, tmp_path, offline_env):
    config = make_stage1_config(corrupt_corpus, tmp_path, gates={"skipped/train/fraction": {"max": 0.01}})
    env = offline_env()
    cmd = [
        sys.executable,
        "-m",
        "stages",
        "fit",
        "--config",
        str(config),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank, not just rank 0
        stdout, stderr = proc.communicate()
        pytest.fail(f"hang: {' '.join(cmd)}\n{stderr[-4000:]}")
    assert proc.returncode == GATE_EXIT, stderr[-4000:]
    assert "12 of 60 samples skipped (20.0 %): bad_flac 6, bad_json 6" in stdout  # both ranks' skips
    assert not (tmp_path / "artifacts" / "stage1" / "current").exists()
    log_dir = tmp_path / "stage1" / "version_0"
    summary = json.loads((log_dir / "checkpoint_metrics.json").read_text())
    assert summary["skipped"]["train"] == {
        "reasons": {"bad_flac": 6, "bad_json": 6},
        "total": 12,
        "used": 48,
        "fraction": 0.2,
    }
    for metrics in summary["metrics"].values():
        assert metrics["skipped/val/total"] == 2 and metrics["skipped/val/used"] == 10
    assert tensorboard_scalars(log_dir)["skipped/train/total"] == [6.0, 12.0]
