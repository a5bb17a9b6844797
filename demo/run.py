"""The embedded demo: the whole pipeline on a corpus this project makes itself, on a CPU.

``bash scripts/demo.sh`` (or ``python -m demo``) runs, printing each command it runs:

1. ``speechless-demo-corpus``: spoken digits by 12 synthetic speakers (espeak-ng), speaker-disjoint
   train/val/test splits;
2. ``speechless-prepare``: 16 kHz flac WebDataset shards with an index;
3. tiny random-weight models saved to ``data/<corpus>/models`` so the real loading code runs;
4. stage 1: ``lightning fit --config configs/demo/stage1_rvq.yaml`` (fit, best/final/averaged
   checkpoints validated, gated promotion to ``artifacts/stage1/current``), then tokenization of
   every split with ``lightning predict`` from the promoted artifact;
5. stage 2 (fit, test, synthesis of the spoken instructions) and stage 3 (fit on the synthetic
   speech, answers to the real speech of the held-out test speakers).

Steps 3-5 run once per encoder (``--encoder both``, the default): ``gemma4-tiny`` (a tiny random
Gemma 4 audio encoder, ``configs/demo/*.yaml``: the real configs' path) and ``whisper-tiny`` (the
pretrained Whisper tiny.en of the ``pretrained`` extra, converted once into
``data/models/whisper-tiny.en``; ``configs/demo/whisper_*.yaml``, stage 3 through a projector into a
text-only LM; outputs under ``whisper/`` folders). Without the extra, the Gemma 4 path runs alone
and the demo prints why. A table of both encoders' figures, with chance beside each, ends the run.

``--corpus fsdd`` runs the same on ``../shared/data/fsdd`` (five speakers train, the sixth is held out
for the final test), writing under ``data/fsdd``, ``runs/fsdd`` and ``artifacts/fsdd``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from demo.tasks import ANSWER_FIELD, CLOSED_TASK, next_digit
from demo.tiny import save_gemma3_lm_debug, save_gemma4_audio_debug, save_gemma4_stage3_debug
from stages.metrics import chance_wer

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
# Where data/, runs/ and artifacts/ go (``--workdir``; the repository by default). The configs'
# paths are relative, so every command runs there.
WORK = ROOT


def run(cmd: list[str], *, ok_codes: tuple[int, ...] = (0,)) -> int:
    """Run one step as a user would, echoing the command."""
    # `python -m stages ...` is the `lightning` command; show it the way a user types it.
    shown = ["lightning", *cmd[3:]] if cmd[1:3] == ["-m", "stages"] else [Path(cmd[0]).name, *cmd[1:]]
    print(f"\n$ {shlex.join(shown)}", flush=True)
    start = time.time()
    code = subprocess.call(cmd, cwd=WORK)
    print(f"[demo] {shown[0]} {shown[1] if len(shown) > 1 else ''}: {time.time() - start:.0f} s", flush=True)
    if code not in ok_codes:
        raise SystemExit(f"demo step failed with exit status {code}: {shlex.join(shown)}")
    return code


def lightning(*args: str) -> int:
    return run([sys.executable, "-m", "stages", *args])


def fsdd_manifest(out: Path, *, test_speaker: str = "yweweler", val_takes: int = 5, takes: int = 50) -> Path:
    """A manifest over ``../shared/data/fsdd``: five speakers train, the sixth is held out for test.

    Only the first ``takes`` of the 50 takes of each digit and speaker are used (all by default).
    Validation (checkpoint choice) uses the last ``val_takes`` of them for each training speaker, so
    the held-out speaker is never seen before the final test.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(FSDD / "manifest.tsv") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            take = int(Path(row["audio"]).stem.rsplit("_", 1)[1])
            if take >= takes:
                continue
            split = "test" if row["speaker"] == test_speaker else "val" if take >= takes - val_takes else "train"
            rows.append({**row, "audio": str(FSDD / row["audio"]), "split": split})
    path = out / "manifest.tsv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["audio", "text", "speaker", "language", "split"], delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def with_answers(manifest: Path) -> Path:
    """A copy of ``manifest`` (beside it, ``*_answers.tsv``) with the closed task's answer of each row.

    The answer column (:data:`demo.tasks.ANSWER_FIELD`) goes into every shard's json through
    ``speechless-prepare``, and from there into the token shards, so stage 3 and ``speechless-infer``
    score the demo's task as one the data carries (``exact:json:answer``): the library names no task.
    """
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        fields, rows = list(reader.fieldnames or []), list(reader)
    out = manifest.with_name(f"{manifest.stem}_answers.tsv")
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*fields, ANSWER_FIELD], delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, ANSWER_FIELD: next_digit(row["text"])} for row in rows)
    return out


def corpus_config(base: Path, corpus: str, out: Path, replace: dict[str, str]) -> Path:
    """The shipped demo config with its data/artifact paths moved to another corpus."""
    text = base.read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# generated by demo.run from {base.relative_to(ROOT)} for corpus {corpus}\n" + text)
    return out


def for_corpus(config: str, corpus: str, artifacts: str) -> str:
    """The shipped demo config, or a copy with its paths moved to another corpus."""
    if corpus == "demo":
        return config if WORK == ROOT else str(ROOT / config)
    out = WORK / "runs" / corpus / Path(config).name
    return str(corpus_config(
        ROOT / config, corpus, out,
        {"data/demo/": f"data/{corpus}/", "runs/demo": f"runs/{corpus}",
         "artifacts_dir: artifacts": f"artifacts_dir: {artifacts}", "artifacts/stage1/": f"{artifacts}/stage1/",
         "artifacts/whisper/": f"{artifacts}/whisper/"},
    ).relative_to(WORK))


def write_task_files(raw: Path) -> None:
    """The closed task's text side (spoken digit -> next digit) for a corpus that lacks it (fsdd)."""
    from demo.corpus import text_instructions

    if (raw / "instructions_train.jsonl").exists():
        return
    with open(raw / "manifest.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for split in ("train", "val", "test"):
        with open(raw / f"instructions_{split}.jsonl", "w") as f:
            for row in rows:
                if row["split"] == split:
                    rec = {"id": Path(row["audio"]).stem, "instruction": row["text"], "response": next_digit(row["text"])}
                    f.write(json.dumps(rec) + "\n")
    with open(raw / "text_instructions.jsonl", "w") as f:
        for rec in text_instructions():
            f.write(json.dumps(rec) + "\n")


def task_texts(data: Path) -> list[str]:
    """Texts a tiny demo tokenizer is trained on: instructions, responses and text-only pairs."""
    texts = []
    for name in ("instructions_train.jsonl", "instructions_val.jsonl", "instructions_test.jsonl", "text_instructions.jsonl"):
        for line in open(data / "raw" / name):
            rec = json.loads(line)
            texts += [rec["instruction"], rec["response"]]
    return texts


def report(title: str, run_dir: Path, prefer: str, keys: tuple[str, ...]) -> None:
    summary = metrics_of(run_dir)
    metrics = summary.get("metrics", {})
    chosen = metrics.get(prefer) or next(iter(metrics.values()), {})
    print(f"\n== {title} ==")
    for key in keys:
        print(f"  {key:<22} {chosen.get(key, float('nan')):.4f}")


def metrics_of(run_dir: Path) -> dict[str, Any]:
    files = sorted(run_dir.glob("version_*/checkpoint_metrics.json"), key=lambda p: p.stat().st_mtime)
    return yaml.safe_load(files[-1].read_text()) if files else {}


@dataclass(frozen=True)
class Track:
    """Where one encoder's run of the demo reads and writes (paths relative to ``WORK``).

    ``gemma4-tiny`` is the default layout (``data/<corpus>/tokens``, ``runs/<corpus>/stage1``,
    ``artifacts[/<corpus>]/stage1``); ``whisper-tiny`` puts the same under a ``whisper/`` folder of each,
    beside it, so both can be run and compared on the same shards.
    """

    encoder: str
    corpus: str
    data: str  # tokens/ and synthetic/ of this encoder
    runs: str
    artifacts: str
    configs: tuple[str, str, str]
    # Command-line overrides of each stage's config (``demo.compare`` sizes stages 2 and 3 to a
    # one-level tokenizer this way), appended to every command of that stage.
    overrides: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] = ((), (), ())
    fit_args: tuple[str, ...] = ()  # appended to every ``lightning fit`` only (e.g. ``--promote.force_gates true``)

    @property
    def shards(self) -> str:
        return f"data/{self.corpus}/shards"


def make_track(encoder: str, corpus: str) -> Track:
    base = "artifacts" if corpus == "demo" else f"artifacts/{corpus}"
    prefix, sub = ("", "") if encoder == "gemma4-tiny" else ("whisper_", "/whisper")
    configs = tuple(for_corpus(f"configs/demo/{prefix}{n}.yaml", corpus, base)
                    for n in ("stage1_rvq", "stage2_speechless", "stage3_llm"))
    return Track(encoder, corpus, f"data/{corpus}{sub}", f"runs/{corpus}{sub}", f"{base}{sub}", configs)  # type: ignore[arg-type]


def stage3_run(track: Track, source: str, devices: list[str], bin_dir: Path, teacher: str | None = None) -> float:
    """Fit stage 3 on ``source`` (``synthetic``: stage 2's spoken instructions; ``real``: the codes of the
    real training speech, with the answer each shard carries), then answer the real
    speech of the held-out test speakers; returns that accuracy.

    The real-speech run is the upper bound the method is measured against: it logs to
    ``<runs>/stage3_real`` and promotes to ``<artifacts>/real/stage3``, never replacing the
    synthetic-trained ``current``. ``teacher`` (``base`` | ``self``) adds the text teacher's KL
    (``--model.init_args.text_teacher``) for the ablation: the run logs to ``..._teacher_<t>`` and
    promotes under ``.../teacher_<t>/stage3``, so the config's own run stays the headline.
    """
    config = track.configs[2]
    extra: list[str] = []
    run_name, arts = ("stage3_real", f"{track.artifacts}/real") if source == "real" else ("stage3", track.artifacts)
    if teacher:
        run_name, arts = f"{run_name}_teacher_{teacher}", f"{arts}/teacher_{teacher}"
        extra += ["--model.init_args.text_teacher", teacher]
    if arts != track.artifacts:
        out = WORK / track.runs / f"{run_name}.yaml"
        text = (WORK / config if not Path(config).is_absolute() else Path(config)).read_text()
        out.parent.mkdir(parents=True, exist_ok=True)
        if f"artifacts_dir: {track.artifacts}\n" not in text:
            raise SystemExit(f"{config} does not promote to {track.artifacts}")
        out.write_text(text.replace(f"artifacts_dir: {track.artifacts}\n", f"artifacts_dir: {arts}\n"))
        config = str(out.relative_to(WORK))
        extra += ["--trainer.logger.init_args.name", run_name]
    if source == "real":
        extra += [
            "--data.init_args.train_shards", f"{track.data}/tokens/train",
            "--data.init_args.val_shards", f"{track.data}/tokens/val",
            "--data.init_args.instruction_key", "text",
            "--data.init_args.response_key", ANSWER_FIELD,
        ]
    lightning("fit", "--config", config, *devices, *track.overrides[2], *track.fit_args, *extra)
    shown = f"{source} speech" + (f", text teacher {teacher}" if teacher else "")
    report(f"stage 3 on {shown} (promoted checkpoint, real speech of validation speakers)",
           WORK / track.runs / run_name, "best", ("val/loss", "val/spoken_accuracy"))
    answers = f"{track.runs}/{run_name}_test_answers.jsonl"
    run([str(bin_dir / "speechless-infer"), "--artifact", f"{arts}/stage3/current",
         "--stage1", f"{track.artifacts}/stage1/current", "--shards", f"{track.shards}/test",
         "--closed-task", CLOSED_TASK, "--batch-size", "40", "--max-new-tokens", "4", "--output", answers])
    from stages.tasks import exact_match

    rows = [json.loads(line) for line in (WORK / answers).read_text().splitlines() if line.strip()]
    return sum(exact_match(r["answer"], r["reference"]) for r in rows) / len(rows) if rows else float("nan")


def teacher_ablation(figures: dict[str, float], encoder: str, teachers: list[str]) -> None:
    """Print the text-teacher ablation of stage 3: real held-out speech, per teacher and training source."""
    sources = [s for s in ("synthetic", "real") if f"stage3_{s}" in figures]
    print(f"\n== text-teacher ablation ({encoder}): exact match on real held-out test speech (chance 0.100) ==")
    print(f"  {'text teacher':<14}" + "".join(f"{'trained on ' + s:>22}" for s in sources)
          + (f"{'transfer ratio':>16}" if len(sources) == 2 else ""))
    for teacher in ("none", *teachers):
        suffix = "" if teacher == "none" else f"_teacher_{teacher}"
        values = [figures.get(f"stage3_{s}{suffix}", float("nan")) for s in sources]
        ratio = f"{values[0] / values[1]:>16.2f}" if len(values) == 2 and values[1] else ""
        print(f"  {teacher:<14}" + "".join(f"{v:>22.3f}" for v in values) + ratio)


def real_token_share(run_dir: Path) -> float:
    """Mean ``train/real_token_share`` (non-pad / all tokens of a batch) over the newest run's logged steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(run_dir.glob("version_*"), key=lambda p: p.stat().st_mtime)
    if not versions:
        return float("nan")
    events = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    events.Reload()
    if "train/real_token_share" not in events.Tags()["scalars"]:
        return float("nan")
    values = [e.value for e in events.Scalars("train/real_token_share")]
    return sum(values) / len(values)


def csv_metrics(folder: Path) -> dict[str, float]:
    """The last value of every metric in the newest ``metrics.csv`` under ``folder`` (a CSVLogger's)."""
    files = sorted(folder.glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    out: dict[str, float] = {}
    if files:
        with open(files[-1], newline="") as f:
            for row in csv.DictReader(f):
                out.update({k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("epoch", "step")})
    return out




def whisper_model(bin_dir: Path) -> tuple[str | None, str]:
    """The converted Whisper tiny.en folder (``data/models/whisper-tiny.en``), converting the
    ``pretrained`` extra's wheel once; ``(None, why)`` when neither is there."""
    folder = "data/models/whisper-tiny.en"
    if (WORK / folder / "config.json").exists():
        return folder, ""
    from models.pretrained_whisper import installed_ct2_whisper_dir

    try:
        installed_ct2_whisper_dir()
    except FileNotFoundError as err:
        return None, str(err)
    run([str(bin_dir / "speechless-convert-whisper"), "--out", folder])
    return folder, ""


def run_track(track: Track, args: argparse.Namespace, devices: list[str], bin_dir: Path) -> dict[str, float]:
    """Stages 1-3 of the demo for one encoder; returns the figures of the summary table."""
    data = WORK / "data" / track.corpus
    config1, config2, _ = track.configs
    over1, over2 = track.overrides[0], track.overrides[1]
    figures: dict[str, float] = {}
    print(f"\n######## encoder: {track.encoder} ########", flush=True)
    if "1" in args.stages:
        lightning("fit", "--config", config1, *devices, *over1, *track.fit_args)
        for split in ("train", "val", "test"):
            lightning(
                "predict", "--config", config1, *over1,
                "--model.init_args.artifact", f"{track.artifacts}/stage1/current",
                "--data.init_args.predict_shards", f"{track.shards}/{split}",
                "--trainer.logger", "false",
                "--trainer.callbacks+=stages.writers.ShardPredictionWriter",
                "--trainer.callbacks.output_dir", f"{track.data}/tokens/{split}",
            )
        report("stage 1 (averaged checkpoint, validation speakers)", WORK / track.runs / "stage1",
               "averaged", ("val/mse", "val/cosine", "val/utilisation", "val/perplexity"))
        chosen = metrics_of(WORK / track.runs / "stage1").get("metrics", {}).get("averaged", {})
        figures.update({k: chosen[k] for k in ("val/cosine", "val/utilisation") if k in chosen})
        print(f"  artifact: {track.artifacts}/stage1/current  tokens: {track.data}/tokens/")

    # stage 2: text -> semantic tokens, then synthetic spoken instructions
    if "2" in args.stages:
        write_task_files(data / "raw")
        lm_dir = data / "models" / "stage2_lm"
        if not (lm_dir / "config.json").exists():
            save_gemma3_lm_debug(lm_dir, task_texts(data), hidden_size=128, num_layers=4)
        lightning("fit", "--config", config2, *devices, *over2, *track.fit_args)
        chosen = json.loads((WORK / track.artifacts / "stage2" / "current" / "provenance.json").read_text())["checkpoint"]
        lightning("test", "--config", config2, *over2, "--ckpt_path", chosen,
                  "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                  "--trainer.logger.init_args.save_dir", track.runs, "--trainer.logger.init_args.name", "stage2_test")
        test = csv_metrics(WORK / track.runs / "stage2_test")
        figures.update({k: v for k, v in test.items() if k in (
            "test/word_match", "test/word_match_chance", "test/len_error", "test/gen_wer", "test/real_wer")})
        if "test/gen_wer" in test:
            with open(data / "raw" / "instructions_test.jsonl") as f:
                figures["wer_chance"] = chance_wer([json.loads(line)["instruction"] for line in f if line.strip()])
        for split in ("train", "val"):
            lightning(
                "predict", "--config", config2, *over2,
                "--model.init_args.artifact", f"{track.artifacts}/stage2/current",
                "--model.init_args.greedy", "false", "--model.init_args.temperature", "0.8",
                "--data", "datamodules.text.TextInstructionDataModule",
                "--data.init_args.path", f"data/{track.corpus}/raw/instructions_{split}.jsonl",
                "--trainer.logger", "false",
                "--trainer.callbacks+=stages.writers.ShardPredictionWriter",
                "--trainer.callbacks.output_dir", f"{track.data}/synthetic/{split}",
                "--trainer.callbacks.prefix", "synthetic",
                "--trainer.callbacks.jsonl_name", "synthetic.jsonl",
            )
        report("stage 2 (promoted checkpoint, validation speakers)", WORK / track.runs / "stage2", "best",
               ("val/loss", "val/acc", "val/gen_cosine", "val/len_error", "val/word_match", "val/word_match_chance")
               + (("val/gen_wer", "val/real_wer") if "test/gen_wer" in test else ()))
        print(f"  artifact: {track.artifacts}/stage2/current  synthetic spoken instructions: {track.data}/synthetic/")

    # stage 3: LLM + LoRA on synthetic speech only; answers real speech of held-out speakers
    if "3" in args.stages:
        llm_dir = data / "models" / ("gemma4_stage3" if track.encoder == "gemma4-tiny" else "stage3_text_lm")
        if not (llm_dir / "config.json").exists():
            if track.encoder == "gemma4-tiny":
                save_gemma4_stage3_debug(llm_dir, encoder_dir=data / "models" / "gemma4_audio", texts=task_texts(data))
            else:
                save_gemma3_lm_debug(llm_dir, task_texts(data), hidden_size=64, num_layers=2)
        sources = ["synthetic", "real"] if args.stage3_on == "both" else [args.stage3_on]
        for source in sources:
            figures[f"stage3_{source}"] = stage3_run(track, source, devices, bin_dir)
        for teacher in args.text_teachers:
            for source in sources:
                figures[f"stage3_{source}_teacher_{teacher}"] = stage3_run(track, source, devices, bin_dir, teacher)
        if "stage3_synthetic" in figures:
            figures["stage3_real_tokens"] = real_token_share(WORK / track.runs / "stage3")
            print(f"  real tokens of the training batches: {figures['stage3_real_tokens']:.3f} (non-pad / all)")
        if "stage3_synthetic" in figures and "stage3_real" in figures:
            real = figures["stage3_real"]
            figures["transfer"] = figures["stage3_synthetic"] / real if real else float("nan")
            print(f"\n== Speechless transfer ({track.encoder}): real held-out speech, trained on synthetic vs real "
                  f"speech ==\n  synthetic {figures['stage3_synthetic']:.3f}  real {real:.3f}  "
                  f"ratio {figures['transfer']:.2f}  (chance 0.100)")
        if args.text_teachers:
            teacher_ablation(figures, track.encoder, args.text_teachers)
    return figures


ROWS = (
    ("stage 1 cosine of centered states (validation)", "val/cosine", None),
    ("stage 1 utilisation of the codes", "val/utilisation", None),
    ("stage 2 word match, test speakers", "test/word_match", "test/word_match_chance"),
    ("stage 2 length error, test (frames)", "test/len_error", None),
    ("tokenizer WER: Whisper reads the real codes, test", "test/real_wer", "wer_chance"),
    ("stage 2 WER: Whisper reads the generated codes, test", "test/gen_wer", "wer_chance"),
    ("stage 3 real test speech, trained on synthetic", "stage3_synthetic", 0.1),
    ("stage 3 real test speech, trained on real codes", "stage3_real", 0.1),
    ("stage 3 trained on synthetic, text teacher base", "stage3_synthetic_teacher_base", 0.1),
    ("stage 3 trained on synthetic, text teacher self", "stage3_synthetic_teacher_self", 0.1),
    ("stage 3 real-token share of the training batches", "stage3_real_tokens", None),
    ("Speechless transfer ratio synthetic / real", "transfer", None),
)


def summary(results: dict[str, dict[str, float]], corpus: str) -> None:
    """The figures of every encoder run, side by side, chance beside each."""
    names = list(results)
    print(f"\n== summary, corpus {corpus} ==")
    print(f"  {'figure':<54}" + "".join(f"{n:>16}" for n in names) + f"{'chance':>10}")
    for label, key, chance in ROWS:
        if not any(key in r for r in results.values()):
            continue
        cells = "".join(f"{r[key]:>16.3f}" if key in r else f"{'-':>16}" for r in results.values())
        if isinstance(chance, str):
            values = {r[chance] for r in results.values() if chance in r}
            chance_cell = f"{values.pop():>10.3f}" if len(values) == 1 else f"{'-':>10}"
        else:
            chance_cell = f"{chance:>10.3f}" if chance is not None else f"{'':>10}"
        print(f"  {label:<54}{cells}{chance_cell}")


def _teachers(value: str) -> list[str]:
    """``--text-teachers``: a comma-separated list of ``base`` / ``self``, or ``none``."""
    from models.spoken_llm_teacher import TEACHERS

    names = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
    for name in names:
        if name not in TEACHERS:
            raise argparse.ArgumentTypeError(f"unknown text teacher {name!r} (choose from {', '.join(TEACHERS)} or none)")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=["demo", "fsdd"], default="demo")
    parser.add_argument("--stages", default="123", help="which stages to run (default: 123, the whole pipeline)")
    parser.add_argument(
        "--encoder", choices=["gemma4-tiny", "whisper-tiny", "both"], default="both",
        help="the stage-1 encoder: a tiny random-weight Gemma 4 audio encoder (the real configs' path), the "
        "pretrained Whisper tiny.en of the `pretrained` extra, or both side by side (default; without the "
        "extra, Gemma 4 alone, saying why)",
    )  # fmt: skip
    parser.add_argument("--devices", type=int, default=1, help="CPU processes per fit (DDP over gloo when > 1)")
    parser.add_argument("--workdir", default=None, help="folder for data/, runs/ and artifacts/ (default: the repository)")
    parser.add_argument(
        "--stage3-on", choices=["synthetic", "real", "both"], default="synthetic",
        help="what stage 3 trains on: stage 2's synthetic spoken instructions (the method), the real speech's "
        "codes (its upper bound), or both, printing the transfer ratio synthetic/real (default: synthetic)",
    )  # fmt: skip
    parser.add_argument(
        "--text-teachers", default="base", type=_teachers,
        help="stage 3's text-teacher ablation: the stage-3 fits are run again with each of these teachers "
        "(comma-separated: base = the frozen base LLM, self = the adapted model; none = no ablation) and a "
        "table compares them with the config's own run (no teacher) (default: base)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    t0 = time.time()
    global WORK
    WORK = Path(args.workdir).resolve() if args.workdir else ROOT
    WORK.mkdir(parents=True, exist_ok=True)
    # Several devices: every fit runs DDP (Lightning's own launcher, gloo on the CPU).
    devices = ["--trainer.devices", str(args.devices), "--trainer.strategy", "ddp"] if args.devices > 1 else []
    data = WORK / "data" / args.corpus
    bin_dir = Path(sys.executable).parent

    # corpus and shards (shared by every encoder)
    if args.corpus == "demo":
        run([str(bin_dir / "speechless-demo-corpus"), "--out", "data/demo/raw"])
        manifest = Path("data/demo/raw/manifest.tsv")
    else:
        if not FSDD.exists():
            raise SystemExit(f"--corpus fsdd needs {FSDD}")
        manifest = fsdd_manifest(data / "raw").relative_to(WORK)
    manifest = with_answers(WORK / manifest).relative_to(WORK)
    run([str(bin_dir / "speechless-prepare"), "--manifest", str(manifest), "--out", f"data/{args.corpus}/shards",
         "--language", "en", "--trim-silence", "--no-progress"], ok_codes=(0, 3))

    encoders = ["gemma4-tiny", "whisper-tiny"] if args.encoder == "both" else [args.encoder]
    if "whisper-tiny" in encoders:
        folder, why = whisper_model(bin_dir)
        if folder is None:
            message = (f"the pretrained Whisper tiny.en is not available: {why}. scripts/setup.sh installs it "
                       f"when it can (pip install -e '.[pretrained]')")
            if args.encoder == "whisper-tiny":
                raise SystemExit(f"--encoder whisper-tiny: {message}")
            print(f"\n[demo] running the Gemma 4 path alone: {message}", flush=True)
            encoders.remove("whisper-tiny")
    if "gemma4-tiny" in encoders:
        # tiny random-weight models through the real loading code
        encoder_dir = data / "models" / "gemma4_audio"
        if not (encoder_dir / "config.json").exists():
            # One layer and 32 subsampling channels keep a random encoder's states word-discriminative.
            save_gemma4_audio_debug(encoder_dir, seed=0, num_hidden_layers=1, subsampling_conv_channels=[128, 32])

    results = {}
    for encoder in encoders:
        results[encoder] = run_track(make_track(encoder, args.corpus), args, devices, bin_dir)
    summary(results, args.corpus)
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
