"""One command, one table: the three stage-1 tokenizers on real speech, through the whole pipeline.

``python -m demo.compare`` (``bash scripts/compare.sh`` from a fresh clone) runs, for each tokenizer
on the pretrained Whisper tiny.en encoder (the ``pretrained`` extra, converted once):

- ``rvq``: the Speechless residual VQ (``configs/demo/whisper_stage1_rvq.yaml``, 8 levels x 256);
- ``whispervq``: Ichigo's WhisperVQ (``configs/demo/whisper_stage1_whispervq.yaml``, one level);
- ``kmeans``: SpireLM's k-means units (``configs/demo/whisper_stage1_kmeans.yaml``, one level),

the demo's stages 1-3 (``demo.run.run_track``) on a subset of FSDD (``../shared/data/fsdd``: the
first ``--takes`` takes of each digit by five speakers train, the sixth speaker is held out), then
prints one row per figure and one column per tokenizer:

- tokens per second (raw codes; for one-level tokenizers also after collapsing repeats, what SpireLM
  feeds an LM) and bitrate (frames/s x the sum of log2 K over levels);
- codebook utilisation (stage 1, validation speakers);
- tokenizer WER: the frozen Whisper decoder reads the decoded codes of real speech, on the held-out
  FSDD speaker (stage 2's ``test/real_wer``) and on ``../shared/data/english_clips`` (sentences the
  tokenizers never heard: how much of what Whisper hears they keep);
- stage-2 WER of generated speech (``test/gen_wer``, the same decoder on stage 2's codes);
- stage-3 accuracy on the real speech of the held-out speaker, trained on synthetic speech only.

Stages 2 and 3 are the demo's Whisper configs, sized to a one-level tokenizer by command-line
overrides (``num_levels: 1`` and the tokenizer's ``codebook_size``), printed with every command.
Stage 2 keeps the RVQ's output form (one position per frame) for every tokenizer, so only the
tokenizer differs; ``--stage2-form one_level`` writes Ichigo's token strings with duration tokens
instead. Stage 3 reads a one-level tokenizer's codes as sound tokens in the LLM's vocabulary, as
Ichigo and SpireLM do (``--stage3-input projector``: through the RVQ's decode-and-project path,
where WhisperVQ's decoded states, made for the Whisper decoder, left stage 3 at chance).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import demo.run as demo_run
from demo.run import Track, corpus_config, fsdd_manifest, run, run_track, whisper_model, with_answers

__all__ = ["TOKENIZERS", "main", "token_rates"]

#: Tokenizer name -> its demo stage-1 config (on Whisper tiny.en).
TOKENIZERS: dict[str, str] = {
    "rvq": "configs/demo/whisper_stage1_rvq.yaml",
    "whispervq": "configs/demo/whisper_stage1_whispervq.yaml",
    "kmeans": "configs/demo/whisper_stage1_kmeans.yaml",
}
STAGE2, STAGE3 = "configs/demo/whisper_stage2_speechless.yaml", "configs/demo/whisper_stage3_llm.yaml"
CLIPS = demo_run.ROOT.parent / "shared" / "data" / "english_clips"


def tokenizer_track(tokenizer: str, corpus: str, overrides=((), (), ()), fit_args: tuple[str, ...] = ()) -> Track:
    """The demo's Whisper track with every path moved under ``<corpus>/<tokenizer>``."""
    sub = f"{corpus}/{tokenizer}"
    replace = {
        # a stage-1 config's own folders first (the WhisperVQ demo's are whispervq/, not whisper/)
        f"artifacts/{tokenizer}": f"artifacts/{sub}", f"runs/demo/{tokenizer}": f"runs/{sub}",
        "data/demo/whisper/": f"data/{sub}/", "artifacts/whisper": f"artifacts/{sub}",
        "runs/demo/whisper": f"runs/{sub}", "data/demo/": f"data/{corpus}/",
        # Each tokenizer has its own folders here, so its stage 1 logs and promotes as plain "stage1".
        f"name: stage1_{tokenizer}": "name: stage1", f"stage: stage1_{tokenizer}": "stage: stage1",
    }  # fmt: skip
    configs = tuple(
        str(corpus_config(demo_run.ROOT / c, corpus, demo_run.WORK / "runs" / sub / Path(c).name, replace).relative_to(demo_run.WORK))
        for c in (TOKENIZERS[tokenizer], STAGE2, STAGE3)
    )
    return Track("whisper-tiny", corpus, f"data/{sub}", f"runs/{sub}", f"artifacts/{sub}", configs, overrides, fit_args)  # type: ignore[arg-type]


def one_level_overrides(
    codebook_size: int, form: str = "all_levels", stage3_input: str = "tokens"
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Stage 2 and 3 sized to a one-level tokenizer of ``codebook_size`` codes.

    ``form``: stage 2's output form. ``all_levels`` (default) is the very LM the RVQ gets (one position
    per frame), so the table compares tokenizers and nothing else; ``one_level`` is Ichigo's token
    string with duration tokens.

    ``stage3_input``: ``tokens`` (default) gives the LLM the codes as sound tokens added to its
    vocabulary (``input_mode: tokens``, one token a frame), as Ichigo feeds WhisperVQ's codes and
    SpireLM its units; ``projector`` keeps the demo config's path (the codes decoded to encoder states,
    then a trainable projector), the one the RVQ takes.
    """
    lm, llm = "--model.init_args.lm.init_args", "--model.init_args.llm.init_args"
    stage2 = (f"{lm}.num_levels", "1", f"{lm}.codebook_size", str(codebook_size), f"{lm}.output_form", form)
    stage3: tuple[str, ...] = (f"{llm}.num_levels", "1", f"{llm}.codebook_size", str(codebook_size))
    if stage3_input == "tokens":
        stage3 += (f"{llm}.input_mode", "tokens", f"{llm}.audio_path", "auto", f"{llm}.sound_levels", "1")
    elif stage3_input != "projector":
        raise ValueError(f"stage3_input must be tokens or projector, got {stage3_input!r}")
    return (), stage2, stage3


def token_rates(token_shards: str, *, frame_rate: float, codebook_size: int) -> dict[str, float]:
    """Tokens per second and bitrate of the codes in ``token_shards`` (``codes.npy [Q, T]`` each).

    ``tokens_per_s``: Q x frames per second of speech; ``dedup_tokens_per_s``: runs of identical frames
    per second (consecutive duplicates collapsed, as SpireLM feeds units); ``bitrate``: frames/s x Q x
    log2 K (a code is drawn from K; the measured entropy is lower, see the utilisation).
    """
    from datamodules.pipeline import read_decoded

    frames = runs = 0
    levels = 0
    for _, sample in read_decoded(token_shards, fields="tokens", frame_rate=frame_rate):
        codes = sample["codes"]  # [Q, T]
        levels = int(codes.shape[0])
        t = int(codes.shape[-1])
        frames += t
        if t:
            runs += 1 + int((codes[:, 1:] != codes[:, :-1]).any(0).sum())
    seconds = frames / frame_rate
    if not seconds:
        raise ValueError(f"no frames in {token_shards}")
    return {
        "tokens_per_s": levels * frames / seconds,
        "dedup_tokens_per_s": levels * runs / seconds,
        "bitrate": frame_rate * levels * math.log2(codebook_size),
    }


def clips_wer(artifact: Path, clips: Path = CLIPS) -> float:
    """WER of the frozen Whisper decoder on the decoded codes of ``english_clips`` (with a transcript)."""
    import csv

    import torch
    from torchmetrics.text import WordErrorRate

    from datamodules.audio import load_audio, resample
    from models.whisper_asr import WhisperASR
    from stages.artifacts import load_artifact
    from stages.metrics import normalize_transcript

    loaded = load_artifact(artifact, names=["quantizer", "encoder"])
    quantizer, encoder = loaded["modules"]["quantizer"].eval(), loaded["modules"]["encoder"].eval()
    info = loaded["config"].get("info") or {}
    # What stage 2 does: a tokenizer that decodes at a higher rate (WhisperVQ) undoes less pooling.
    pooling = int((info.get("encoder") or {}).get("pooling", 1)) // int(getattr(quantizer, "decode_upsample", 1))
    asr = WhisperASR(source=str((info.get("encoder") or {})["source"]), pooling=pooling)
    with open(clips / "manifest.tsv") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["text"].strip()]
    wer = WordErrorRate()
    with torch.no_grad():
        for row in rows:
            x, rate, _ = load_audio(clips / row["audio"])
            audio = torch.as_tensor(resample(x, rate))[None]
            out = encoder(audio, torch.tensor([audio.shape[1]]))
            codes = quantizer.encode(out.states.float(), out.mask)
            states = quantizer.decode(codes)
            lengths = out.lengths * int(getattr(quantizer, "decode_upsample", 1))
            text = asr.transcribe_states(states.float(), lengths)[0]
            wer.update(normalize_transcript(text, "en"), normalize_transcript(row["text"], "en"))
    return float(wer.compute())


ROWS = (
    ("tokens per second (raw codes)", "tokens_per_s"),
    ("tokens per second (repeats collapsed)", "dedup_tokens_per_s"),
    ("bitrate (bits/s)", "bitrate"),
    ("codebook utilisation (stage 1, validation)", "val/utilisation"),
    ("tokenizer WER, FSDD held-out speaker", "test/real_wer"),
    ("tokenizer WER, english_clips", "clips_wer"),
    ("stage 2 WER of generated speech, FSDD test", "test/gen_wer"),
    ("stage 3 accuracy, real held-out speech (synthetic-trained)", "stage3_synthetic"),
)


def table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    lines = [f"  {'figure':<58}" + "".join(f"{n:>12}" for n in names)]
    for label, key in ROWS:
        cells = "".join(f"{r[key]:>12.3f}" if key in r and r[key] == r[key] else f"{'-':>12}" for r in results.values())
        lines.append(f"  {label:<58}{cells}")
    return "\n".join(lines)


# A tokenizer that misses a gate of its demo config is still compared: its artifacts are promoted
# on purpose (their model cards say so), and the table shows the figures that missed.
FORCE_GATES = ("--promote.force_gates", "true")


def compare_one(tokenizer: str, corpus: str, bin_dir: Path, *, with_clips: bool, form: str = "all_levels",
                stage3_input: str = "tokens") -> dict[str, float]:  # fmt: skip
    """Stages 1-3 of one tokenizer; its figures."""
    first = tokenizer_track(tokenizer, corpus, fit_args=FORCE_GATES)
    figures = run_track(first, argparse.Namespace(stages="1", stage3_on="synthetic", text_teachers=[]), [], bin_dir)
    promoted = demo_run.WORK / first.artifacts / "stage1" / "current"
    info = json.loads((promoted / "config.json").read_text()).get("info") or {}
    levels, size = int(info["num_quantizers"]), int(info["codebook_size"])
    chosen = json.loads((promoted / "metrics.json").read_text())  # the promoted checkpoint's validation
    figures.update({k: v for k, v in chosen.items() if k in ("val/utilisation", "val/wer")})
    frame_rate = float((info.get("encoder") or {}).get("frame_rate", 25.0))
    figures.update(token_rates(str(demo_run.WORK / first.data / "tokens" / "test"), frame_rate=frame_rate, codebook_size=size))
    if with_clips:
        figures["clips_wer"] = clips_wer(demo_run.WORK / first.artifacts / "stage1" / "current")
    sized = ((), (), ()) if levels > 1 else one_level_overrides(size, form, stage3_input)
    track = tokenizer_track(tokenizer, corpus, sized, fit_args=FORCE_GATES)
    figures.update(run_track(track, argparse.Namespace(stages="23", stage3_on="synthetic", text_teachers=[]), [], bin_dir))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS), help="comma-separated, of: " + ", ".join(TOKENIZERS))
    parser.add_argument("--takes", type=int, default=8, help="takes per digit and speaker used of FSDD's 50 (default 8)")
    parser.add_argument("--stage2-form", choices=["all_levels", "one_level"], default="all_levels",
                        help="stage 2's output form for one-level tokenizers (default: the RVQ's, one position per frame)")
    parser.add_argument("--stage3-input", choices=["tokens", "projector"], default="tokens",
                        help="how stage 3 reads a one-level tokenizer's codes: as sound tokens, as Ichigo and SpireLM "
                        "do (default), or decoded through the RVQ's projector path")
    parser.add_argument("--workdir", default=None, help="folder for data/, runs/ and artifacts/ (default: the repository)")
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.tokenizers.split(",") if t.strip()]
    unknown = [t for t in names if t not in TOKENIZERS]
    if unknown or not names:
        parser.error(f"unknown tokenizer(s) {unknown}; choose from {list(TOKENIZERS)}")
    if not demo_run.FSDD.exists():
        raise SystemExit(f"the comparison needs FSDD at {demo_run.FSDD}")
    t0 = time.time()
    demo_run.WORK = Path(args.workdir).resolve() if args.workdir else demo_run.ROOT
    demo_run.WORK.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    corpus = f"fsdd{args.takes}"
    data = demo_run.WORK / "data" / corpus
    manifest = with_answers(fsdd_manifest(data / "raw", takes=args.takes, val_takes=max(1, args.takes // 6))).relative_to(demo_run.WORK)
    run([str(bin_dir / "speechless-prepare"), "--manifest", str(manifest), "--out", f"data/{corpus}/shards",
         "--language", "en", "--trim-silence", "--no-progress"], ok_codes=(0, 3))
    folder, why = whisper_model(bin_dir)
    if folder is None:
        raise SystemExit(f"the comparison needs the pretrained Whisper tiny.en: {why}")
    with_clips = CLIPS.exists()
    if not with_clips:
        print(f"[compare] {CLIPS} is absent: the english_clips column is left out", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"\n######## tokenizer: {name} ########", flush=True)
        results[name] = compare_one(name, corpus, bin_dir, with_clips=with_clips, form=args.stage2_form,
                                    stage3_input=args.stage3_input)
        print(f"\n== so far ==\n{table(results)}", flush=True)
    print(f"\n== stage-1 tokenizers on Whisper tiny.en, FSDD ({args.takes} takes per digit and speaker) ==")
    print(table(results))
    out = demo_run.WORK / "runs" / corpus / "compare.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nfigures: {out.relative_to(demo_run.WORK)}; comparison finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
