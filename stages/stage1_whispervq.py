"""Stage 1, Ichigo's way: a WhisperVQ trained through the frozen Whisper decoder.

Ichigo-Whisper (Homebrew; janhq/WhisperSpeech ``ichigo-whisper``, after collabora/WhisperSpeech's
``vq_stoks.py``) trains its quantizer (:class:`models.whisper_vq.WhisperVQ`) by what the frozen
Whisper decoder makes of its output, not by reconstruction: in phase 1 the cross-entropy of the
transcript plus the KL divergence to the *teacher* (the same decoder reading the unquantized 50
frames/s encoder states), in phase 2 the cross-entropy alone. Its codes are one-level semantic
tokens at 25 frames/s that stage 2 (one-level form) and stage 3 (tokens mode) read like the RVQ's.

How the decoder is fed, in training, validation and stage 2's ``gen_wer`` alike: the clip's real
frames (the quantizer's 50 frames/s states, or the teacher's encoder states), then the rest of
the window filled with the model's own encoder states of a silent window
(:meth:`models.whisper_asr.WhisperASR.windows`). Clips must fit one window (30 s for the real
models; ``speechless-prepare`` cuts longer recordings).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric
from torchmetrics.text import WordErrorRate
from transformers.modeling_outputs import BaseModelOutput

from models.encoders import WhisperEncoder
from models.encoders.whisper import _pair_mean
from models.whisper_asr import WhisperASR
from models.whisper_vq import WhisperVQ
from stages.artifacts import load_artifact, parent_record
from stages.metrics import CodebookUsage, normalize_transcript
from stages.optim import configure, default_optimizer, fit_steps
from stages.stage1 import RVQStage, check_encoder_matches

__all__ = ["WhisperVQStage"]

IGNORE = -100


class WhisperVQStage(LightningModule):
    """Trains a :class:`WhisperVQ` with the frozen Whisper decoder; tokenizes speech in ``predict``.

    Loss: phase 1 ``ce + kl_weight * kl + commit_weight * commit``, phase 2 ``ce + commit_weight *
    commit``; ``ce`` is the decoder's cross-entropy of the transcript (the shards' ``text``, with
    Whisper's prompt ``<|startoftranscript|>[<|lang|><|transcribe|>]<|notimestamps|>`` and
    ``<|endoftext|>``) on the quantized states, ``kl`` is ``KL(teacher || student)`` per target
    token, both means over target tokens; ``commit`` is the VQ's commitment term. Samples of weight
    0 (the datamodule's padding) count nowhere.

    Validation: ``val/loss`` (the cross-entropy, comparable across phases), ``val/wer`` (greedy
    transcripts of the quantized states through the frozen decoder against the transcripts, after
    Whisper's normaliser for the sample's ``language``: the tokenizer's WER, what stage 2 reports as
    ``real_wer``), ``val/utilisation`` and ``val/perplexity`` of the codes (the mask code counts as
    a code that real frames never get), and with ``teacher_wer`` the WER of the unquantized states.

    Args:
        quantizer: the WhisperVQ; may be omitted when ``artifact`` is given.
        encoder: the frozen Whisper encoder, ``pooling=2`` (25 frames/s); its weights never enter a
            checkpoint. The teacher's 50 frames/s states come from the same pass.
        whisper: the Whisper model whose decoder trains and scores the quantizer: ``"auto"`` = the
            encoder's own ``source`` (a hub id or folder), or a hub id / folder of the same model.
        artifact: a promoted WhisperVQ stage-1 artifact to start from (to tokenize with it, or to
            run phase 2 after phase 1); the quantizer and encoder given must match it.
        init_codebook_from: a promoted WhisperVQ artifact whose real codes are tiled, with
            ``init_noise``, into this quantizer's book (Ichigo's 512 -> 2048 start).
        init_noise: noise of that tiling.
        phase1_steps, phase1_epochs: the KL term is on while ``global_step < phase1_steps`` (or
            ``current_epoch < phase1_epochs``); give at most one; neither: phase 1 throughout.
        kl_weight, commit_weight: weights of the KL and commitment terms.
        language: Whisper's prompt language (multilingual models) and the normaliser's default.
        max_target_tokens: transcript tokens kept per clip.
        wer_batches: transcribe (greedy, the costly part) only the first this many evaluation
            batches per rank; None = all.
        teacher_wer: also log ``{val,test}/teacher_wer``, the floor the quantizer approaches.
        lr, weight_decay: AdamW's, when ``optimizer`` is unset.
        optimizer, lr_scheduler: injected from the YAML (see :mod:`stages.optim`).
    """

    summary_metrics = ["val/loss", "val/wer", "val/utilisation", "val/perplexity"]

    def __init__(
        self,
        *,
        quantizer: WhisperVQ | None = None,
        encoder: WhisperEncoder | None = None,
        whisper: str = "auto",
        artifact: str | None = None,
        init_codebook_from: str | None = None,
        init_noise: float = 0.01,
        phase1_steps: int | None = None,
        phase1_epochs: int | None = None,
        kl_weight: float = 1.0,
        commit_weight: float = 1.0,
        language: str = "en",
        max_target_tokens: int = 128,
        wer_batches: int | None = None,
        teacher_wer: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self._artifact_config: dict[str, Any] | None = None
        self._parents: list[dict[str, Any]] = []
        if artifact is not None:
            quantizer = self._from_artifact(artifact, quantizer, encoder)
        if quantizer is None:
            raise ValueError("stage 1 (WhisperVQ) needs model.init_args.quantizer or model.init_args.artifact")
        if encoder is None or not isinstance(encoder, WhisperEncoder):
            raise ValueError("the WhisperVQ stage needs a models.encoders.WhisperEncoder (its decoder is Whisper's)")
        if encoder.pooling != 2 or encoder.center_states:
            raise ValueError("the WhisperVQ reads WhisperEncoder(pooling=2) states, uncentred (center_states: false)")
        if encoder.dim != quantizer.dim:
            raise ValueError(f"encoder gives {encoder.dim}-dim states but quantizer.dim={quantizer.dim}")
        if phase1_steps is not None and phase1_epochs is not None:
            raise ValueError("give phase1_steps or phase1_epochs, not both")
        source = encoder.source if whisper == "auto" else whisper
        if not source:
            raise ValueError("whisper: 'auto' needs an encoder loaded from a source (hub id or folder)")
        self.quantizer, self.encoder = quantizer, encoder
        self.asr = WhisperASR(source=str(source), pooling=1, padding="silence", language=language)
        if self.asr.dim != quantizer.dim or self.asr.window != quantizer.window:
            raise ValueError(f"Whisper {source} reads {self.asr.window} x {self.asr.dim} windows but the quantizer "
                             f"has window={quantizer.window}, dim={quantizer.dim}")
        self.whisper_source = str(source)
        if init_codebook_from is not None:
            loaded = load_artifact(init_codebook_from, names=["quantizer"], expect={"quantizer": WhisperVQ})
            earlier: WhisperVQ = loaded["modules"]["quantizer"]
            quantizer.init_codebook_from(earlier.codebook[earlier.real_codes], noise=init_noise)
            self._parents.append(parent_record(loaded))
        self.phase1_steps, self.phase1_epochs = phase1_steps, phase1_epochs
        self.kl_weight, self.commit_weight = kl_weight, commit_weight
        self.language, self.max_target_tokens = language, max_target_tokens
        self.wer_batches, self.teacher_wer = wer_batches, teacher_wer
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        for split in ("val", "test"):
            setattr(self, f"{split}_loss", MeanMetric())  # per target token, over the epoch and all ranks
            setattr(self, f"{split}_usage", CodebookUsage(num_quantizers=1, codebook_size=quantizer.codebook_size))
            setattr(self, f"{split}_wer", WordErrorRate())
            setattr(self, f"{split}_teacher_wer", WordErrorRate())

    def _from_artifact(self, path: str, quantizer: WhisperVQ | None, encoder: WhisperEncoder | None) -> WhisperVQ:
        loaded = load_artifact(path, names=["quantizer"], expect={"quantizer": WhisperVQ})
        self._artifact_config = loaded["config"]
        self._parents.append(parent_record(loaded))
        built: WhisperVQ = loaded["modules"]["quantizer"]
        if quantizer is not None:
            for attr in ("codebook_size", "mask_code", "codebook_dim", "dim", "window"):
                if getattr(quantizer, attr) != getattr(built, attr):
                    raise ValueError(f"artifact {path} has {attr}={getattr(built, attr)} but the config asks for "
                                     f"{getattr(quantizer, attr)}: drop model.init_args.quantizer or make them agree")
            quantizer.load_state_dict(built.state_dict())
            built = quantizer
        recorded = (loaded["config"].get("info") or {}).get("encoder")
        if encoder is not None and recorded:
            check_encoder_matches(recorded, encoder.describe(), where=path)
        return built

    # ---- promotion ----------------------------------------------------------------------------
    # The WhisperVQ with weights, the encoder by reference (no weights): RVQStage's own, for the same
    # attributes (``quantizer``, ``_artifact_config``).
    artifact_modules = RVQStage.artifact_modules

    def artifact_info(self) -> dict[str, Any]:
        """What later stages check: one level of ``codebook_size`` codes at 25 frames/s, decoded at 50."""
        q = self.quantizer
        return {
            "tokenizer": "whisper_vq", "num_quantizers": 1, "codebook_size": q.codebook_size, "mask_code": q.mask_code,
            "dim": q.dim, "codebook_dim": q.codebook_dim, "frame_rate": self.encoder.frame_rate,
            "decoded_frame_rate": self.encoder.frame_rate * q.decode_upsample, "encoder": self.encoder.describe(),
            "decoder": self.whisper_source,
        }  # fmt: skip

    def parent_artifacts(self) -> list[dict[str, Any]]:
        return list(self._parents)

    # ---- inputs -------------------------------------------------------------------------------
    def states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One encoder pass: ``x [B, T, D]`` at 25 frames/s and its ``mask``, the 50 frames/s
        ``full [B, 2T', D]`` and their ``full_frames [B]`` (0 for weight-0 samples)."""
        self.encoder.pooling = 1  # the teacher's full-rate states; pooled below exactly as pooling=2 would
        try:
            out = self.encode_audio(batch)
        finally:
            self.encoder.pooling = 2
        full, full_frames = out.states.float(), out.lengths
        x, frames = _pair_mean(full, full_frames)
        weight = batch.get("sample_weight")
        if weight is not None:
            live = (weight > 0).to(frames.device)
            frames, full_frames = frames * live, full_frames * live
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < frames[:, None]
        return x, mask, full, full_frames

    def encode_audio(self, batch: dict):
        # Mel features are computed outside a mixed-precision run's autocast (numpy has no bf16);
        # the encoder applies its own ``dtype`` inside.
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.encoder(batch["audio"], batch["audio_lengths"])

    def windows(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` 50 frames/s states -> ``[B, W, D]`` decoder windows (silence past the frames)."""
        with torch.autocast(device_type=self.device.type, enabled=False):  # the silence states' mel features
            windows, _, owner = self.asr.windows(states.float(), lengths)
        if len(owner) != states.shape[0]:
            raise ValueError(f"a clip is longer than the Whisper window ({self.asr.window} frames): cut it first")
        return windows

    def targets(self, batch: dict, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing ``input_ids [B, L]`` and ``labels [B, L]`` (``-100`` off the transcript)."""
        prompt, eos, tok = self.asr.prompt, self.asr.eos_id, self.asr.tokenizer
        room = min(self.max_target_tokens, int(self.asr.model.config.max_target_positions) - len(prompt) - 1)
        rows = []
        for meta, keep in zip(batch["meta"], live.tolist(), strict=True):
            text = str(meta.get("text") or "").strip()
            ids = tok(" " + text, add_special_tokens=False)["input_ids"][:room] if keep else []
            labels = [IGNORE] * (len(prompt) - 1) + (list(ids) + [eos] if keep else [IGNORE])
            rows.append((prompt + list(ids), labels))
        length = max(len(r[0]) for r in rows)
        inputs = torch.tensor([i + [eos] * (length - len(i)) for i, _ in rows], device=self.device)
        labels = torch.tensor([lab + [IGNORE] * (length - len(lab)) for _, lab in rows], device=self.device)
        return inputs, labels

    # ---- losses -------------------------------------------------------------------------------
    def phase(self) -> int:
        if self.phase1_steps is not None:
            return 1 if self.global_step < self.phase1_steps else 2
        if self.phase1_epochs is not None:
            return 1 if self.current_epoch < self.phase1_epochs else 2
        return 1

    def logits(self, windows: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        out = self.asr.model(encoder_outputs=BaseModelOutput(last_hidden_state=windows), decoder_input_ids=inputs)
        return out.logits.float()

    def losses(self, student: torch.Tensor, teacher: torch.Tensor | None, inputs: torch.Tensor, labels: torch.Tensor,
               commit: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        """Named terms from decoder windows ``[B, W, D]``: ``ce`` and ``commit`` always, ``kl`` with a teacher."""
        logits = self.logits(student, inputs)
        target = labels != IGNORE
        n = target.sum().clamp_min(1)
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum") / n
        terms = {"ce": ce, "commit": commit}
        total = ce + self.commit_weight * commit
        if teacher is not None:
            with torch.no_grad():
                log_t = self.logits(teacher, inputs).log_softmax(-1)
            kl = F.kl_div(logits.log_softmax(-1), log_t, log_target=True, reduction="none").sum(-1)
            terms["kl"] = (kl * target).sum() / n
            total = total + self.kl_weight * terms["kl"]
        return {"loss": total, **terms}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, mask, full, full_frames = self.states(batch)
        out = self.quantizer(x, mask)
        phase = self.phase()
        inputs, labels = self.targets(batch, mask.any(1))
        teacher = self.windows(full, full_frames) if phase == 1 else None
        losses = self.losses(self.windows(out.states, out.lengths), teacher, inputs, labels, out.commit_loss)
        logged = {f"train/{k}": v.detach() for k, v in losses.items()}
        self.log_dict({**logged, "train/phase": float(phase)}, prog_bar=True, batch_size=x.shape[0])
        return {"loss": losses["loss"], **{k: v.detach() for k, v in losses.items() if k != "loss"}}

    # ---- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: dict, prefix: str, batch_idx: int) -> None:
        x, mask, full, full_frames = self.states(batch)
        out = self.quantizer(x, mask)
        live = mask.any(1)
        if not bool(live.any()):
            return
        inputs, labels = self.targets(batch, live)
        student = self.windows(out.states, out.lengths)
        losses = self.losses(student, None, inputs, labels, out.commit_loss)
        getattr(self, f"{prefix}_loss").update(losses["ce"].detach(), weight=(labels != IGNORE).sum())
        getattr(self, f"{prefix}_usage").update(out.codes, mask)
        if self.wer_batches is not None and batch_idx >= self.wer_batches:
            return
        keep = live.nonzero().squeeze(1).tolist()
        langs = [batch["meta"][i].get("language") or self.language for i in keep]
        refs = [normalize_transcript(str(batch["meta"][i].get("text") or ""), lang) for i, lang in zip(keep, langs, strict=True)]
        sides = [("wer", student, out.lengths)] + ([("teacher_wer", self.windows(full, full_frames), full_frames)] if self.teacher_wer else [])
        for name, windows, frames in sides:
            hyps = self.asr.decode(windows[keep], frames[keep].cpu())
            hyps = [normalize_transcript(h, lang) for h, lang in zip(hyps, langs, strict=True)]
            scored = [(h, r) for h, r in zip(hyps, refs, strict=True) if r]  # a text with no word left scores nothing
            if scored:
                getattr(self, f"{prefix}_{name}").update([h for h, _ in scored], [r for _, r in scored])

    def _eval_epoch_end(self, prefix: str) -> None:
        stats = getattr(self, f"{prefix}_usage").compute()
        self.log(f"{prefix}/utilisation", stats["utilisation_overall"])
        self.log(f"{prefix}/perplexity", stats["perplexity_mean"])
        for name in ("loss", "wer", "teacher_wer") if self.teacher_wer else ("loss", "wer"):
            metric = getattr(self, f"{prefix}_{name}")
            value = metric.compute()  # collective: every rank calls it, also one that saw no sample
            if bool(torch.isfinite(value)):
                self.log(f"{prefix}/{name}", value)
            metric.reset()
        getattr(self, f"{prefix}_usage").reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ---- tokenization -------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Codes ``[1, T_i]`` per utterance for :class:`stages.writers.ShardPredictionWriter`."""
        out = self.encode_audio(batch)
        x, mask = out.states.float(), out.mask
        codes = self.quantizer.encode(x, mask)  # [B, 1, T]
        lengths = mask.sum(1)
        weight = batch.get("sample_weight")
        return {
            "keys": batch["keys"],
            "meta": batch.get("meta", [{} for _ in batch["keys"]]),
            "weights": weight.tolist() if weight is not None else [1.0] * x.shape[0],
            "codes": [codes[i, :, : int(lengths[i])].cpu() for i in range(codes.shape[0])],
        }

    # ---- checkpoints and optimisation -----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["whisper_vq_generator"] = self.quantizer.generator_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "whisper_vq_generator" in checkpoint:
            self.quantizer.set_generator_state(checkpoint["whisper_vq_generator"])

    def configure_optimizers(self):
        params = [p for p in self.quantizer.parameters() if p.requires_grad]
        optimizer = self.optimizer or default_optimizer(lr=self.lr, weight_decay=self.weight_decay)
        return configure(params, optimizer=optimizer, lr_scheduler=self.lr_scheduler, total_steps=lambda: fit_steps(self.trainer))
