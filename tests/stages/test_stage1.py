"""Stage 1 through the CLI: fit -> best/final/averaged -> promotion -> tokenization, as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.averaging import average_state_dicts
from stages.cli import GATE_EXIT, promote_main
from stages.cli import main as cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fitted(tiny_corpus, tmp_path_factory, make_stage1_config):
    run_dir = tmp_path_factory.mktemp("run")
    config = make_stage1_config(tiny_corpus, run_dir)
    cli(["fit", "--config", str(config)])
    return {"run": run_dir, "config": config, "ckpts": run_dir / "stage1" / "version_0" / "checkpoints"}


def tokenize(config: Path, shards: Path, out: Path, *extra: str) -> dict[str, list]:
    cli(["predict", "--config", str(config), "--data.init_args.predict_shards", str(shards), "--trainer.logger", "false",
         "--trainer.callbacks+=stages.writers.ShardPredictionWriter", "--trainer.callbacks.output_dir", str(out), *extra])
    with open(out / "semantic_tokens.jsonl") as f:
        return {r["id"]: r["codes"] for r in map(json.loads, f)}


def test_fit_leaves_three_checkpoints_metrics_and_current_artifact(fitted):
    ckpts = fitted["ckpts"]
    assert (ckpts / "last.ckpt").exists() and (ckpts / "averaged.ckpt").exists()
    summary = json.loads((fitted["run"] / "stage1" / "version_0" / "checkpoint_metrics.json").read_text())
    assert set(summary["metrics"]) == {"best", "final", "averaged"}
    for metrics in summary["metrics"].values():
        assert {"val/mse", "val/cosine", "val/utilisation", "val/perplexity"} <= set(metrics)
        assert 0 < metrics["val/utilisation"] <= 1
    current = fitted["run"] / "artifacts" / "stage1" / "current"
    card = (current / "README.md").read_text()
    assert "val/cosine" in card
    provenance = json.loads((current / "provenance.json").read_text())
    assert provenance["data"]["samples"] == 30 and provenance["data"]["shards"]
    # Clean shards: zero skips on the record, over both epochs' 30 samples and the val set's 12.
    assert provenance["data"]["skipped"]["train"] == {"reasons": {}, "total": 0, "used": 60, "fraction": 0.0}
    assert provenance["data"]["skipped"]["val"]["total"] == 0 and provenance["data"]["skipped"]["val"]["used"] == 12
    assert summary["skipped"]["train"]["total"] == 0 and summary["metrics"]["averaged"]["skipped/val/fraction"] == 0


def test_every_checkpoint_loads_with_weights_only(fitted):
    """Tensors and plain containers only (issue #11): what a ``--ckpt_path`` URL is loaded with."""
    names = sorted(p.name for p in fitted["ckpts"].glob("*.ckpt"))
    assert {"last.ckpt", "averaged.ckpt", "final.ckpt"} <= set(names) and len(names) == 5, names
    for name in names:
        ckpt = torch.load(fitted["ckpts"] / name, map_location="cpu", weights_only=True)
        assert ckpt["rvq_generator"].dtype == torch.uint8, name  # the RVQ's generator state
        assert "SpeechDataModule" in ckpt and ckpt["optimizer_states"] and ckpt["callbacks"], (name, sorted(ckpt))


def test_checkpoint_holds_no_encoder_weights_and_averaged_is_mean(fitted):
    ckpts = fitted["ckpts"]
    state = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(k.startswith(("quantizer.", "ddp_anchor", "val_", "test_")) for k in state), sorted(state)
    best = sorted(ckpts.glob("best-*.ckpt"))
    assert len(best) == 2
    expected = average_state_dicts([torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in best])
    averaged = torch.load(ckpts / "averaged.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[key], value)


def test_resume_from_checkpoint(fitted, tmp_path):
    config = fitted["config"]
    cli(["fit", "--config", str(config), "--trainer.max_epochs", "3", "--ckpt_path", str(fitted["ckpts"] / "last.ckpt"),
         "--trainer.logger.init_args.save_dir", str(tmp_path)])
    resumed = torch.load(tmp_path / "stage1" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2
    # The RVQ's generator (k-means seeds, restarts, dropout) rides in the checkpoint and is restored.
    before = torch.load(fitted["ckpts"] / "last.ckpt", map_location="cpu", weights_only=True)
    state = before["rvq_generator"]
    from models.rvq import ResidualVQ
    from stages.stage1 import RVQStage

    stage = RVQStage(quantizer=ResidualVQ(dim=64, num_quantizers=2, codebook_size=16))
    assert not torch.equal(stage.quantizer.generator_state(), state)  # training advanced it: restoring matters
    stage.on_load_checkpoint(before)
    assert torch.equal(stage.quantizer.generator_state(), state)


def test_tokenizing_from_artifact_equals_checkpoint(fitted, tiny_corpus, tmp_path):
    config = fitted["config"]
    artifact = fitted["run"] / "artifacts" / "stage1" / "current"
    from_artifact = tokenize(config, tiny_corpus["val"], tmp_path / "a", "--model.init_args.artifact", str(artifact))
    chosen = json.loads((artifact / "provenance.json").read_text())["checkpoint"]
    from_ckpt = tokenize(config, tiny_corpus["val"], tmp_path / "c", "--ckpt_path", chosen)
    assert len(from_artifact) == 12 and from_artifact == from_ckpt


def test_artifact_mismatch_is_a_clear_error(fitted):
    artifact = fitted["run"] / "artifacts" / "stage1" / "current"
    with pytest.raises(ValueError, match="codebook_size"):
        from models.rvq import ResidualVQ
        from stages.stage1 import RVQStage

        RVQStage(artifact=str(artifact), quantizer=ResidualVQ(dim=64, num_quantizers=2, codebook_size=32))


def test_collapsed_codebook_is_never_promoted(fitted, tmp_path):
    ckpt = torch.load(fitted["ckpts"] / "averaged.ckpt", map_location="cpu", weights_only=True)
    for key, value in ckpt["state_dict"].items():
        if key.startswith("quantizer.") and value.is_floating_point() and value.dim() >= 2 and value.shape[-1] == 64:
            value.copy_(value[..., :1, :].expand_as(value))  # every code identical: one entry used
    collapsed = tmp_path / "collapsed.ckpt"
    torch.save(ckpt, collapsed)
    config = stage1_config_with_gates(fitted, tmp_path)
    before = os.path.realpath(fitted["run"] / "artifacts" / "stage1" / "current")
    assert promote_main(["--config", str(config), "--ckpt_path", str(collapsed)]) == GATE_EXIT
    assert os.path.realpath(fitted["run"] / "artifacts" / "stage1" / "current") == before


def stage1_config_with_gates(fitted, tmp_path) -> Path:
    import yaml

    config = yaml.safe_load(Path(fitted["config"]).read_text())
    config["trainer"]["callbacks"][2]["init_args"]["gates"] = {"val/utilisation": {"min": 0.2}}
    config["trainer"]["logger"] = False
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_tokenization_on_two_ranks_writes_each_input_once(fitted, tiny_corpus, tmp_path):
    out = tmp_path / "tokens"
    artifact = fitted["run"] / "artifacts" / "stage1" / "current"
    cmd = [sys.executable, "-m", "stages", "predict", "--config", str(fitted["config"]),
           "--model.init_args.artifact", str(artifact), "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--data.init_args.predict_shards", str(tiny_corpus["train"]), "--trainer.logger", "false",
           "--trainer.callbacks+=stages.writers.ShardPredictionWriter", "--trainer.callbacks.output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "semantic_tokens.jsonl") as f:
        ids = [json.loads(line)["id"] for line in f]
    assert len(ids) == len(set(ids)) == 30
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 30 and len({s["url"] for s in index["shards"]}) >= 2


def test_cached_states_are_the_fast_path(fitted, tiny_corpus, tmp_path):
    """predict_output=states writes state shards once; stage 1 then trains from them without the encoder."""
    config = fitted["config"]
    for split in ("train", "val"):
        cli(["predict", "--config", str(config), "--model.init_args.predict_output", "states",
             "--data.init_args.predict_shards", str(tiny_corpus[split]), "--trainer.logger", "false",
             "--trainer.callbacks+=stages.writers.ShardPredictionWriter", "--trainer.callbacks.kind", "states",
             "--trainer.callbacks.output_dir", str(tmp_path / "states" / split)])
    index = json.loads((tmp_path / "states" / "train" / "index.json").read_text())
    assert index["kind"] == "states" and index["samples"] == 30
    cli(["fit", "--config", str(config), "--model.init_args.encoder", "null", "--data.init_args.fields", "states",
         "--data.init_args.train_shards", str(tmp_path / "states" / "train"),
         "--data.init_args.val_shards", str(tmp_path / "states" / "val"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "run")])
    summary = json.loads((tmp_path / "run" / "stage1" / "version_0" / "checkpoint_metrics.json").read_text())
    assert summary["metrics"]["final"]["val/cosine"] > 0.5
