"""Stage 2 on sentences: length error, gen_cosine, WER and test time on espeak-ng read sentences.

A user's corpus of read news sentences (463 utterances of ~17 s) trained stage 1 well but stage 2's
generations overran by ~300 frames, with gen_cosine 0.06 and a 13-minute ``lightning test``. This
script rebuilds that situation from nothing but espeak-ng and a Whisper tiny.en folder, through the
same classes the CLI runs (``SpeechlessStage`` under a Lightning ``Trainer``):

1. ``benchmarks/sentence_corpus.py`` sentences (``--sentences``, ``--voices``, ``--min-words``,
   ``--max-words``), synthesized and encoded once by the frozen Whisper encoder (``pooling=2``,
   25 frames/s, as Ichigo) and cached under ``--workdir``;
2. a stage-1 RVQ (``--rvq QxK``) trained on the training states, promoted as a stage-1 artifact, and
   token shards written for train/val/test;
3. stage 2 (a random-init Gemma 3 of ``--layers`` x ``--hidden``, the demo's size by default) fit for
   ``--epochs``, then ``Trainer.test`` on the held-out sentences: ``test/len_error``,
   ``test/gen_cosine``, ``test/gen_wer`` beside ``test/real_wer`` (Whisper's transcript of the real
   codes), and the wall time of the test with its parts (generation, DTW word match, ASR).

Diagnostics: ``--rvq-only --real-levels 1,2,4`` (WER of the real codes' first levels alone),
``--eval-split train`` (generate training sentences: memorisation, i.e. is the held-out gap the
limit), ``--train-fraction`` (train on the first sentences only), ``--load`` (test a saved LM with
other decoding arguments through ``--stage-args``, e.g. ``{"greedy": false, "temperature": 0.8}``).

    WHISPER_TINY_EN=<folder> .venv/bin/python benchmarks/exp_stage2_sentences.py --workdir runs/exp_sentences
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sentence_corpus import VOICES, news_sentences  # noqa: E402

__all__ = ["main"]


def build_corpus(work: Path, args) -> dict:
    """Synthesize and encode the sentences once: ``{"texts", "split", "voice", "states" [T_i, D]}``."""
    cache = work / f"corpus_{args.sentences}x{args.voices}_{args.min_words}-{args.max_words}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    from demo.tts import synthesize
    from models.encoders import WhisperEncoder

    texts = news_sentences(args.sentences, seed=args.seed, min_words=args.min_words, max_words=args.max_words)
    n_eval = max(2, round(0.05 * len(texts)))
    enc = WhisperEncoder(source=args.model, pooling=2)
    out: dict = {"texts": [], "split": [], "voice": [], "states": []}
    t0 = time.perf_counter()
    for i, text in enumerate(texts):
        split = "test" if i < n_eval else "val" if i < 2 * n_eval else "train"
        for v, (voice, pitch, rate) in enumerate(VOICES[: args.voices]):
            wave = torch.from_numpy(synthesize(text, voice=voice, pitch=pitch, rate_wpm=rate))
            states = enc(wave[None]).states[0]
            out["texts"].append(text)
            out["split"].append(split)
            out["voice"].append(v)
            out["states"].append(states.half())
        if i % 50 == 0:
            print(f"  encoded {i + 1}/{len(texts)} sentences, {time.perf_counter() - t0:.0f} s", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def build_tokens(work: Path, corpus: dict, args) -> Path:
    """Train the stage-1 RVQ, promote it, write token shards; returns the token root."""
    from datamodules.shards import ShardWriter
    from models.encoders import WhisperEncoder
    from models.rvq import ResidualVQ
    from stages.artifacts import ArtifactModule, promote

    q, k = (int(x) for x in args.rvq.split("x"))
    root = work / f"tokens_{cache_tag(args)}_{args.rvq}"
    if (root / "done").exists():
        return root
    train = torch.cat([s.float() for s, sp in zip(corpus["states"], corpus["split"], strict=True) if sp == "train"])
    dim = train.shape[1]
    rvq = ResidualVQ(dim=dim, num_quantizers=q, codebook_size=k, kmeans_buffer_frames=min(len(train), 16384),
                     seed=args.seed).train()
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.rvq_steps):
        rvq(train[torch.randint(len(train), (2048,), generator=g)][None])
    rvq.eval()
    mask = torch.ones(1, len(train), dtype=torch.bool)
    recon = rvq.decode(rvq.encode(train[None], mask))[0]
    cos = float(torch.nn.functional.cosine_similarity(recon, train, dim=-1).mean())
    print(f"stage 1: RVQ {q}x{k} on {len(train)} frames, {time.perf_counter() - t0:.0f} s, train cosine {cos:.3f}")
    enc = WhisperEncoder(source=args.model, pooling=2)
    spec = {"dim": dim, "num_quantizers": q, "codebook_size": k}
    info = {"num_quantizers": q, "codebook_size": k, "dim": dim, "encoder": enc.describe()}
    promote(stage="stage1", modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", spec, rvq.state_dict())},
            metrics={"val/cosine": cos}, artifacts_dir=root / "artifacts", info=info)
    for split in ("train", "val", "test"):
        writer = ShardWriter(root / split, prefix="tokens", max_samples=10000, kind="tokens")
        for i, (text, sp, s) in enumerate(zip(corpus["texts"], corpus["split"], corpus["states"], strict=True)):
            if sp != split:
                continue
            codes = rvq.encode(s.float()[None])[0].numpy().astype(np.int16)
            writer.write({"__key__": f"u{i:05d}", "json": {"text": text, "language": "en", "speaker": f"v{corpus['voice'][i]}",
                                                         "n_frames": int(codes.shape[1])},
                          "codes.npy": codes}, seconds=codes.shape[1] / 25.0)
        writer.close()
    (root / "done").write_text("ok")
    return root


def train_subset(tokens: Path, fraction: float) -> Path:
    """Token shards of the first ``fraction`` of the training sentences (every voice of each)."""
    from datamodules.shards import ShardWriter, iter_tar_samples

    root = tokens / f"train_{fraction:g}"
    if (root / "done").exists():
        return root
    samples = [s for tar in sorted((tokens / "train").glob("*.tar")) for s in iter_tar_samples(tar)]
    texts = sorted({json.loads(s["json"])["text"] for s in samples})
    keep = set(texts[: max(1, round(fraction * len(texts)))])
    writer = ShardWriter(root, prefix="tokens", max_samples=10000, kind="tokens")
    for s in samples:
        meta = json.loads(s["json"])
        if meta["text"] in keep:
            writer.write(s, seconds=meta["n_frames"] / 25.0)
    writer.close()
    (root / "done").write_text("ok")
    return root


def cache_tag(args) -> str:
    return f"{args.sentences}x{args.voices}_{args.min_words}-{args.max_words}"


class _Timer:
    """Wall time of a few SpeechlessStage parts during ``Trainer.test``, by monkeypatching them."""

    def __init__(self, stage) -> None:
        import stages.stage2 as s2

        self.totals: dict[str, float] = {}
        self.lengths: list[tuple[str, int]] = []  # (text, generated frames)
        generate = stage._generate

        def recorded(texts):
            out = generate(texts)
            self.lengths += [(t, int(g.shape[1])) for t, g in zip(texts, out, strict=True)]
            return out

        stage._generate = recorded
        self._wrap(stage, "_generate", "generate")
        if stage.asr is not None:
            self._wrap(stage, "_transcribe", "asr")
        original = s2.word_match

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.totals["word_match"] = self.totals.get("word_match", 0.0) + time.perf_counter() - t

        s2.word_match = timed

    def _wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - t

        setattr(obj, name, timed)


def oracle_length_figures(stage, corpus: dict) -> dict[str, float]:
    """gen_cosine and WER of the test texts generated with each utterance's real length given."""
    from torchmetrics.text import WordErrorRate

    from stages.metrics import aligned_cosine, normalize_transcript

    stage.eval()
    items = [(t, s) for t, s, sp in zip(corpus["texts"], corpus["states"], corpus["split"], strict=True) if sp == "test"]
    cos, hyps = [], []
    q = stage.quantizer
    for start in range(0, len(items), 16):
        part = items[start : start + 16]
        codes = [q.encode(s.float()[None])[0] for _, s in part]
        gen = stage.lm.generate([t for t, _ in part], max_frames=stage.gen_max_frames, min_frames=1,
                                lengths=[c.shape[1] for c in codes], cfg_scale=stage.cfg_scale)
        gs = [stage._states(g) for g in gen]
        cos += [float(aligned_cosine(g, stage._states(c))) for g, c in zip(gs, codes, strict=True)]
        if stage.asr is not None:
            hyps += stage._transcribe(gs)
    out = {"oracle/gen_cosine": float(np.mean(cos))}
    if hyps:
        norm = lambda x: normalize_transcript(x, "en")  # noqa: E731
        out["oracle/gen_wer"] = float(WordErrorRate()([norm(h) for h in hyps], [norm(t) for t, _ in items]))
    return out


def teacher_forced_wer(stage, tokens: Path, args, n: int = 16) -> float:
    """WER of the *teacher-forced* argmax codes of the first ``n`` evaluated utterances.

    Each frame's codes are what the LM predicts given the real previous frames: the best a model
    with this per-frame accuracy could sound if its generation never left the real path. Against
    the generated codes' WER it separates "the model has not learned the speech" from "it has, but
    loses its way when it feeds itself" (exposure bias)."""
    from torchmetrics.text import WordErrorRate

    from datamodules.shards import iter_tar_samples
    from stages.metrics import normalize_transcript

    root = tokens / "test" if args.eval_split == "test" else (
        tokens / "train" if args.train_fraction >= 1.0 else tokens / f"train_{args.train_fraction:g}")
    samples = [s for tar in sorted(root.glob("*.tar")) for s in iter_tar_samples(tar)][:n]
    texts = [json.loads(s["json"])["text"] for s in samples]
    codes = [torch.from_numpy(np.load(io.BytesIO(s["codes.npy"]))).long() for s in samples]
    lm, q_n = stage.lm.eval(), stage.lm.num_levels
    states = []
    with torch.no_grad():
        for text, c in zip(texts, codes, strict=True):
            pred = lm(lm.build_batch([text], [c]))["logits"][0].argmax(-1)  # [Q, S]
            off = range(q_n) if lm.delay else [0] * q_n
            tf = torch.stack([pred[q, o : o + c.shape[1]] for q, o in enumerate(off)]).clamp(max=lm.codebook_size - 1)
            states.append(stage._states(tf))
    hyps = stage._transcribe(states)
    norm = lambda x: normalize_transcript(x, "en")  # noqa: E731
    return float(WordErrorRate()([norm(h) for h in hyps], [norm(t) for t in texts]))


def real_code_wer(tokens: Path, corpus: dict, args) -> float:
    """WER of Whisper's transcripts of the test split's real codes (RVQ-decoded), and of the states.

    With ``--real-levels`` also the WER of the codes' first ``k`` levels only (the decode of levels
    ``0..k-1``): how much of the tokenizer's intelligibility the LM's lower levels carry."""
    from torchmetrics.text import WordErrorRate

    from models.rvq import ResidualVQ
    from models.whisper_asr import WhisperASR
    from stages.artifacts import load_artifact
    from stages.metrics import normalize_transcript

    rvq = load_artifact(tokens / "artifacts/stage1/current", names=["quantizer"],
                        expect={"quantizer": ResidualVQ})["modules"]["quantizer"].eval()
    asr = WhisperASR(source=args.model, pooling=2)
    items = [(t, s.float()) for t, s, sp in zip(corpus["texts"], corpus["states"], corpus["split"], strict=True)
             if sp == "test"]
    lengths = torch.tensor([s.shape[0] for _, s in items])
    states = torch.nn.utils.rnn.pad_sequence([s for _, s in items], batch_first=True)
    mask = torch.arange(states.shape[1])[None] < lengths[:, None]
    decoded = rvq.decode(rvq.encode(states, mask)) * mask[..., None]
    norm = lambda x: normalize_transcript(x, "en")  # noqa: E731
    refs = [norm(t) for t, _ in items]
    wer = lambda hyps: float(WordErrorRate()([norm(h) for h in hyps], refs))  # noqa: E731
    print(f"  states (no RVQ): WER {wer(asr.transcribe_states(states, lengths)):.3f}")
    codes = rvq.encode(states, mask)
    for k in args.real_levels:
        part = rvq.decode(codes[:, :k]) * mask[..., None]
        print(f"  levels 0..{k - 1} of {codes.shape[1]}: WER {wer(asr.transcribe_states(part, lengths)):.3f}")
    return wer(asr.transcribe_states(decoded, lengths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("WHISPER_TINY_EN"), help="HF Whisper tiny.en folder")
    parser.add_argument("--workdir", default="runs/exp_sentences")
    parser.add_argument("--sentences", type=int, default=460)
    parser.add_argument("--voices", type=int, default=1)
    parser.add_argument("--min-words", type=int, default=35)
    parser.add_argument("--max-words", type=int, default=60)
    parser.add_argument("--rvq", default="4x256")
    parser.add_argument("--rvq-steps", type=int, default=60)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-batch-seconds", type=float, default=8.0, help="the demo config's value")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--eos-rule", default="median")
    parser.add_argument("--gen-max-frames", type=int, default=750)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--text-dropout", type=float, default=0.0)
    parser.add_argument("--stage-args", default="{}", help="JSON of further SpeechlessStage arguments")
    parser.add_argument("--lm-args", default="{}", help="JSON of further SpeechLM arguments")
    parser.add_argument("--asr", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the metrics as JSON here")
    parser.add_argument("--oracle-length", action="store_true", help="also generate at the real lengths")
    parser.add_argument("--load", help="an LM state dict saved by a run (--save X writes X.lm.pt): test only")
    parser.add_argument("--rvq-only", action="store_true", help="build the tokens, print the real codes' WER, stop")
    parser.add_argument("--teacher-forced", action="store_true",
                        help="also the WER of the teacher-forced argmax codes of 16 evaluated utterances")
    parser.add_argument("--real-levels", type=lambda x: [int(v) for v in x.split(",")], default=[],
                        help="with --rvq-only: also the WER of the first k levels only (comma list)")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="train on the first fraction of the training sentences (all their voices)")
    parser.add_argument("--eval-split", choices=("test", "train"), default="test",
                        help="test on the held-out sentences, or on the (--train-fraction) training ones: memorisation")
    parser.add_argument("--eval-limit", type=int, default=23,
                        help="with --eval-split train: test batches (about one utterance each)")
    parser.add_argument("--test-gen-batch-sizes", type=lambda x: [int(v) for v in x.split(",")], default=[16],
                        help="run the test once per gen_batch_size (comma list): 1 is generation per eval batch")
    args = parser.parse_args(argv)
    if not args.model or not Path(args.model, "config.json").exists():
        print("needs a Whisper tiny.en folder: --model DIR or WHISPER_TINY_EN=DIR")
        return 0
    torch.set_num_threads(args.threads)
    from lightning.pytorch import Trainer, seed_everything

    from datamodules.speech import SpeechDataModule
    from demo.tiny import save_gemma3_lm_debug
    from models.speech_lm import SpeechLM
    from stages.stage2 import SpeechlessStage

    work = Path(args.workdir)
    corpus = build_corpus(work, args)
    seconds = [s.shape[0] / 25.0 for s in corpus["states"]]
    print(f"corpus: {len(seconds)} utterances, {sum(seconds) / 3600:.2f} h, mean {np.mean(seconds):.1f} s; "
          f"splits " + ", ".join(f"{s} {corpus['split'].count(s)}" for s in ("train", "val", "test")))
    tokens = build_tokens(work, corpus, args)
    if args.rvq_only:  # the tokenizer's own WER on the test sentences: real codes, RVQ-decoded
        print(f"RVQ {args.rvq}: test real_wer {real_code_wer(tokens, corpus, args):.3f}")
        return 0
    q, k = (int(x) for x in args.rvq.split("x"))
    lm_dir = work / f"lm_{args.layers}x{args.hidden}"
    if not (lm_dir / "config.json").exists():
        save_gemma3_lm_debug(lm_dir, sorted(set(corpus["texts"])), vocab_size=1000, hidden_size=args.hidden, num_layers=args.layers)
    seed_everything(args.seed)
    lm = SpeechLM(lm=str(lm_dir), tokenizer=str(lm_dir), num_levels=q, codebook_size=k, **json.loads(args.lm_args))
    stage = SpeechlessStage(
        lm=lm, stage1_artifact=str(tokens / "artifacts/stage1/current"), lr=args.lr, warmup_steps=args.warmup,
        gen_max_frames=args.gen_max_frames, eos_rule=args.eos_rule, cfg_scale=args.cfg_scale,
        text_dropout=args.text_dropout, asr_decoder="auto" if args.asr else None, **json.loads(args.stage_args),
    )
    train_root = tokens / "train" if args.train_fraction >= 1.0 else train_subset(tokens, args.train_fraction)
    dm = SpeechDataModule(train_shards=str(train_root), val_shards=str(tokens / "val"),
                          test_shards=str(train_root if args.eval_split == "train" else tokens / "test"), fields="tokens", max_batch_seconds=args.max_batch_seconds,
                          max_batch_size=args.max_batch_size, seed=args.seed)
    from lightning.pytorch.callbacks import Callback

    class EpochLog(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            m = trainer.callback_metrics
            extra = f", length_error {float(m['train/length_error']):.1f}" if "train/length_error" in m else ""
            print(f"  epoch {trainer.current_epoch}: step {trainer.global_step}, train/loss {float(m['train/loss']):.3f}, "
                  f"train/acc {float(m['train/acc']):.3f}{extra}, {time.perf_counter() - t0:.0f} s", flush=True)

    trainer = Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, gradient_clip_val=1.0, callbacks=[EpochLog()],
                      limit_test_batches=args.eval_limit if args.eval_split == "train" else 1.0)
    t0 = time.perf_counter()
    if args.load:  # a saved run's LM: test only (e.g. another eos_rule)
        stage.lm.load_state_dict(torch.load(args.load, weights_only=True))
    else:
        trainer.fit(stage, datamodule=dm)
    fit_s = time.perf_counter() - t0
    train_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if args.save and not args.load:
        torch.save(stage.lm.state_dict(), Path(args.save).with_suffix(".lm.pt"))
    timings = {}
    for size in args.test_gen_batch_sizes:  # the last one's figures are reported
        stage.gen_batch_size = size
        timer = _Timer(stage)
        t0 = time.perf_counter()
        metrics = trainer.test(stage, datamodule=dm, verbose=False)[0]
        test_s = time.perf_counter() - t0
        timings[size] = {"test_s": test_s, **timer.totals}
        print(f"test with gen_batch_size {size}: {test_s:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timer.totals.items()) + ")",
              flush=True)
    real_by_text: dict[str, list[int]] = {}
    for t, s_, sp in zip(corpus["texts"], corpus["states"], corpus["split"], strict=True):
        if sp == args.eval_split:
            real_by_text.setdefault(t, []).append(s_.shape[0])
    real_len = [float(np.mean(real_by_text[t])) for t, _ in timer.lengths]  # the utterances generated
    print(f"\nfit {fit_s:.0f} s ({trainer.global_step} steps, train/loss {train_metrics.get('train/loss', float('nan')):.3f}, "
          f"train/acc {train_metrics.get('train/acc', float('nan')):.3f})")
    print(f"test {test_s:.0f} s over {len(real_len)} utterances (mean {np.mean(real_len):.0f} frames): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in timer.totals.items()))
    signed = [n - float(np.mean(real_by_text[t])) for t, n in timer.lengths]
    print(f"  generated - real frames: mean {np.mean(signed):+.1f}, median {np.median(signed):+.1f}, "
          f"at the guard {sum(n >= args.gen_max_frames for _, n in timer.lengths)}/{len(signed)}")
    metrics["overrun_mean"] = float(np.mean(signed))
    for key in ("test/loss", "test/acc", "test/len_error", "test/gen_cosine", "test/word_match", "test/gen_wer",
                "test/gen_cer", "test/real_wer", "test/real_cer"):
        if key in metrics:
            print(f"  {key:<16} {metrics[key]:.3f}")
    if args.oracle_length:  # the same test texts generated at their real lengths: content alone
        metrics.update(oracle_length_figures(stage, corpus))
        print(f"  at the real length: gen_cosine {metrics['oracle/gen_cosine']:.3f}"
              + (f", gen_wer {metrics['oracle/gen_wer']:.3f}" if "oracle/gen_wer" in metrics else ""))
    if args.teacher_forced and stage.asr is not None:
        metrics["teacher_forced/wer"] = teacher_forced_wer(stage, tokens, args)
        print(f"  teacher-forced argmax codes: WER {metrics['teacher_forced/wer']:.3f} (first 16 utterances)")
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps({"args": vars(args), "fit_s": fit_s, "test_s": test_s,
                                               "timing": timings, "metrics": metrics,
                                               "steps": trainer.global_step}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
