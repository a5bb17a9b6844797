"""``speechless-infer``: answer spoken instructions with a promoted stage-3 model, optionally scored.

Inference follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417): speech -> Gemma 4 audio
encoder -> (RVQ round trip, as in training, when ``--stage1`` is given) -> Gemma 4 + LoRA -> text, greedy.
A tokens-mode model (a text-only LLM with sound tokens) hears speech through the stage-1 artifact it was
trained on: speech -> that artifact's frozen encoder (its normalisation) -> RVQ codes -> sound tokens
(as the stage-3 artifact's ``info.sound_tokens`` says) -> LLM; ``--stage1`` defaults to the recorded one.
A projector model (``info.audio_path: projector``: any stage-1 encoder into a text LLM) hears speech the
same way up to the states: that artifact's frozen encoder -> (RVQ round trip, as the artifact's
``info.rvq_round_trip`` says unless ``--rvq-round-trip``/``--no-rvq-round-trip``) -> the trained
projector (rebuilt from the artifact's ``projector`` module) -> the merged LLM.
Scoring follows DiffusionGemma ASR / Whisper practice: WER and CER (torchmetrics) after Whisper's text
normaliser for transcription prompts, exact match of the first word for closed tasks. The normaliser
follows each input's language (its manifest row's or shard sample's ``language``; ``--language``
overrides them all): Whisper's ``EnglishTextNormalizer`` for ``en`` only (it spells out and respells
English: "prof" -> "professor"), its basic normaliser (case, punctuation, symbols) for every other
language, an unknown one included.

Inputs: ``--audio`` files (no reference), a ``--manifest`` in the formats ``speechless-prepare`` reads
(TSV with a header row, or JSONL; read by :func:`datamodules.manifests.read_manifest`: ``audio`` relative
to the manifest, optional ``text``, ``reference`` / ``response``, ``language``, ``id``), or ``--shards``
(audio shards; ``json.text`` is the transcript). Recordings that preparation cut into pieces (their
json names the recording as ``parent`` and the piece as ``segment``, with the transcript in
``parent_text``) are joined in order and heard whole, and scored against the whole recording's
transcript (:func:`datamodules.pipeline.read_recordings`); a recording with pieces missing from the shards given is
answered but not scored. Long audio is cut at silence into pieces of at most 30 s (Gemma 4's audio
window) whose frames fill one audio block in order, so the whole recording is heard.

References: ``--transcribe`` scores the answers as transcripts (WER/CER) against each input's
``reference`` when it has one, else its transcript (``text``); ``--closed-task T`` (stage 3's
``eval_task``: ``repeat``, ``json:<field>``, ``exact:json:<field>``) against what ``T`` names; with neither, inputs with a ``reference`` (or ``response``) are scored as transcripts.
Asked to score (``--transcribe``, ``--closed-task``) inputs without references, it says so on stderr
(how many, and where references come from) instead of printing nothing.
One JSON line per utterance goes to stdout (or ``--output``); scores are printed at the end (stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from datamodules.audio import load_audio, resample
from datamodules.pipeline import read_recordings
from stages.tasks import check_eval_task, score

__all__ = ["load_inputs", "main", "references"]


def _read_wave(source: Any) -> np.ndarray:
    """An audio file -> mono float32 at 16 kHz (decoded and resampled as preparation does)."""
    wave, rate, _ = load_audio(source)
    return resample(wave, rate)


_MANIFEST_COLUMNS = {f: f for f in ("audio", "text", "speaker", "language", "id", "split")}


def _read_manifest(manifest: str) -> list[dict[str, Any]]:
    """A TSV or JSONL manifest (``speechless-prepare``'s reader) -> input items; a bad row is an error."""
    from datamodules.manifests import PrepareError, read_manifest

    try:
        rows = read_manifest(manifest, columns=_MANIFEST_COLUMNS, defaults={"split": "test", "language": "und",
                             "speaker": "unknown"}, require_text=False)  # fmt: skip
    except PrepareError as err:
        raise ValueError(str(err)) from err
    items = []
    for row in rows:
        if row.error is not None:
            raise ValueError(f"manifest row refused ({row.error[0]}): {row.error[1]}")
        text = row.text or (str(row.extra["instruction"]) if "instruction" in row.extra else None)
        reference = row.extra.get("reference", row.extra.get("response"))
        items.append({"id": row.key, "wave": _read_wave(row.audio), "text": text, "language": row.language,
                      "reference": None if reference is None else str(reference)})  # fmt: skip
    return items


def load_inputs(*, audio: list[str], manifest: str | None, shards: str | None) -> list[dict[str, Any]]:
    """``[{"id", "wave" (16 kHz float32 [N]), "text" (transcript or None), "reference" (or None),
    "language" (or None)}]``; shard recordings cut into pieces come back whole (``complete`` False when
    a piece is missing, see :func:`datamodules.pipeline.read_recordings`)."""
    items = [{"id": p, "wave": _read_wave(p), "text": None, "reference": None, "language": None} for p in audio]
    if manifest:
        items.extend(_read_manifest(manifest))
    if shards:
        for rec in read_recordings(shards):
            meta = rec["meta"]
            reference = meta.get("reference", meta.get("response"))
            items.append({"id": rec["id"], "wave": rec["wave"], "text": meta.get("text") or None, "meta": meta,
                          "reference": None if reference is None else str(reference),
                          "language": meta.get("language"), "pieces": rec["pieces"], "complete": rec["complete"]})  # fmt: skip
    if not items:
        raise ValueError("no input: give --audio, --manifest or --shards")
    return items


def references(items: list[dict[str, Any]], *, closed_task: str | None, transcribe: bool) -> list[str]:
    """Set each item's ``reference`` for the scoring asked for; return the notes to print (stderr).

    ``closed_task`` (a stage-3 ``eval_task``, :func:`stages.tasks.check_eval_task`): ``CLOSED_TASKS[task](text)``
    (``repeat``) or the shard json's field (``json:<field>``, ``exact:json:<field>``); ``transcribe``: the item's ``reference``, else its
    ``text``; neither: the item's own ``reference`` (or ``response``) as read. An item without what its
    reference needs (no transcript; a cut recording with pieces missing) is not scored, and the notes
    say how many and why.
    """
    notes, field = [], None
    if closed_task:
        from datamodules.instructions import CLOSED_TASKS

        try:
            check_eval_task(closed_task)
        except ValueError:
            raise ValueError(f"--closed-task must be one of {sorted(CLOSED_TASKS)}, json:<field> or "
                             f"exact:json:<field>, got {closed_task!r}") from None  # fmt: skip
        field = closed_task.removeprefix("exact:").removeprefix("json:") if "json:" in closed_task else None
        for it in items:
            if field is not None:
                value = (it.get("meta") or {}).get(field)
                it["reference"] = value if isinstance(value, str) and value.strip() else None
            else:
                it["reference"] = CLOSED_TASKS[closed_task](it["text"]) if it.get("text") else None
    elif transcribe:
        for it in items:
            it["reference"] = it.get("reference") or it.get("text")
    partial = [it for it in items if it.get("complete") is False and it.get("reference") is not None]
    for it in partial:
        it["reference"] = None
    if partial:
        notes.append(f"{len(partial)} recording(s) cut into pieces have pieces missing from the shards given "
                     f"(e.g. {partial[0]['id']}): answered, not scored")  # fmt: skip
    asked = "--closed-task" if closed_task else "--transcribe" if transcribe else None
    missing = sum(it.get("reference") is None for it in items) - len(partial)
    if asked and missing:
        where = (f"a json field `{field}` (shard json)" if closed_task and field is not None else
                 "a transcript (manifest `text`, shard json `text`)" if closed_task else
                 "a reference (manifest `reference` or `text`, shard json `text`)")  # fmt: skip
        scope = "none" if missing == len(items) else f"{missing} of {len(items)}"
        notes.append(f"warning: {asked} asked for scores, but {scope} of the inputs have {where}; "
                     f"--audio files have none: {'nothing is scored' if scope == 'none' else 'those are not scored'}")  # fmt: skip
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speechless-infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", help="promoted stage-3 folder (uses its merged export)")
    parser.add_argument("--model", help="or: a base model / merged folder (hub id or path)")
    parser.add_argument("--stage1", help="stage-1 artifact: RVQ round trip of the speech, as in training; "
                        "tokens mode: its encoder + RVQ make the sound tokens (default: the one stage 3 recorded)")
    parser.add_argument("--input-mode", choices=["embeddings", "tokens"], help="with --model (default embeddings)")
    parser.add_argument("--rvq-round-trip", action=argparse.BooleanOptionalAction, default=None,
                        help="projector models: RVQ round trip of the encoder states (default: as in training)")
    parser.add_argument("--sound-levels", type=int, help="with --model in tokens mode: RVQ levels per frame (1)")
    parser.add_argument("--audio", nargs="*", default=[])
    parser.add_argument("--manifest")
    parser.add_argument("--shards")
    parser.add_argument("--prompt", help="text before the audio in the user turn")
    parser.add_argument("--closed-task", help="the reference, as stage 3's eval_task: repeat (the transcript "
                        "itself, scored by WER/CER), json:<field> (a shard json field, WER/CER) or exact:json:<field> "
                        "(that field, exact match of the answer's first word)")
    parser.add_argument("--transcribe", action="store_true", help="score answers as transcripts (WER/CER) against "
                        "each input's reference: its `reference`, else its transcript `text` (manifest or shard json)")
    parser.add_argument("--language", help="text normaliser for WER/CER, for every input: Whisper's English one for "
                        "en, its basic one otherwise (default: each input's own `language`; none: basic)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    # Inputs first: a bad manifest row or a missing file fails before any model is loaded.
    try:
        items = load_inputs(audio=args.audio, manifest=args.manifest, shards=args.shards)
        notes = references(items, closed_task=args.closed_task, transcribe=args.transcribe)
    except ValueError as err:
        parser.error(str(err))
    joined = [it for it in items if it.get("pieces", 1) > 1]
    if joined:
        notes.insert(0, f"{sum(it['pieces'] for it in joined)} pieces of {len(joined)} long recording(s) joined: "
                        "each recording is heard and scored whole")  # fmt: skip
    for note in notes:
        print(f"[infer] {note}", file=sys.stderr, flush=True)

    from datamodules.audio import split_at_silence
    from models.spoken_llm import SpokenLLM
    from stages.artifacts import load_artifact, resolve_artifact
    from stages.safety import inside_artifact
    from stages.stage3 import attach_stage1

    info: dict[str, Any] = {}
    if args.artifact:
        root = resolve_artifact(args.artifact)
        info = json.loads((root / "config.json").read_text())["info"]
        source = str(inside_artifact(root, info.get("merged", "llm/merged"), what=f"{root}/config.json info.merged"))
        spec = json.loads((root / "config.json").read_text())["modules"]["llm"]["init_args"]
    elif args.model:
        source, spec = args.model, {}
    else:
        parser.error("give --artifact or --model")
    sound = info.get("sound_tokens") or {}
    mode = info.get("input_mode", spec.get("input_mode", args.input_mode or "embeddings"))
    proj = info.get("projector") or {}  # the trained projector's sizes (a text LLM without them cannot hear)
    projector = {"audio_dim": proj["input_dim"], "projector_stack": proj["stack"], "projector_hidden": proj["hidden_dim"],
                 "projector_activation": proj["activation"]} if proj else {}  # fmt: skip
    llm = SpokenLLM(
        model=source, dtype=args.dtype or spec.get("dtype", "bf16"), lora_r=1, input_mode=mode,
        audio_path=info.get("audio_path") or spec.get("audio_path", "auto"), **projector,
        num_levels=info.get("num_levels", spec.get("num_levels", 8)),
        codebook_size=info.get("codebook_size", spec.get("codebook_size", 2048)),
        sound_levels=sound.get("levels", spec.get("sound_levels", args.sound_levels or 1)),
        sound_compress=sound.get("compress", spec.get("sound_compress", False)),
        sound_tokens=spec.get("sound_tokens"),
    )  # fmt: skip  (the fresh LoRA is zero-initialised: the merged weights answer unchanged)
    # Real speech is normalised as the stage-1 encoder did (recorded in both artifacts).
    llm.set_audio_normalization(**info.get("audio_normalization", {}))
    if llm.projector is not None:  # only from an artifact (info.projector): its trained weights are in it
        llm.load_projector(load_artifact(root, names=["projector"])["modules"]["projector"])
    recorded = info.get("stage1") or {}
    encoder = llm.hears_through_encoder
    stage1_path = args.stage1 or (recorded.get("path") if encoder else None)
    if encoder and not stage1_path:
        parser.error(f"{llm.audio_path or 'tokens'} mode needs the stage-1 artifact it was trained on: give --stage1")
    if stage1_path:
        stage1 = attach_stage1(llm, stage1_path, encoder=encoder)
        sha = stage1["config"].get("sha256", "")
        if encoder and recorded.get("sha256") and sha != recorded["sha256"]:
            raise SystemExit(f"speechless-infer: {stage1_path} (sha256 {sha[:12]}) is not the stage-1 artifact this "
                             f"model was trained on ({recorded.get('path')}, sha256 {recorded['sha256'][:12]})")  # fmt: skip

    # Native Gemma 4 path: the round trip whenever a stage-1 artifact is given; projector: as in training.
    round_trip = bool(stage1_path) if llm.projector is None else info.get("rvq_round_trip", True)
    if args.rvq_round_trip is not None:
        if args.rvq_round_trip and not stage1_path:
            parser.error("--rvq-round-trip needs the stage-1 artifact's RVQ: give --stage1")
        round_trip = args.rvq_round_trip
    out = open(args.output, "w") if args.output else sys.stdout
    answers = []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        # Audio over the 30 s window is cut at silence and heard whole, never truncated.
        pieces = [[it["wave"][a:b] for a, b in split_at_silence(it["wave"], 16_000, max_seconds=30.0)] for it in chunk]
        batch = llm.prompts_from_audio(
            [p for item_pieces in pieces for p in item_pieces],
            instruction_text=args.prompt,
            pieces_per_item=[len(item_pieces) for item_pieces in pieces],
        )
        batch["rvq_round_trip"] = round_trip
        for it, answer in zip(chunk, llm.generate(batch, max_new_tokens=args.max_new_tokens), strict=True):
            answers.append(answer)
            out.write(json.dumps({"id": it["id"], "answer": answer.strip(), "reference": it["reference"]}) + "\n")
    scored = [(a, it) for a, it in zip(answers, items, strict=True) if it["reference"] is not None]
    if scored:

        mode = "exact" if args.closed_task and not check_eval_task(args.closed_task) else "transcription"
        language = args.language or [it.get("language") or "und" for _, it in scored]
        metrics = score([a for a, _ in scored], [it["reference"] for _, it in scored], mode=mode, language=language)
        # chance of an exact task: one of the k distinct answers at random is right 1/k of the time
        chance = f" (chance {1 / len({it['reference'] for _, it in scored}):.3f})" if mode == "exact" else ""
        print(f"[infer] {len(scored)} scored: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + chance,
              file=sys.stderr)  # fmt: skip
    if args.output:
        out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
