"""Stage 2: the text -> semantic-token LM (the Speechless recipe, stage 2), and synthesis with it.

Follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417): a decoder-only LM is trained
with teacher forcing to write the stage-1 RVQ codes of an utterance given its transcript (loss on
speech tokens only), then synthesizes semantic tokens for the text instructions of an instruction
data set, which stage 3 trains on. The model itself is :class:`models.speech_lm.SpeechLM`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.text import CharErrorRate, WordErrorRate

from datamodules.pipeline import SampleError
from datamodules.speech import SpeechDataModule
from models import distributed as dist_utils
from models.quantizer import SemanticQuantizer
from models.speech_lm import SpeechLM
from stages.artifacts import ArtifactModule, load_artifact, parent_record
from stages.metrics import WordMatchItems, aligned_cosine, normalize_transcript, word_match
from stages.optim import WarmupCosine, configure, default_optimizer, fit_steps

__all__ = ["SpeechlessStage", "asr_source", "own_text"]


def own_text(sample: dict[str, Any]) -> dict[str, Any]:
    """Stage 2's per-sample transform: keep only samples with their own transcript in ``meta["text"]``.

    A text-conditioned model learns nothing it was asked for from an empty prompt (the unprompted
    examples classifier-free guidance needs are made on purpose, by ``text_dropout``). Pieces of
    long recordings cut by ``speechless-prepare`` have ``text: ""`` and the recording's transcript
    as ``parent_text``, which the piece may not contain; stage 1 uses them, stage 2 does not,
    unless a tool (an aligner) wrote the piece's own transcript into its ``text``.

    Raises:
        SampleError: ``piece_without_text`` (a piece, i.e. ``parent`` or ``text_scope: "parent"`` in
            its json, without text) or ``no_text`` (another sample without text); the datamodule
            skips the sample and counts it under that reason in ``batch["skipped"]``.
    """
    meta = sample["meta"]
    if str(meta.get("text") or "").strip():
        return sample
    if "parent" in meta or meta.get("text_scope") == "parent":
        where = f"segment {meta.get('segment', '?')} of {meta.get('parent', '?')}"
        raise SampleError("piece_without_text", f"{where}: only the whole recording has a transcript")
    raise SampleError("no_text", "no transcript to condition on")


def asr_source(asr_decoder: str | None, encoder: dict[str, Any] | None, *, where: str) -> str | None:
    """The Whisper folder that transcribes stage-2 speech, or None when the metric is off.

    ``"auto"`` takes the stage-1 encoder's own source when it is a Whisper model loaded from a hub id or
    folder (a config-built random encoder has no source to reload, and any other encoder's states
    mean nothing to a Whisper decoder: off). An explicit folder must go with a Whisper stage-1
    encoder. States centred per utterance (``center_states``) have lost their mean, which the
    decoder needs: ``"auto"`` turns the metric off, an explicit folder is refused. ``level_db``
    only rescales the audio before the encoder, so its states stay Whisper states: allowed. So is
    ``window: "clip"`` (the encoder run at each clip's own length): its states of sentences are read
    about as well as full-window ones (espeak sentences 0.173 vs 0.164 WER, english_clips 0.000
    both), while sub-second clips hallucinate more (FSDD 1.08 vs 0.63;
    ``benchmarks/bench_whisper_asr.py``), so the figure is pessimistic for such corpora.
    """
    if asr_decoder is None:
        return None
    enc = encoder or {}
    if asr_decoder == "auto":
        if enc.get("kind") != "whisper" or not enc.get("source") or enc.get("center_states"):
            return None
        return str(enc["source"])
    if enc and enc.get("kind") != "whisper":
        raise ValueError(f"asr_decoder={asr_decoder!r} reads Whisper states, but {where} quantizes "
                         f"{enc.get('kind')!r} states: set asr_decoder: null")
    if enc.get("center_states"):
        raise ValueError(f"{where} centres its encoder states per utterance (center_states), which removes "
                         "what the Whisper decoder reads: set asr_decoder: null")
    return asr_decoder




class SpeechlessStage(LightningModule):
    """Trains a :class:`SpeechLM` on (text, RVQ codes) token shards; synthesizes codes in ``predict``.

    Validation and test also *generate* (greedy by default) the codes of every batch text and
    compare them to the real ones in the stage-1 quantizer's state space: both code sequences are
    decoded with the frozen stage-1 RVQ (the "real states" are the RVQ decode of the real codes; the
    speech encoder is not re-run), the generated states are linearly interpolated to the real length
    and the per-frame cosine is averaged (``val/gen_cosine``); ``val/len_error`` is the mean
    ``|T_gen - T_real|`` in frames; ``{val,test}/word_match`` is the fraction of held-out texts whose
    generations are closer (DTW-aligned cosine, :func:`stages.metrics.word_match`) to their own real utterances
    than to any other text's (chance = 1 / number of texts; over all ranks, at most
    ``word_match_texts`` texts). Samples without a transcript of their own (pieces of long
    recordings) are skipped in every split and counted by reason (:func:`own_text`).

    Intelligibility (``{val,test}/gen_wer``, ``gen_cer``): when stage 1 sits on a Whisper encoder,
    the generated codes, decoded by the stage-1 RVQ, are transcribed by that Whisper model's frozen
    decoder (:class:`models.whisper_asr.WhisperASR`: the window padded with the states of silence,
    ``pooling=2`` undone) and scored against the input text with torchmetrics' WER/CER after
    Whisper's normaliser (English for ``en``, basic otherwise; the sample's ``language``, else
    ``asr_language``). ``real_wer`` / ``real_cer`` are the same figures for the real speech's codes:
    the tokenizer's own WER, the floor for the generated speech. Computed on the ``gen_batches``
    subset, summed over ranks.

    Args:
        lm: the text -> token LM; may be omitted when ``artifact`` is given.
        stage1_artifact: promoted stage-1 artifact (``artifacts/stage1/current``); its quantizer is
            frozen and must have the LM's ``num_levels`` and ``codebook_size``.
        artifact: a promoted stage-2 artifact to start from (e.g. to synthesize): replaces ``lm``.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (then constant, or the decay of ``lr_schedule``).
        lr_schedule: ``"constant"`` after the warm-up, or ``"cosine"``: decay to
            ``min_lr_ratio * lr`` at the fit's last step (``trainer.max_steps``, else the
            datamodule's batches per epoch times ``max_epochs``). With a few hundred utterances in
            batches of one or two, a constant rate ends the fit wherever its last noisy steps left
            it (the length head's error swung between 6 and 120 frames from epoch to epoch on the
            sentence benchmark); a decay lets the end settle.
        min_lr_ratio: the cosine schedule's final rate, as a fraction of ``lr``.
        optimizer: trainable parameters -> optimiser (``class_path``/``init_args`` in the YAML); unset:
            AdamW with ``lr`` and ``weight_decay`` (:mod:`stages.optim`), which it replaces.
        lr_scheduler: optimiser -> scheduler, stepped every optimiser step; unset:
            :class:`stages.optim.WarmupCosine` with ``warmup_steps``, ``lr_schedule`` and
            ``min_lr_ratio``, which it replaces.
        gen_max_frames: length guard for generation (frames).
        greedy, temperature, top_k: decoding (Speechless decodes greedily).
        eos_rule: how greedy decoding ends speech (see :meth:`SpeechLM.generate`): ``"median"``
            (default) stops at the median of the model's own length distribution; ``"argmax"``
            waits for end-of-speech to be the top output, as Ichigo does, which overruns on data
            whose durations vary. A length-conditioned LM (``SpeechLM(length_conditioning=True)``)
            ends every utterance at the length its length head predicts instead.
        text_dropout: fraction of training texts replaced by the empty prompt, so that the model
            also learns the unprompted distribution that classifier-free guidance needs.
        cfg_scale: classifier-free guidance at generation (``1`` = off); needs ``text_dropout > 0``.
        word_match_texts: word match is scored over at most this many texts (the smallest in string
            order, gathered over all ranks; see :class:`stages.metrics.WordMatchItems`): its cost grows with texts
            times utterances.
        gen_batches: generate (for ``gen_cosine``, ``len_error``, ``word_match``) in only the first
            this many validation/test batches of each rank; ``None`` = all. Teacher-forced loss and
            accuracy always cover every batch. Generation dominates a validation pass on a large
            held-out set, and the first batches are the same ones every epoch (exact epochs).
        gen_batch_size: utterances generated at once. Evaluation batches are cut by audio seconds,
            so a corpus of long sentences gives batches of one or two utterances, and one decode
            step costs about the same for 1 row as for 16: the texts of several batches are queued
            and generated together (per rank; flushed at the epoch's end).
        asr_decoder: Whisper folder (or hub id) whose decoder transcribes the speech for
            ``gen_wer`` / ``real_wer``; ``"auto"`` (default): the stage-1 artifact's encoder source
            when that is a Whisper model (see :func:`asr_source`); ``None``: off.
        asr_padding: what fills the Whisper window past the speech: ``"silence"`` (the encoder's
            states of a silent window) or ``"zeros"``.
        asr_language: Whisper's language (multilingual models) and the normaliser's when a sample
            names none.
        asr_max_new_tokens: token limit per 30 s window.
        asr_batch_size: windows transcribed at once.
    """

    summary_metrics = ["val/loss", "val/acc", "val/gen_cosine", "val/len_error", "val/word_match"]

    def __init__(
        self, *, lm: SpeechLM | None = None, stage1_artifact: str, artifact: str | None = None,
        lr: float = 3e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant", min_lr_ratio: float = 0.1,
        optimizer: OptimizerCallable | None = None, lr_scheduler: LRSchedulerCallable | None = None, gen_max_frames: int = 250,
        greedy: bool = True, temperature: float = 1.0, top_k: int | None = None,
        eos_rule: Literal["argmax", "median"] = "median", text_dropout: float = 0.0, cfg_scale: float = 1.0,
        word_match_texts: int = 64, gen_batches: int | None = None, gen_batch_size: int = 16,
        asr_decoder: str | None = "auto", asr_padding: Literal["silence", "zeros"] = "silence",
        asr_language: str = "en", asr_max_new_tokens: int = 224, asr_batch_size: int = 16,
    ) -> None:
        super().__init__()
        self._parents: list[dict[str, Any]] = []
        if artifact is not None:
            loaded = load_artifact(artifact, names=["lm"], expect={"lm": SpeechLM})
            self._parents.append(parent_record(loaded))
            lm = loaded["modules"]["lm"]
        if lm is None:
            raise ValueError("stage 2 needs model.init_args.lm or model.init_args.artifact")
        s1 = load_artifact(stage1_artifact, names=["quantizer"], expect={"quantizer": SemanticQuantizer})
        quantizer = s1["modules"]["quantizer"]
        info = s1["config"].get("info", {})
        levels = info.get("num_quantizers", quantizer.num_quantizers)
        size = info.get("codebook_size", quantizer.codebook_size)
        if (levels, size) != (lm.num_levels, lm.codebook_size):
            raise ValueError(
                f"stage-1 artifact {stage1_artifact} has {levels} levels x {size} codes but the SpeechLM "
                f"has num_levels={lm.num_levels}, codebook_size={lm.codebook_size}: make them agree"
            )
        self._parents.insert(0, parent_record(s1))
        self.stage1_info = info
        self.lm = lm
        self.lm.train()  # HF loaders return eval-mode models; Lightning keeps module modes as found
        self.quantizer = quantizer.requires_grad_(False).eval()
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        if lr_schedule not in ("constant", "cosine") or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine' and min_lr_ratio in [0, 1], "
                             f"got {lr_schedule!r}, {min_lr_ratio}")
        self.lr_schedule, self.min_lr_ratio = lr_schedule, min_lr_ratio
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        if not 0.0 <= text_dropout < 1.0:
            raise ValueError(f"text_dropout must be in [0, 1), got {text_dropout}")
        if cfg_scale != 1.0 and text_dropout == 0.0 and artifact is None:
            raise ValueError("cfg_scale != 1 needs a model trained with text_dropout > 0 (the unprompted half)")
        self.gen_max_frames, self.greedy, self.temperature, self.top_k = gen_max_frames, greedy, temperature, top_k
        self.eos_rule, self.text_dropout, self.cfg_scale = eos_rule, text_dropout, cfg_scale
        if gen_batches is not None and gen_batches < 1:
            raise ValueError(f"gen_batches must be >= 1 or None, got {gen_batches}")
        self.gen_batches = gen_batches
        if gen_batch_size < 1:
            raise ValueError(f"gen_batch_size must be >= 1, got {gen_batch_size}")
        self.gen_batch_size = gen_batch_size
        self._queue: list[tuple[str, str, torch.Tensor]] = []  # (text, language, real codes) to generate
        n_out = 1 if lm.output_form == "one_level" else lm.num_levels
        for split in ("val", "test"):
            setattr(self, f"{split}_loss", MeanMetric())
            setattr(self, f"{split}_correct", SumMetric())
            setattr(self, f"{split}_total", SumMetric())
            setattr(self, f"{split}_level_correct", torch.nn.ModuleList(SumMetric() for _ in range(n_out)))
            setattr(self, f"{split}_level_total", torch.nn.ModuleList(SumMetric() for _ in range(n_out)))
            setattr(self, f"{split}_gen_cosine", MeanMetric())
            setattr(self, f"{split}_len_error", MeanMetric())
        self._items = WordMatchItems(word_match_texts)
        self.asr, self.asr_language = None, asr_language
        source = asr_source(asr_decoder, info.get("encoder"), where=str(stage1_artifact))
        if source is not None:
            from models.whisper_asr import WhisperASR

            # Frames the decoded states repeat per Whisper frame: a WhisperVQ decodes at 50 frames/s itself.
            pooling = int((info.get("encoder") or {}).get("pooling", 1)) // int(getattr(quantizer, "decode_upsample", 1))
            self.asr = WhisperASR(source=source, pooling=pooling, padding=asr_padding, language=asr_language,
                                  max_new_tokens=asr_max_new_tokens, batch_size=asr_batch_size)
            if self.asr.dim != quantizer.dim:
                raise ValueError(f"asr_decoder {source} reads {self.asr.dim}-dim states but the stage-1 RVQ "
                                 f"decodes {quantizer.dim}-dim ones: name the Whisper model stage 1 used")
            for split in ("val", "test"):
                for side in ("gen", "real"):
                    setattr(self, f"{split}_{side}_wer", WordErrorRate())
                    setattr(self, f"{split}_{side}_cer", CharErrorRate())
            self.summary_metrics = [*self.summary_metrics, "val/gen_wer", "val/real_wer"]
        self._real_transcripts: dict[bytes, str] = {}  # real codes -> transcript (the RVQ is frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        self.quantizer.eval()  # frozen: never update EMA codebooks or dead-code statistics
        return self

    # ---- inputs -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Speech/token shards only (predict reads a TextInstructionDataModule): no empty-prompt examples.
        datamodule = getattr(self.trainer, "datamodule", None)
        if isinstance(datamodule, SpeechDataModule):
            datamodule.bind(transform=own_text, collate=datamodule.collate)

    @staticmethod
    def _real(batch: dict) -> tuple[list[str], list[torch.Tensor]]:
        """Texts and trimmed codes ``[Q, T_i]`` of the weight > 0 samples."""
        weight = batch.get("sample_weight")
        keep = [i for i in range(len(batch["meta"])) if weight is None or float(weight[i]) > 0]
        texts = [batch["meta"][i]["text"] for i in keep]
        codes = [batch["codes"][i, :, : int(batch["code_lengths"][i])].cpu() for i in keep]
        return texts, codes

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        texts, codes = self._real(batch)
        if not texts:  # a padding batch: a zero loss that still touches every parameter (DDP sync)
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        if self.text_dropout > 0:
            drop = (torch.rand(len(texts)) < self.text_dropout).tolist()
            texts = ["" if d else t for t, d in zip(texts, drop, strict=True)]
        out = self.lm(self.lm.build_batch(texts, codes, loss_on_prompt=False))
        acc = out["correct"].sum() / out["total"].sum().clamp(min=1)
        self.log_dict({"train/loss": out["loss"], "train/acc": acc}, prog_bar=True, batch_size=len(texts))
        if "length_loss" in out:  # a length-conditioned LM: MSE of log frames, and |T_pred - T| in frames
            self.log_dict({"train/length_loss": out["length_loss"], "train/length_error": out["length_error"]},
                          batch_size=len(texts))
        return out["loss"]

    # ---- evaluation ---------------------------------------------------------------------------
    def _states(self, codes: torch.Tensor) -> torch.Tensor:
        """``[Q, T]`` codes -> ``[T, D]`` stage-1 RVQ states."""
        if codes.shape[1] == 0:
            return torch.zeros(0, self.quantizer.dim, device=self.device)
        return self.quantizer.decode(codes[None].to(self.device))[0]

    def _generate(self, texts: list[str]) -> list[torch.Tensor]:
        # min_frames=1: speech of no frames is no utterance, and stage 3 cannot hear it.
        return self.lm.generate(texts, max_frames=self.gen_max_frames, min_frames=1, greedy=self.greedy,
                                temperature=self.temperature, top_k=self.top_k, eos_rule=self.eos_rule,
                                cfg_scale=self.cfg_scale)

    def _eval_step(self, batch: dict, prefix: str, batch_idx: int = 0) -> None:
        texts, codes = self._real(batch)
        if not texts:
            return
        out = self.lm(self.lm.build_batch(texts, codes, loss_on_prompt=False))
        m = lambda name: getattr(self, f"{prefix}_{name}")  # noqa: E731
        m("loss").update(out["loss"].detach(), weight=out["total"].sum())
        m("correct").update(out["correct"].sum())
        m("total").update(out["total"].sum())
        for q in range(len(out["correct"])):
            m("level_correct")[q].update(out["correct"][q])
            m("level_total")[q].update(out["total"][q])
        if self.gen_batches is not None and batch_idx >= self.gen_batches:
            return
        langs = [(meta.get("language") or self.asr_language) for meta in self._live_meta(batch)]
        self._queue += list(zip(texts, langs, codes, strict=True))
        if len(self._queue) >= self.gen_batch_size:
            self._flush(prefix)

    def _flush(self, prefix: str) -> None:
        """Generate the queued texts and update the generation metrics with them."""
        queue, self._queue = self._queue, []
        m = lambda name: getattr(self, f"{prefix}_{name}")  # noqa: E731
        for start in range(0, len(queue), self.gen_batch_size):
            part = queue[start : start + self.gen_batch_size]
            texts, langs, codes = [list(x) for x in zip(*part, strict=True)]
            gen = self._generate(texts)
            gen_states, real_states = [], []
            for text, g, r in zip(texts, gen, codes, strict=True):
                gs, rs = self._states(g), self._states(r)
                m("gen_cosine").update(aligned_cosine(gs, rs))
                m("len_error").update(abs(g.shape[1] - r.shape[1]))
                self._items.add(text, gs.cpu(), rs.cpu())
                gen_states.append(gs)
                real_states.append(rs)
            if self.asr is not None:
                self._score_asr(prefix, texts, langs, gen_states, real_states, codes)

    @staticmethod
    def _live_meta(batch: dict) -> list[dict]:
        weight = batch.get("sample_weight")
        return [m for i, m in enumerate(batch["meta"]) if weight is None or float(weight[i]) > 0]

    def _transcribe(self, states: list[torch.Tensor]) -> list[str]:
        lengths = torch.tensor([s.shape[0] for s in states])
        padded = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
        return self.asr.transcribe_states(padded, lengths)

    def _score_asr(self, prefix: str, texts: list[str], langs: list[str], gen_states: list[torch.Tensor],
                   real_states: list[torch.Tensor], codes: list[torch.Tensor]) -> None:
        """Update ``{prefix}_{gen,real}_{wer,cer}`` with the transcripts of generated and real codes."""
        refs = [normalize_transcript(t, lang) for t, lang in zip(texts, langs, strict=True)]
        keep = [i for i, ref in enumerate(refs) if ref]  # a text with no word left scores nothing
        if not keep:
            return
        hyp_gen = self._transcribe([gen_states[i] for i in keep])
        keys = [codes[i].numpy().tobytes() + bytes(str(tuple(codes[i].shape)), "ascii") for i in keep]
        todo = [j for j, key in enumerate(keys) if key not in self._real_transcripts]
        if todo:
            for j, hyp in zip(todo, self._transcribe([real_states[keep[j]] for j in todo]), strict=True):
                self._real_transcripts[keys[j]] = hyp
        hyp_real = [self._real_transcripts[key] for key in keys]
        ref = [refs[i] for i in keep]
        for side, hyps in (("gen", hyp_gen), ("real", hyp_real)):
            norm = [normalize_transcript(h, langs[i]) for h, i in zip(hyps, keep, strict=True)]
            getattr(self, f"{prefix}_{side}_wer").update(norm, ref)
            getattr(self, f"{prefix}_{side}_cer").update(norm, ref)

    def _eval_epoch_end(self, prefix: str) -> None:
        m = lambda name: getattr(self, f"{prefix}_{name}")  # noqa: E731
        self._flush(prefix)
        if m("total").compute() == 0:
            return
        self.log(f"{prefix}/loss", m("loss").compute())
        self.log(f"{prefix}/acc", m("correct").compute() / m("total").compute().clamp(min=1))
        for q, (c, t) in enumerate(zip(m("level_correct"), m("level_total"), strict=True)):
            self.log(f"{prefix}/acc_l{q}", c.compute() / t.compute().clamp(min=1))
        self.log(f"{prefix}/gen_cosine", m("gen_cosine").compute())
        self.log(f"{prefix}/len_error", m("len_error").compute())
        frac, n_words = word_match(self._items.gather())  # the same items, and figure, on every rank
        if n_words >= 2:
            self.log(f"{prefix}/word_match", frac)
            self.log(f"{prefix}/word_match_chance", 1.0 / n_words)
            if prefix == "test" and self.global_rank == 0:
                print(f"[stage2] test/word_match {frac:.3f} over {n_words} distinct texts (chance {1 / n_words:.3f})", flush=True)
        if self.asr is not None:
            scores = {f"{side}_{kind}": getattr(self, f"{prefix}_{side}_{kind}") for side in ("gen", "real")
                      for kind in ("wer", "cer")}
            if int(scores["gen_wer"].total.sum()) > 0 or dist_utils.is_dist():  # the same on every rank
                values = {k: metric.compute() for k, metric in scores.items()}
                if bool(torch.isfinite(values["gen_wer"])):
                    for k, v in values.items():
                        self.log(f"{prefix}/{k}", v)
                    if prefix == "test" and self.global_rank == 0:
                        print(f"[stage2] test/gen_wer {float(values['gen_wer']):.3f} (real speech's codes: "
                              f"{float(values['real_wer']):.3f}), gen_cer {float(values['gen_cer']):.3f} "
                              f"(real {float(values['real_cer']):.3f})", flush=True)
            for metric in scores.values():
                metric.reset()
        self._items.clear()
        for name in ("loss", "correct", "total", "gen_cosine", "len_error"):
            m(name).reset()
        for metric in [*m("level_correct"), *m("level_total")]:
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ---- synthesis ----------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Codes for instruction texts, for :class:`stages.writers.ShardPredictionWriter` (kind tokens).

        Returns:
            ``{"keys": [B], "meta": [B] (instruction, response, text, ...), "codes": list of
            LongTensor [Q, T_i], "weights": [B]}``; weight-0 padding copies are not generated.
        """
        weights = [float(w) for w in batch["sample_weight"]]
        live = [i for i, w in enumerate(weights) if w > 0]
        gen = self._generate([batch["texts"][i] for i in live]) if live else []
        q_n = 1 if self.lm.output_form == "one_level" else self.lm.num_levels
        codes = [torch.zeros(q_n, 0, dtype=torch.long) for _ in weights]
        for i, g in zip(live, gen, strict=True):
            codes[i] = g
        meta = [{**m, "text": t} for m, t in zip(batch["meta"], batch["texts"], strict=True)]
        return {"keys": batch["keys"], "meta": meta, "codes": codes, "weights": weights}

    def prediction_settings(self) -> dict[str, Any]:
        """The decoding options that decide what ``predict`` writes; with the weights, the fingerprint by
        which :class:`stages.writers.ShardPredictionWriter` resumes only a run of the same synthesis."""
        return {"gen_max_frames": self.gen_max_frames, "greedy": self.greedy, "temperature": self.temperature,
                "top_k": self.top_k, "eos_rule": self.eos_rule, "cfg_scale": self.cfg_scale}

    # ---- promotion ----------------------------------------------------------------------------
    def artifact_modules(self, config: dict[str, Any]) -> dict[str, ArtifactModule]:
        """The SpeechLM in its own pickle-free folder (``lm/``), rebuilt by ``SpeechLM.load``."""
        return {"lm": ArtifactModule("models.speech_lm.SpeechLM.load", {"directory": "@artifact/lm"}, save=self.lm.save)}

    def artifact_info(self) -> dict[str, Any]:
        return {
            "num_levels": self.lm.num_levels,
            "codebook_size": self.lm.codebook_size,
            "output_form": self.lm.output_form,
            "delay": self.lm.delay,
            "stage1": self._parents[0],
        }

    def parent_artifacts(self) -> list[dict[str, Any]]:
        return list(self._parents)

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.lm.parameters() if p.requires_grad]
        optimizer = self.optimizer or default_optimizer(lr=self.lr, weight_decay=self.weight_decay)
        lr_scheduler = self.lr_scheduler or partial(
            WarmupCosine, warmup_steps=self.warmup_steps, decay=self.lr_schedule, min_lr_ratio=self.min_lr_ratio
        )
        return configure(params, optimizer=optimizer, lr_scheduler=lr_scheduler, total_steps=lambda: fit_steps(self.trainer))
