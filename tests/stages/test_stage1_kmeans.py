"""Stage 1 with SpireLM's k-means units (stages.stage1_kmeans.KMeansStage), as users run it.

The fast tests fit a tiny config in-process (the tiny Gemma 4 corpus of ``tests/stages/conftest.py``)
and check the metrics, the artifact, the tokenization (units and their private-use strings), the
checkpoints and the cached-states path. The slow ones run the shipped files through
``python -m stages`` in a fresh folder, overriding only what ``tests/stages/test_real_configs.py``
overrides (models and their sizes, data laid out at the config's paths, device, steps):
``configs/stage1_kmeans.yaml`` on a 24-layer tiny random HuBERT (so its layer 22 is read) on 1 and
2 ranks, then validate, promote, predict and a stage-2 fit (one-level SpeechLM) on the predicted
units; ``configs/demo/whisper_stage1_kmeans.yaml`` on the pretrained Whisper tiny.en.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datamodules.shards import iter_tar_samples, resolve_shards
from models.units import collapse, pua_to_units
from stages.artifacts import load_artifact
from stages.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT = 420
UNITS = 16


def _config(corpus: dict[str, Path], run_dir: Path, **data: object) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "num_sanity_val_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "stage1_kmeans", "version": 0}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/quant_error", "mode": "min", "save_last": True, "save_top_k": 1}},
                {"class_path": "stages.promote.Promote",
                 "init_args": {"stage": "stage1_kmeans", "select": "final", "compare_metric": "val/quant_error_ratio",
                               "compare_mode": "min", "artifacts_dir": str(run_dir / "artifacts"),
                               "gates": {"val/utilisation": {"min": 0.3}, "val/quant_error_ratio": {"max": 0.8}}}},
            ],
        },
        "model": {
            "class_path": "stages.stage1_kmeans.KMeansStage",
            "init_args": {
                "encoder": {"class_path": "models.encoders.Gemma4AudioEncoder", "init_args": {"source": str(corpus["encoder"])}},
                "quantizer": {"class_path": "models.kmeans.KMeansUnits",
                              "init_args": {"dim": 64, "codebook_size": UNITS, "init_frames": 200}},
            },
        },
        "data": {"class_path": "datamodules.speech.SpeechDataModule",
                 "init_args": {"train_shards": str(corpus["train"]), "val_shards": str(corpus["val"]),
                               "max_batch_seconds": 8.0, "max_batch_size": 16, "num_workers": 0, **data}},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "stage1_kmeans.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _samples(folder: Path) -> list[dict]:
    out = []
    for shard in resolve_shards(folder).paths():
        for raw in iter_tar_samples(shard):
            sample = {"key": raw["__key__"], "json": json.loads(raw["json"])}
            for name in ("codes.npy", "states.npy"):
                if name in raw:
                    sample[name] = np.load(io.BytesIO(raw[name]), allow_pickle=False)
            out.append(sample)
    return out


def _check_unit_shards(folder: Path, codebook_size: int) -> list[dict]:
    """Every sample: codes ``[1, n_frames]`` in ``[0, K)`` and ``units_pua`` = the collapsed codes."""
    samples = _samples(folder)
    assert samples
    for s in samples:
        codes = s["codes.npy"]
        assert codes.shape == (1, s["json"]["n_frames"]) and codes.shape[1] > 0
        assert 0 <= codes.min() and codes.max() < codebook_size
        assert pua_to_units(s["json"]["units_pua"]) == collapse(codes[0].tolist())[0]
    return samples


@pytest.fixture(scope="module")
def fitted(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kmeans_run")
    config = _config(tiny_corpus, run_dir)
    cli(["fit", "--config", str(config)])
    return {"run": run_dir, "config": config, "ckpts": run_dir / "stage1_kmeans" / "version_0" / "checkpoints",
            "artifact": run_dir / "artifacts" / "stage1_kmeans" / "current"}


def test_fit_validates_and_promotes_units_with_their_metrics(fitted):
    summary = json.loads((fitted["run"] / "stage1_kmeans" / "version_0" / "checkpoint_metrics.json").read_text())
    assert set(summary["metrics"]) == {"best", "final"}
    final = summary["metrics"]["final"]
    for key in ("val/quant_error", "val/quant_error_ratio", "val/mse", "val/cosine", "val/utilisation", "val/perplexity"):
        assert key in final, key
    assert 0 < final["val/quant_error_ratio"] < 0.8 and final["val/utilisation"] > 0.3
    assert final["val/mse"] == pytest.approx(final["val/quant_error"] / 64, rel=1e-5)
    assert 1 < final["val/perplexity"] <= UNITS
    loaded = load_artifact(fitted["artifact"], names=["quantizer"])
    info = loaded["config"]["info"]
    assert info["tokenizer"] == "kmeans_units" and (info["num_quantizers"], info["codebook_size"]) == (1, UNITS)
    assert info["encoder"]["kind"] == "gemma4_audio"
    quantizer = loaded["modules"]["quantizer"]
    assert bool(quantizer.initialized) and quantizer.counts.sum() > 0
    metrics = json.loads((fitted["artifact"] / "metrics.json").read_text())
    assert metrics["val/quant_error"] == pytest.approx(final["val/quant_error"])


def test_checkpoints_load_with_weights_only_and_carry_the_generator(fitted):
    for name in ("last.ckpt", "final.ckpt"):
        ckpt = torch.load(fitted["ckpts"] / name, map_location="cpu", weights_only=True)
        assert "kmeans_generator" in ckpt and "kmeans_init_buffer" not in ckpt  # k-means++ ran
        assert not any(k.startswith("encoder.") for k in ckpt["state_dict"])  # frozen weights stay out


def test_predict_writes_units_and_their_private_use_strings(fitted, tiny_corpus, tmp_path):
    out = tmp_path / "units"
    cli(["predict", "--config", str(fitted["config"]), "--model.init_args.artifact", str(fitted["artifact"]),
         "--data.init_args.predict_shards", str(tiny_corpus["val"]), "--trainer.logger", "false",
         "--trainer.callbacks+=stages.writers.ShardPredictionWriter", "--trainer.callbacks.output_dir", str(out)])
    samples = _check_unit_shards(out, UNITS)
    assert len(samples) == 12
    rows = {r["id"]: r for r in map(json.loads, (out / "semantic_tokens.jsonl").read_text().splitlines())}
    for s in samples:
        assert rows[s["key"]]["codes"] == s["codes.npy"].tolist()


def test_cached_states_fit_like_audio(fitted, tiny_corpus, tmp_path):
    """``predict_output: states`` writes the cache; a fit from it promotes units of the same quality."""
    caches = {}
    for split in ("train", "val"):
        caches[split] = tmp_path / "states" / split
        cli(["predict", "--config", str(fitted["config"]), "--model.init_args.predict_output", "states",
             "--data.init_args.predict_shards", str(tiny_corpus[split]), "--trainer.logger", "false",
             "--trainer.callbacks+=stages.writers.ShardPredictionWriter",
             "--trainer.callbacks.output_dir", str(caches[split]), "--trainer.callbacks.kind", "states"])
    assert all(s["states.npy"].shape[1] == 64 for s in _samples(caches["val"]))
    run_dir = tmp_path / "from_states"
    config = _config({**tiny_corpus, **caches}, run_dir, fields="states")
    cli(["fit", "--config", str(config), "--model.init_args.encoder", "null"])
    audio = json.loads((fitted["artifact"] / "metrics.json").read_text())
    cached = json.loads((run_dir / "artifacts" / "stage1_kmeans" / "current" / "metrics.json").read_text())
    # float16 states, so not bit-equal: the same fit within a few per cent of the inertia.
    assert cached["val/quant_error_ratio"] == pytest.approx(audio["val/quant_error_ratio"], rel=0.1, abs=0.02)


def test_artifact_sizes_must_agree_and_too_many_units_are_refused(fitted):
    from models.kmeans import KMeansUnits
    from stages.stage1_kmeans import KMeansStage

    with pytest.raises(ValueError, match="codebook_size=16 but the config asks for 8"):
        KMeansStage(artifact=str(fitted["artifact"]), quantizer=KMeansUnits(dim=64, codebook_size=8, init_frames=8))
    with pytest.raises(ValueError, match="at most 137468"):
        KMeansStage(quantizer=KMeansUnits(dim=2, codebook_size=137469, init_frames=137469))


# ---------------------------------------------------------------------------------------------
# The shipped configs through the CLI (subprocesses under a timeout, like test_real_configs.py).


@pytest.fixture
def lightning(run_command):
    """``lightning(cwd, *args)``: ``python -m stages *args`` (the ``lightning`` command) under the timeout."""
    return lambda cwd, *args: run_command([sys.executable, "-m", "stages", *args], cwd, timeout=TIMEOUT)


TWI = ("fin", "bible", "news", "radio", "stories")
TRAIN_LIST = "[" + ",".join(f"data/twi/{c}/train" for c in TWI) + "]"


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def real_root(request, tmp_path_factory, speech_shard_writer):
    from transformers import HubertModel

    from demo.tiny import hubert_debug_config

    root = tmp_path_factory.mktemp(f"kmeans_real{request.param}")
    torch.manual_seed(0)
    HubertModel(hubert_debug_config(num_hidden_layers=24)).save_pretrained(root / "models" / "hubert")
    for i, corpus in enumerate(TWI):
        speech_shard_writer(root / "data" / "twi" / corpus / "train", n=6 if corpus == "fin" else 4, seed=10 + i, per_shard=3)
    speech_shard_writer(root / "data" / "twi" / "shards" / "val", n=8, seed=1, per_shard=4)
    return root, request.param


REAL_TINY = ["--model.init_args.encoder.init_args.source", "models/hubert",
             "--model.init_args.quantizer.init_args.dim", "32",
             "--model.init_args.quantizer.init_args.codebook_size", str(UNITS),
             "--model.init_args.quantizer.init_args.init_frames", "256",
             "--data.init_args.num_workers", "1"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_real_config_fit_validate_promote_predict_then_stage2(real_root, lightning, run_command):
    root, world = real_root
    config = str(REPO / "configs" / "stage1_kmeans.yaml")
    device = ["--trainer.accelerator", "cpu", "--trainer.devices", str(world)]
    lightning(root, "fit", "--config", config, *device, "--trainer.max_epochs", "2", *REAL_TINY)
    artifact = root / "artifacts" / "stage1_kmeans" / "current"
    info = json.loads((artifact / "config.json").read_text())["info"]
    assert info["encoder"]["layer"] == 22 and info["encoder"]["source"] == "models/hubert"
    assert (info["num_quantizers"], info["codebook_size"], info["dim"]) == (1, UNITS, 32)
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["val/utilisation"] >= 0.5 and metrics["val/quant_error_ratio"] <= 0.8  # the file's gates
    provenance = json.loads((artifact / "provenance.json").read_text())
    assert {s["weight"] for s in provenance["data"]["sources"]} == {1.0, 1.7, 2.0, 2.5}

    run_dir = sorted((root / "runs" / "stage1_kmeans").glob("version_*"))[0]
    final = run_dir / "checkpoints" / "final.ckpt"
    out = lightning(root, "validate", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(final),
                     "--trainer.logger", "false")
    assert "val/quant_error_ratio" in out
    promoted = json.loads(run_command([str(BIN / "speechless-promote"), "--config", str(run_dir / "config.yaml"),
                                       "--ckpt_path", str(final), "--force"], root, timeout=TIMEOUT).strip().splitlines()[-1])
    assert promoted["current"]

    for split, shards in (("train", TRAIN_LIST), ("val", "data/twi/shards/val")):
        lightning(root, "predict", "--config", config, *device, "--model.init_args.artifact", "artifacts/stage1_kmeans/current",
                   *REAL_TINY, "--data.init_args.predict_shards", shards,
                   "--trainer.callbacks+=stages.writers.ShardPredictionWriter",
                   "--trainer.callbacks.output_dir", f"data/twi/tokens/{split}")
    speech = sum(resolve_shards(root / f"data/twi/{c}/train").samples for c in TWI)
    assert len(_check_unit_shards(root / "data/twi/tokens/train", UNITS)) == speech  # each utterance once
    if world > 1:
        return  # stage 2's own configs are run on 2 ranks by test_real_configs.py

    # Stage 2 on the units: the one-level SpeechLM (Ichigo strings with duration tokens) over this artifact.
    from demo.tiny import save_gemma3_lm_debug

    lm = save_gemma3_lm_debug(root / "models" / "stage2_lm", [f"word{i}" for i in range(5)] * 4, hidden_size=64)
    lightning(root, "fit", "--config", str(REPO / "configs" / "stage2_speechless.yaml"), *device,
               "--trainer.max_epochs", "3", "--model.init_args.stage1_artifact", "artifacts/stage1_kmeans/current",
               "--model.init_args.lm.init_args.lm", str(lm), "--model.init_args.lm.init_args.tokenizer", str(lm),
               "--model.init_args.lm.init_args.num_levels", "1", "--model.init_args.lm.init_args.codebook_size", str(UNITS),
               "--model.init_args.lm.init_args.output_form", "one_level",
               "--model.init_args.lm.init_args.length_conditioning", "false",
               "--model.init_args.lm.init_args.text_alignment", "false",
               "--model.init_args.gen_max_frames", "40", "--data.init_args.num_workers", "0",
               # The file's gates are the RVQ's figures; a 3-epoch tiny LM is not held to them here.
               "--promote.force_gates", "true")
    stage2 = root / "artifacts" / "stage2" / "current"
    s2 = json.loads((stage2 / "config.json").read_text())["info"]
    assert (s2["output_form"], s2["num_levels"], s2["codebook_size"]) == ("one_level", 1, UNITS)
    assert "stage1_kmeans" in s2["stage1"]["path"]
    assert "val/gen_cosine" in json.loads((stage2 / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_config_on_pretrained_whisper_tiny_en(tmp_path, speech_shard_writer, lightning):
    import warnings

    from models.pretrained_whisper import pretrained_whisper

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whisper = pretrained_whisper()
    if whisper is None:
        pytest.skip("needs the pretrained extra (Whisper tiny.en)")
    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "data" / "models" / "whisper-tiny.en").symlink_to(whisper, target_is_directory=True)
    for split, n, seed in (("train", 60, 0), ("val", 30, 1)):
        speech_shard_writer(tmp_path / "data" / "demo" / "shards" / split, n=n, seed=seed, per_shard=20)
    config = str(REPO / "configs" / "demo" / "whisper_stage1_kmeans.yaml")
    lightning(tmp_path, "fit", "--config", config, "--trainer.max_epochs", "2")
    artifact = tmp_path / "artifacts" / "whisper" / "stage1_kmeans" / "current"
    info = json.loads((artifact / "config.json").read_text())["info"]
    assert info["encoder"]["kind"] == "whisper" and info["codebook_size"] == 128
    lightning(tmp_path, "predict", "--config", config, "--model.init_args.artifact", "artifacts/whisper/stage1_kmeans/current",
               "--data.init_args.predict_shards", "data/demo/shards/val",
               "--trainer.callbacks+=stages.writers.ShardPredictionWriter",
               "--trainer.callbacks.output_dir", "data/demo/whisper/units/val")
    samples = _check_unit_shards(tmp_path / "data/demo/whisper/units/val", 128)
    # 25 frames/s over the clip's own length (the 1 s of silence the encoder adds is not tokenized).
    for s in samples:
        assert s["json"]["n_frames"] == pytest.approx(25 * s["json"]["duration"], abs=1.5)
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["val/utilisation"] >= 0.3 and metrics["val/quant_error_ratio"] <= 0.8  # the file's gates


def test_a_checkpoint_taken_before_kmeans_plusplus_resumes_exactly():
    """The init buffer and the generator ride in the checkpoint: stop, restore, go on == never stopped."""
    from models.kmeans import KMeansUnits
    from stages.stage1_kmeans import KMeansStage

    def stage() -> KMeansStage:
        return KMeansStage(quantizer=KMeansUnits(dim=8, codebook_size=6, init_frames=60, reassign_every=30, seed=5)).train()

    def batch(step: int) -> dict:
        g = torch.Generator().manual_seed(step)
        return {"states": torch.randn(2, 15, 8, generator=g), "state_lengths": torch.tensor([15, 11])}

    full = stage()
    def step_(module: KMeansStage, step: int) -> None:  # a training step's work, without a Trainer to log to
        module.quantizer(*module.states(batch(step)))

    for step in range(6):
        step_(full, step)
    first = stage()
    for step in range(2):  # 26 frames a step: the 60-frame buffer fills at the third
        step_(first, step)
    assert not bool(first.quantizer.initialized)
    checkpoint = {"state_dict": {k: v.clone() for k, v in first.state_dict().items()}}
    first.on_save_checkpoint(checkpoint)
    checkpoint = torch.load(io.BytesIO(_saved(checkpoint)), weights_only=True)  # what a .ckpt holds
    resumed = stage()
    resumed.load_state_dict(checkpoint["state_dict"])
    resumed.on_load_checkpoint(checkpoint)
    for step in range(2, 6):
        step_(resumed, step)
    for name, value in full.quantizer.state_dict().items():
        assert torch.equal(value, resumed.quantizer.state_dict()[name]), name


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
