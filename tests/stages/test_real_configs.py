"""Every shipped real config runs through the CLI: fit on 1 and on 2 gloo ranks, validate, promote, predict.

Each test runs the very file in ``configs/`` with ``python -m stages`` (the ``lightning`` command) in
a fresh working folder, overriding only:

- the model sources: tiny random-weight models saved to the folder (the real ones are hub ids), and
  the model sizes that must match them (RVQ width and codebook size);
- the data: tiny speech shards laid out at the config's own relative paths (``data/twi/...``), so no
  data path is overridden at all, and ``num_workers`` (two cores here: 1 for stage 1, 0 for stage 2);
- the device: ``--trainer.accelerator cpu --trainer.devices N``; the file's own strategy, precision
  (``bf16-mixed`` runs on the CPU), accumulation, callbacks and gates are kept;
- the step count (``max_epochs``).

The chain is the one a user runs: stage 1 fit (best/final/averaged validated, gated promotion) and
tokenization, stage 2 fit and synthesis of instructions, stage 3 fit on the synthetic speech and
``speechless-infer`` on real audio. Every command is a subprocess under a timeout, so a hang at the
end of a multi-rank fit fails the test instead of stalling CI. Marked ``slow`` (skip locally with
``-m "not slow"``; CI runs them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from datamodules.shards import iter_tar_samples, resolve_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
BIN = Path(sys.executable).parent
STEP_TIMEOUT = 420  # seconds for one command; a hang becomes a failure

LEVELS, CODES = 8, 32  # the real 8 levels; 32 codes per level (2048 would need far more frames)
TWI_CORPORA = ("fin", "bible", "news", "radio", "stories")  # configs/stage1_rvq.yaml's mix
WORDS = [f"word{i}" for i in range(5)]  # the texts of write_speech_shards
TRAIN_LIST = "[" + ",".join(f"data/twi/{c}/train" for c in TWI_CORPORA) + "]"  # the header's tokenize command


def run(cmd: list[str], cwd: Path, env: dict[str, str], *, ok: tuple[int, ...] = (0,)) -> str:
    # A session of its own, so that a timeout kills every rank and DataLoader worker, not just rank 0.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out (a hang?) after {STEP_TIMEOUT} s: {' '.join(cmd)}\n{_tail(stderr)}")
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if out.returncode not in ok:
        pytest.fail(f"exit {out.returncode}: {' '.join(cmd)}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{_tail(out.stderr)}")
    return out.stdout


def _tail(text: str, n: int = 60) -> str:
    """The last lines that are not Lightning's per-metric sync_dist advice."""
    lines = [line for line in text.splitlines() if "sync_dist" not in line and "it/s]" not in line]
    return "\n".join(lines[-n:])


def lightning(cwd: Path, env: dict[str, str], *args: str) -> str:
    return run([sys.executable, "-m", "stages", *args], cwd, env)


class Chain:
    """The real-config chain in one working folder, each step run once and cached."""

    def __init__(self, root: Path, world: int, write_shards, env: dict[str, str]) -> None:
        self.root, self.world, self.env = root, world, env
        self.device = ["--trainer.accelerator", "cpu", "--trainer.devices", str(world)]
        self.done: dict[str, object] = {}
        self._write_shards = write_shards

    def once(self, name: str, fn):
        if name not in self.done:
            self.done[name] = fn()
        return self.done[name]

    # ---- models and data -------------------------------------------------------------------
    def models(self) -> dict[str, Path]:
        def build() -> dict[str, Path]:
            from demo.tiny import save_gemma3_lm_debug, save_gemma4_audio_debug, save_gemma4_stage3_debug

            models = self.root / "models"
            encoder = save_gemma4_audio_debug(models / "gemma4_audio", seed=0, num_hidden_layers=1,
                                             subsampling_conv_channels=[128, 32])
            texts = WORDS * 4 + ["Say the next number.", "next"]
            return {
                "encoder": encoder,
                "stage2_lm": save_gemma3_lm_debug(models / "stage2_lm", texts, hidden_size=64, num_layers=2),
                "gemma4": save_gemma4_stage3_debug(models / "gemma4", encoder_dir=encoder, texts=texts),
            }

        return self.once("models", build)

    def data(self) -> None:
        def build() -> None:
            twi = self.root / "data" / "twi"
            for i, corpus in enumerate(TWI_CORPORA):
                self._write_shards(twi / corpus / "train", n=6 if corpus == "fin" else 4, seed=10 + i, per_shard=3)
            self._write_shards(twi / "shards" / "val", n=8, seed=1, per_shard=4)
            self._write_shards(twi / "shards" / "test", n=4, seed=2, per_shard=4)
            raw = self.root / "data" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            with open(raw / "instructions.jsonl", "w") as f:
                for i in range(10):
                    f.write(json.dumps({"id": f"ins{i}", "instruction": WORDS[i % 5], "response": WORDS[(i + 1) % 5]}) + "\n")
            with open(raw / "text_instructions.jsonl", "w") as f:
                for i in range(4):
                    f.write(json.dumps({"instruction": f"{WORDS[i]} then?", "response": WORDS[i + 1]}) + "\n")

        self.once("data", build)

    # ---- stage 1 ---------------------------------------------------------------------------
    def stage1(self) -> Path:
        def build() -> Path:
            models, _ = self.models(), self.data()
            config = str(CONFIGS / "stage1_rvq.yaml")
            tiny = [
                "--model.init_args.encoder.init_args.source", str(models["encoder"]),
                "--model.init_args.quantizer.init_args.dim", "64",
                "--model.init_args.quantizer.init_args.codebook_size", str(CODES),
                "--model.init_args.quantizer.init_args.kmeans_buffer_frames", "256",
            ]
            lightning(self.root, self.env, "fit", "--config", config, *self.device, "--trainer.max_epochs", "3", *tiny,
                      "--data.init_args.num_workers", "1")
            artifact = self.root / "artifacts" / "stage1" / "current"
            assert (artifact / "config.json").exists(), "stage 1 did not promote"
            # Tokenize as the config's header says, into the folders the stage-2 config reads.
            for split, shards in (("train", TRAIN_LIST), ("val", "data/twi/shards/val")):
                lightning(
                    self.root, self.env, "predict", "--config", config, *self.device,
                    "--model.init_args.artifact", "artifacts/stage1/current", *tiny,
                    "--data.init_args.predict_shards", shards, "--data.init_args.num_workers", "1",
                    "--trainer.callbacks+=stages.writers.ShardPredictionWriter",
                    "--trainer.callbacks.output_dir", f"data/twi/tokens/{split}",
                )
            return artifact

        return self.once("stage1", build)

    # ---- stage 2 ---------------------------------------------------------------------------
    def stage2(self) -> Path:
        def build() -> Path:
            models, _ = self.models(), self.stage1()
            config = str(CONFIGS / "stage2_speechless.yaml")
            lm = str(models["stage2_lm"])
            lightning(
                self.root, self.env, "fit", "--config", config, *self.device, "--trainer.max_epochs", "4",
                "--model.init_args.lm.init_args.lm", lm, "--model.init_args.lm.init_args.tokenizer", lm,
                "--model.init_args.lm.init_args.codebook_size", str(CODES),
                "--model.init_args.gen_max_frames", "40", "--data.init_args.num_workers", "0",
            )
            artifact = self.root / "artifacts" / "stage2" / "current"
            assert (artifact / "config.json").exists(), "stage 2 did not promote"
            for split in ("train", "val"):
                lightning(
                    self.root, self.env, "predict", "--config", config, *self.device,
                    "--model.init_args.artifact", "artifacts/stage2/current", "--model.init_args.lm", "null",
                    "--data", "datamodules.text.TextInstructionDataModule",
                    "--data.init_args.path", "data/raw/instructions.jsonl",
                    "--trainer.callbacks+=stages.writers.ShardPredictionWriter",
                    "--trainer.callbacks.output_dir", f"data/synthetic/{split}",
                    "--trainer.callbacks.prefix", "synthetic", "--trainer.callbacks.jsonl_name", "synthetic.jsonl",
                )
            return artifact

        return self.once("stage2", build)

    # ---- stage 3 ---------------------------------------------------------------------------
    def stage3(self) -> Path:
        def build() -> Path:
            models, _ = self.models(), self.stage2()
            lightning(
                self.root, self.env, "fit", "--config", str(CONFIGS / "stage3_llm.yaml"), *self.device,
                "--trainer.max_epochs", "2",
                "--model.init_args.llm.init_args.model", str(models["gemma4"]),
                "--model.init_args.llm.init_args.codebook_size", str(CODES),
            )
            artifact = self.root / "artifacts" / "stage3" / "current"
            assert (artifact / "llm" / "adapter").is_dir() and (artifact / "llm" / "merged").is_dir()
            return artifact

        return self.once("stage3", build)

    def wav(self) -> Path:
        path = self.root / "question.wav"
        if not path.exists():
            raw = next(iter_tar_samples(resolve_shards(self.root / "data/twi/shards/test").paths()[0]))
            import io

            wave, rate = sf.read(io.BytesIO(raw["flac"]), dtype="float32")
            sf.write(path, wave, rate)
        return path


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def chain(request, tmp_path_factory, speech_shard_writer, offline_env):
    return Chain(tmp_path_factory.mktemp(f"real{request.param}"), request.param, speech_shard_writer, offline_env())


def _checkpoint_metrics(root: Path, stage: str) -> dict:
    files = sorted((root / "runs" / stage).glob("version_*/checkpoint_metrics.json"))
    assert files, f"no checkpoint_metrics.json under runs/{stage}"
    return json.loads(files[-1].read_text())


def test_stage1_real_config(chain):
    artifact = chain.stage1()
    table = _checkpoint_metrics(chain.root, "stage1")
    assert set(table["metrics"]) == {"best", "final", "averaged"}
    info = json.loads((artifact / "config.json").read_text())["info"]
    assert info["num_quantizers"] == LEVELS and info["codebook_size"] == CODES
    provenance = json.loads((artifact / "provenance.json").read_text())
    assert {s["weight"] for s in provenance["data"]["sources"]} == {1.0, 1.7, 2.0, 2.5}
    # Clean data: zero skips, over every use of every utterance the weights ask for in 3 exact epochs,
    # summed over the ranks, and one pass over the val set (the sanity batches are not counted).
    skipped = provenance["data"]["skipped"]
    assert skipped["train"] == {"reasons": {}, "total": 0, "fraction": 0.0,
                                "used": 3 * sum(s["epoch_samples"] for s in provenance["data"]["sources"])}
    assert skipped["val"]["total"] == 0 and skipped["val"]["used"] == 8
    for split, corpora in (("train", [f"data/twi/{c}/train" for c in TWI_CORPORA]), ("val", ["data/twi/shards/val"])):
        tokens = json.loads((chain.root / "data" / "twi" / "tokens" / split / "index.json").read_text())
        speech = sum(resolve_shards(chain.root / c).samples for c in corpora)
        assert sum(s["samples"] for s in tokens["shards"]) == speech  # every utterance once, over all ranks


def test_stage1_validate_and_promote_commands(chain):
    """The README's ``lightning validate`` and ``speechless-promote`` over the fit's saved config."""
    chain.stage1()
    run_dir = sorted((chain.root / "runs" / "stage1").glob("version_*"))[0]
    averaged = run_dir / "checkpoints" / "averaged.ckpt"
    out = lightning(chain.root, chain.env, "validate", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(averaged),
                    "--trainer.logger", "false")
    assert "val/cosine" in out
    out = run([str(BIN / "speechless-promote"), "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(averaged),
               "--force"], chain.root, chain.env)
    promoted = json.loads(out.strip().splitlines()[-1])
    assert promoted["current"] and (chain.root / promoted["artifact"]).is_dir()  # relative to the run's folder


def test_stage2_real_config(chain):
    chain.stage2()
    table = _checkpoint_metrics(chain.root, "stage2")
    assert {"best", "final", "averaged"} <= set(table["metrics"])
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (chain.root / "data" / "synthetic" / split / "synthetic.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(f"ins{i}" for i in range(10))  # each instruction once


def test_stage3_real_config_answers_real_speech(chain):
    artifact = chain.stage3()
    info = json.loads((artifact / "config.json").read_text())["info"]
    assert info["input_mode"] == "embeddings" and info["num_levels"] == LEVELS
    out = run([str(BIN / "speechless-infer"), "--artifact", str(artifact), "--stage1", "artifacts/stage1/current",
               "--audio", str(chain.wav()), "--max-new-tokens", "3"], chain.root, chain.env)
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(answers) == 1 and "answer" in answers[0]


def test_real_config_gates_are_kept(chain):
    """The override list above never touches the gates: the promoted artifacts passed the file's own."""
    chain.stage2()
    for stage, gates in (("stage1", {"val/cosine": 0.95, "val/utilisation": 0.3}), ("stage2", {"val/gen_cosine": 0.5})):
        metrics = json.loads((chain.root / "artifacts" / stage / "current" / "metrics.json").read_text())
        for key, minimum in gates.items():
            assert metrics[key] >= minimum, (stage, key, metrics[key])
        assert metrics["skipped/train/fraction"] == 0 and metrics["skipped/val/fraction"] == 0, stage

