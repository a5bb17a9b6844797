"""``speechless-init``'s configs: the stage YAMLs with the paths and sizes a corpus's shard index implies.

:class:`Corpus` reads every duration from the shard indexes; :func:`derive` turns them into the
corpus-dependent settings (stage-2 generation guard, batch seconds, length buckets, ``gen_batches``,
the k-means buffer), each with where it came from; :func:`stage_configs` writes them into the real
configs (or, with ``--tiny``, the demo ones) and points every path into the run folder.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from datamodules.shards import read_index
from stages.init_splits import SPLITS

__all__ = ["NAMES", "TEMPLATES", "Corpus", "config_header", "derive", "stage_configs"]

ROOT = Path(__file__).resolve().parents[1]
FRAME_RATE = 25.0  # frames/s of every encoder init sets up: Gemma 4 audio (40 ms), Whisper pooled x2
TEMPLATES = {
    "real": ("configs/stage1_rvq.yaml", "configs/stage2_speechless.yaml", "configs/stage3_llm.yaml"),
    "gemma4-tiny": ("configs/demo/stage1_rvq.yaml", "configs/demo/stage2_speechless.yaml",
                    "configs/demo/stage3_llm.yaml"),
    "whisper-tiny": ("configs/demo/whisper_stage1_rvq.yaml", "configs/demo/whisper_stage2_speechless.yaml",
                     "configs/demo/whisper_stage3_llm.yaml"),
}  # fmt: skip
NAMES = ("stage1_rvq", "stage2_speechless", "stage3_llm")
# Batch targets of the tiny (CPU) configs, in utterances of the 90th-percentile duration.
TINY_BATCH = {"stage1": 16, "stage2": 8}
GEN_UTTERANCES = 64  # utterances per rank that stage-2 validation/test generate (gen_batches)
GEN_MARGIN = 1.25  # generation guard: the longest utterance's frames x this


@dataclass(frozen=True)
class Corpus:
    """Durations (seconds) per split, from the shard indexes, and the run's language."""

    durations: dict[str, list[float]]
    language: str

    @classmethod
    def from_shards(cls, shards: Path, folders: dict[str, str], language: str) -> Corpus:
        durations = {}
        for split in SPLITS:
            index = read_index(shards / folders[split])
            durations[split] = [
                d for s in index.shards for d in (s.durations or [s.seconds / max(1, s.samples)] * s.samples)
            ]
        return cls(durations, language)

    @property
    def all(self) -> list[float]:
        return [d for split in SPLITS for d in self.durations[split]]

    def quantile(self, q: float, split: str | None = None) -> float:
        values = sorted(self.durations[split] if split else self.all)
        return values[min(len(values) - 1, int(q * len(values)))]


def _up(value: float, step: float) -> float:
    return round(math.ceil(value / step - 1e-9) * step, 6)


def derive(
    corpus: Corpus, *, tiny: bool, template: dict[str, dict], epochs: int | None
) -> dict[str, tuple[Any, str]]:
    """The corpus-dependent settings: ``{"<stage> <field>": (value, where it came from)}``.

    Args:
        corpus: durations per split.
        tiny: demo-size (CPU) batches; else the real configs' GPU budgets are kept.
        template: the stage configs before substitution (``stage1``/``stage2``/``stage3``).
        epochs: ``--epochs`` (stage 2 then validates at least once).
    """
    longest, p90, p50 = max(corpus.all), corpus.quantile(0.9), corpus.quantile(0.5)
    train_s = sum(corpus.durations["train"])
    d: dict[str, tuple[Any, str]] = {}
    frames = math.ceil(longest * FRAME_RATE)
    d["stage2 gen_max_frames"] = (
        int(_up(frames * GEN_MARGIN, 10)),
        f"longest utterance {longest:.2f} s = {frames} frames at {FRAME_RATE:g}/s, x {GEN_MARGIN}",
    )
    for stage in ("stage1", "stage2"):
        data = template[stage]["data"]["init_args"]
        if tiny:
            n = TINY_BATCH[stage]
            seconds = max(_up(n * p90, 0.5), _up(longest, 0.5))
            d[f"{stage} max_batch_seconds"] = (
                seconds,
                f"{n} utterances of the 90th-percentile duration {p90:.2f} s",
            )
        else:
            seconds = float(data["max_batch_seconds"])
            d[f"{stage} max_batch_seconds"] = (seconds, "the real config's per-GPU budget (kept)")
        edges = sorted({_up(corpus.quantile(q, "train"), 0.1) for q in (0.25, 0.5, 0.75)})
        d[f"{stage} bucket_boundaries"] = (edges, "quartiles of the training durations")
    per_batch = max(1, min(int(template["stage2"]["data"]["init_args"]["max_batch_size"]),
                           int(d["stage2 max_batch_seconds"][0] // max(p50, 1e-3))))  # fmt: skip
    d["stage2 gen_batches"] = (
        max(1, math.ceil(GEN_UTTERANCES / per_batch)),
        f"~{GEN_UTTERANCES} generated utterances per rank at ~{per_batch} per batch (median {p50:.2f} s)",
    )
    rvq = template["stage1"]["model"]["init_args"]["quantizer"]["init_args"]
    train_frames = int(train_s * FRAME_RATE)
    d["stage1 kmeans_buffer_frames"] = (
        min(int(rvq["kmeans_buffer_frames"]), max(64, int(0.9 * train_frames))),
        f"the config's {rvq['kmeans_buffer_frames']}, at most 90 % of the "
        f"{train_frames} training frames (k-means starts within the first epoch)",
    )
    n_val = len(corpus.durations["val"])
    d["stage3 eval_max_samples"] = (
        None if tiny or n_val <= 256 else 256,
        f"{n_val} val utterances" + ("" if tiny or n_val <= 256 else ", capped at 256"),
    )
    if epochs is not None:
        every = int(template["stage2"]["trainer"].get("check_val_every_n_epoch", 1))
        d["stage2 check_val_every_n_epoch"] = (
            min(every, epochs),
            f"--epochs {epochs}: validate at least once",
        )
    return d


# ---- configs ----------------------------------------------------------------------------------


def _callback(config: dict, suffix: str) -> dict:
    for cb in config["trainer"].get("callbacks") or []:
        if cb["class_path"].endswith(suffix):
            return cb["init_args"]
    raise KeyError(f"no {suffix} callback in the template")


def stage_configs(
    *,
    out: Path,
    corpus: Corpus,
    folders: dict[str, str],
    tiny: bool,
    encoder: str,
    models: dict[str, str],
    epochs: int | None,
    max_steps: int | None,
    text_jsonl: str | None,
) -> tuple[dict[str, dict], dict[str, tuple[Any, str]]]:
    """The three stage configs for this corpus and the derived values (see :func:`derive`)."""
    kind = encoder if tiny else "real"
    template = {f"stage{i + 1}": yaml.safe_load((ROOT / TEMPLATES[kind][i]).read_text()) for i in range(3)}
    derived = derive(corpus, tiny=tiny, template=template, epochs=epochs)
    value = {k: v for k, (v, _) in derived.items()}
    shards = {s: str(out / "shards" / folders[s]) for s in SPLITS}
    stage1_art = str(out / "artifacts" / "stage1" / "current")
    configs = copy.deepcopy(template)
    for stage, config in configs.items():
        trainer = config["trainer"]
        trainer["logger"]["init_args"]["save_dir"] = str(out / "logs")
        trainer["logger"]["init_args"]["name"] = stage
        _callback(config, "Promote")["artifacts_dir"] = str(out / "artifacts")
        if epochs is not None:
            trainer["max_epochs"] = epochs
        if max_steps is not None:
            trainer["max_steps"] = max_steps
        if stage != "stage1":
            config["model"]["init_args"]["stage1_artifact"] = stage1_art
    # stage 1: RVQ over the frozen encoder, on the prepared speech
    s1 = configs["stage1"]
    s1["data"]["init_args"].update(train_shards=shards["train"], val_shards=shards["val"], test_shards=shards["test"],
                                   max_batch_seconds=value["stage1 max_batch_seconds"],
                                   bucket_boundaries=value["stage1 bucket_boundaries"])  # fmt: skip
    s1["model"]["init_args"]["quantizer"]["init_args"]["kmeans_buffer_frames"] = value[
        "stage1 kmeans_buffer_frames"
    ]
    if "encoder" in models:
        s1["model"]["init_args"]["encoder"]["init_args"]["source"] = models["encoder"]
    # stage 2: text -> tokens, on the stage-1 tokens of the same splits
    s2 = configs["stage2"]
    tokens = {s: str(out / "tokens" / s) for s in SPLITS}
    s2["data"]["init_args"].update(train_shards=tokens["train"], val_shards=tokens["val"], test_shards=tokens["test"],
                                   max_batch_seconds=value["stage2 max_batch_seconds"],
                                   bucket_boundaries=value["stage2 bucket_boundaries"])  # fmt: skip
    m2 = s2["model"]["init_args"]
    m2.update(gen_max_frames=value["stage2 gen_max_frames"], gen_batches=value["stage2 gen_batches"],
              asr_language=corpus.language)  # fmt: skip
    if "stage2 check_val_every_n_epoch" in value:
        s2["trainer"]["check_val_every_n_epoch"] = value["stage2 check_val_every_n_epoch"]
    if encoder == "whisper-tiny" and tiny and not corpus.language.lower().startswith("en"):
        m2["asr_decoder"] = (
            None  # Whisper tiny.en reads English only: its WER of another language means nothing
        )
        derived["stage2 asr_decoder"] = (
            None,
            f"Whisper tiny.en is English-only; the corpus is {corpus.language!r}",
        )
    if "stage2_lm" in models:
        m2["lm"]["init_args"].update(lm=models["stage2_lm"], tokenizer=models["stage2_lm"])
    # stage 3: the open task "repeat" on stage 2's synthetic speech, validated on real held-out speech
    s3 = configs["stage3"]
    m3 = s3["model"]["init_args"]
    m3.update(eval_audio_shards=shards["val"], eval_task="repeat", eval_language=corpus.language,
              eval_max_samples=value["stage3 eval_max_samples"])  # fmt: skip
    if "stage3_llm" in models:
        m3["llm"]["init_args"]["model"] = models["stage3_llm"]
    s3["data"]["init_args"].update(
        train_shards=str(out / "synthetic" / "train"), val_shards=str(out / "synthetic" / "val"),
        text_jsonl=text_jsonl, text_ratio=s3["data"]["init_args"].get("text_ratio", 0.0) if text_jsonl else 0.0,
        instruction_key="instruction", response_key=None, closed_task="repeat",
    )  # fmt: skip
    checkpoint = _callback(s3, "ModelCheckpoint")
    checkpoint.update(monitor="val/spoken_wer", mode="min")
    promote = _callback(s3, "Promote")
    promote.update(compare_metric="val/spoken_wer", compare_mode="min")
    promote["gates"].pop("val/spoken_accuracy", None)  # a digit-task gate
    if tiny:
        _callback(s1, "Promote")["gates"].pop("val/cosine", None)
        _callback(s2, "Promote")["gates"].pop("val/gen_cosine", None)
    return configs, derived


def config_header(stage: str, kind: str, out: Path, derived: dict[str, tuple[Any, str]], tiny: bool) -> str:
    """The comment block that opens a written stage YAML: its template, the command, each derived value."""
    lines = [f"# {stage} for the corpus prepared in {out}, written by speechless-init from {TEMPLATES[kind][int(stage[-1]) - 1]}",
             "# (that file's comments say what each field means). Run from the folder speechless-init ran in:",
             f"#   lightning fit --config {out / 'configs' / (NAMES[int(stage[-1]) - 1] + '.yaml')}",
             "# Derived from the corpus's shard index (value: where it came from):"]  # fmt: skip
    for key, (value, source) in derived.items():
        if key.startswith(stage + " "):
            lines.append(f"#   {key.split(' ', 1)[1]}: {json.dumps(value)}  ({source})")
    if stage == "stage3":
        lines.append("#   eval_task: repeat  (the answer is the transcript: an open task any corpus has; "
                     "val/spoken_wer on real val speech picks the checkpoint and the version to keep; "
                     "the demo's digit-accuracy gate is left out)")  # fmt: skip
    if tiny and stage in ("stage1", "stage2"):
        gate = "val/cosine >= 0.7" if stage == "stage1" else "val/gen_cosine >= 0.1"
        lines.append(f"# Gates: the demo's quality gate {gate} was set for spoken digits and is left out for a "
                     "tiny run on another corpus (a few CPU epochs would fail it and stop the chain with exit 4); "
                     "the data gates (and stage 1's utilisation gate) stay.")  # fmt: skip
    return "\n".join(lines) + "\n"
