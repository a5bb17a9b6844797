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
Scoring follows DiffusionGemma ASR / Whisper practice: WER and CER (torchmetrics) after Whisper's
``EnglishTextNormalizer`` for transcription prompts, exact match of the first word for closed tasks.

Long recordings are cut at silence into pieces of at most 30 s (Gemma 4's audio window) whose frames
fill one audio block in order, so the whole recording is heard. Inputs: ``--audio`` files, a ``--manifest`` (JSONL with ``audio`` and optional ``reference``/``text``,
paths relative to the manifest), or ``--shards`` (audio shards; ``json.text`` is the transcript).
One JSON line per utterance goes to stdout (or ``--output``); scores are printed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

__all__ = ["load_inputs", "main", "normalizer", "score"]


def _read_wave(source: Any) -> np.ndarray:
    wave, rate = sf.read(source, dtype="float32", always_2d=True)
    wave = wave.mean(1)
    if rate != 16_000:
        import soxr

        wave = soxr.resample(wave, rate, 16_000).astype(np.float32)
    return wave


def load_inputs(*, audio: list[str], manifest: str | None, shards: str | None) -> list[dict[str, Any]]:
    """``[{"id", "wave" (16 kHz float32 [N]), "text" (transcript or None), "reference" (or None)}]``."""
    items = [{"id": p, "wave": _read_wave(p), "text": None, "reference": None} for p in audio]
    if manifest:
        base = Path(manifest).parent
        for i, line in enumerate(Path(manifest).read_text().splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            if "audio" not in row:
                raise ValueError(f"{manifest}:{i + 1}: needs 'audio'")
            path = Path(row["audio"]) if Path(row["audio"]).is_absolute() else base / row["audio"]
            items.append({"id": row.get("id", str(path)), "wave": _read_wave(path),
                          "text": row.get("text", row.get("instruction")), "reference": row.get("reference", row.get("response")),
                          "language": row.get("language")})  # fmt: skip
    if shards:
        from datamodules.shards import iter_tar_samples, resolve_shards

        for path in resolve_shards(shards).paths():
            for raw in iter_tar_samples(path):
                meta = json.loads(raw["json"])
                items.append({"id": raw["__key__"], "wave": _read_wave(io.BytesIO(raw["flac"])),
                              "text": meta.get("text"), "reference": None, "language": meta.get("language")})  # fmt: skip
    if not items:
        raise ValueError("no input: give --audio, --manifest or --shards")
    return items


def normalizer(language: str | None = "en"):
    """Whisper's text normaliser for ``language``: the English one for ``en`` (spellings, numbers,
    contractions), the basic one otherwise (case, punctuation, symbols), which keeps the letters of
    other languages (Twi's ɛ and ɔ) intact."""
    if (language or "en").lower().split("-")[0] == "en":
        from whisper_normalizer.english import EnglishTextNormalizer

        norm = EnglishTextNormalizer()
    else:
        from whisper_normalizer.basic import BasicTextNormalizer

        norm = BasicTextNormalizer()
    return lambda text: " ".join(norm(text).split())  # punctuation leaves spaces: collapse them


def score(answers: list[str], references: list[str], *, mode: str, language: str | None = "en") -> dict[str, float]:
    """``exact`` -> ``{"accuracy"}``; ``transcription`` -> ``{"wer", "cer"}`` on text normalised for ``language``."""
    if mode == "exact":
        from stages.stage3 import exact_match

        return {"accuracy": float(np.mean([exact_match(a, r) for a, r in zip(answers, references, strict=True)]))}
    from torchmetrics.text import CharErrorRate, WordErrorRate

    norm = normalizer(language)
    hyp, ref = [norm(a) for a in answers], [norm(r) for r in references]
    return {"wer": float(WordErrorRate()(hyp, ref)), "cer": float(CharErrorRate()(hyp, ref))}


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
    parser.add_argument("--closed-task", help="reference = task(transcript): next_digit (exact match) or repeat "
                        "(the transcript itself, scored by WER/CER)")
    parser.add_argument("--transcribe", action="store_true", help="score answers as transcripts (WER/CER)")
    parser.add_argument("--language", help="text normaliser for WER/CER: Whisper's English one for en, its basic "
                        "one otherwise (default: the inputs' language when they all agree, else en)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--output")
    args = parser.parse_args(argv)

    from datamodules.audio import split_at_silence
    from models.spoken_llm import SpokenLLM
    from stages.promotion import load_artifact, resolve_artifact
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
    items = load_inputs(audio=args.audio, manifest=args.manifest, shards=args.shards)
    if args.closed_task:
        from datamodules.instructions import CLOSED_TASKS

        for it in items:
            it["reference"] = CLOSED_TASKS[args.closed_task](it["text"])
    elif args.transcribe:
        for it in items:
            it["reference"] = it["text"]

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
    scored = [(a, it["reference"]) for a, it in zip(answers, items, strict=True) if it["reference"] is not None]
    if scored:
        from datamodules.instructions import OPEN_TASKS

        mode = "exact" if args.closed_task and args.closed_task not in OPEN_TASKS else "transcription"
        languages = {it.get("language") for it in items if it.get("language")}
        language = args.language or (languages.pop() if len(languages) == 1 else "en")
        metrics = score([a for a, _ in scored], [r for _, r in scored], mode=mode, language=language)
        chance = " (chance 0.100)" if args.closed_task == "next_digit" else ""
        print(f"[infer] {len(scored)} scored: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + chance,
              file=sys.stderr)  # fmt: skip
    if args.output:
        out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
