"""Stage 3: fine-tune Gemma 4 (LoRA) on synthetic spoken instructions, answer real speech.

Follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417), stage 3: the instructions' semantic
tokens (stage 2) are dequantized by the frozen stage-1 RVQ into the Gemma 4 audio encoder's own
pre-projection space and enter the LLM through its native audio path (``models.spoken_llm.SpokenLLM``);
only LoRA trains, on the response tokens. Validation also feeds *real* speech of held-out speakers
through the audio tower and scores greedy answers (``eval_task``): a closed task by exact match of an
answer the data carries (``exact:json:<field>``; the demo's next digit, ``val/spoken_accuracy``), an open one (the transcript itself, ``repeat``, or any
field of the shard's json, ``json:reference``) by WER/CER after the normaliser of the speech's language
(``val/spoken_wer``, ``val/spoken_cer``), which checkpoint choice (``ModelCheckpoint(monitor=
"val/spoken_wer", mode="min")``), the summary table and the promotion gates can use.

For a text-only causal LM (e.g. Gemma 3) there are two ways. ``llm.input_mode: tokens``: the codes are
written into the prompt as Ichigo-style sound tokens (``SpokenLLM.example``). ``llm.input_mode:
embeddings`` with a projector (``llm.audio_path: projector``, the default for an LLM without an audio
tower; any stage-1 encoder, Whisper included): the dequantized states go through a trainable
``models.projector.AudioProjector`` (frame stacking + MLP, as Ultravox) into placeholder slots. In both,
real speech reaches the LLM through the stage-1 artifact's own frozen encoder (``attach_stage1``),
normalised as stage 1 normalised it (and, for the projector, through the RVQ round trip when
``rvq_round_trip``). With ``llm.ctc_weight > 0`` the datamodule also gets each spoken instruction's
text as CTC targets.

Checkpoints hold only the trainable weights (``DESIGN.md``: a LoRA checkpoint holds the adapter, and
the projector when there is one); the promoted artifact holds the PEFT adapter (with the projector's
``projector.safetensors``), a merged Hugging Face export, and a ``projector`` module entry that
``load_artifact`` rebuilds from the adapter folder (``AudioProjector.load``).
"""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torchmetrics import MeanMetric
from torchmetrics.text import CharErrorRate, WordErrorRate

from datamodules.audio import split_at_silence
from datamodules.pipeline import read_recordings
from models.chat_format import collate_instructions
from models.encoders import FrozenEncoder
from models.quantizer import SemanticQuantizer
from models.spoken_llm import SpokenLLM
from models.spoken_llm_teacher import TEACHERS
from stages.artifacts import ArtifactModule, load_artifact, parent_record
from stages.optim import WarmupCosine, configure, default_optimizer
from stages.stage1 import check_encoder_matches
from stages.tasks import check_eval_task, eval_reference, exact_match, normalizer

__all__ = ["SpokenInstructionStage", "attach_stage1", "collate_instructions"]


def audio_normalization(stage1_config: dict[str, Any]) -> dict[str, Any]:
    """The per-utterance normalisation a stage-1 artifact's encoder applied (``config.json`` info)."""
    encoder = (stage1_config.get("info") or {}).get("encoder") or {}
    return {"level_db": encoder.get("level_db"), "center_states": bool(encoder.get("center_states", False))}


def attach_stage1(llm: SpokenLLM, path: str, *, encoder: bool = False) -> dict[str, Any]:
    """Attach a stage-1 artifact's frozen RVQ (and, for tokens mode, its encoder) to ``llm``, checked.

    Args:
        llm: The stage-3 model.
        path: Promoted stage-1 folder.
        encoder: Also rebuild the encoder stage 1 was trained on (``input_mode="tokens"`` and the
            projector path hear real speech through it); it must be reloadable (a hub id or folder, or
            weight-free) and match the artifact's ``info.encoder`` (kind, source, dim, frame rate, layer,
            normalisation).

    Returns:
        ``load_artifact``'s dict.

    Raises:
        ValueError: On levels/codebook/dim mismatches or an encoder that cannot be rebuilt.
    """
    loaded = load_artifact(path, names=["quantizer", "encoder"] if encoder else ["quantizer"],
                           expect={"quantizer": SemanticQuantizer, "encoder": FrozenEncoder})  # fmt: skip
    rvq = loaded["modules"]["quantizer"]
    got, want = (rvq.num_quantizers, rvq.codebook_size), (llm.num_levels, llm.codebook_size)
    if got != want:
        raise ValueError(
            f"stage-1 artifact {path} has {got[0]} levels x {got[1]} codes but the LLM expects "
            f"{want[0]} x {want[1]}: set llm.init_args.num_levels/codebook_size to match"
        )
    if llm.audio_path == "native":  # the projector checks its own width (attach_rvq)
        width = llm.base.model.audio_tower.output_proj.in_features
        if rvq.dim != width:
            raise ValueError(f"stage-1 RVQ dim {rvq.dim} != the audio tower's pre-projection width {width}")
    llm.attach_rvq(rvq)
    # Real speech must reach the RVQ normalised as the stage-1 encoder normalised its training states.
    llm.set_audio_normalization(**audio_normalization(loaded["config"]))
    if encoder:
        built = loaded["modules"].get("encoder")
        if built is None:
            raise ValueError(f"stage-1 artifact {path} records no encoder (trained on cached states?): "
                             f"{llm.audio_path or 'tokens'} mode cannot hear real speech without it")  # fmt: skip
        described, recorded = built.describe(), (loaded["config"].get("info") or {}).get("encoder") or {}
        if built.model is not None and described["source"] is None:
            raise ValueError(f"stage-1 artifact {path}: its encoder has config-built random weights, which "
                             "cannot be rebuilt; train stage 1 on an encoder saved to a folder (source=)")  # fmt: skip
        if recorded:
            check_encoder_matches(recorded, described, where=str(path))
            for key in ("level_db", "center_states"):
                if recorded.get(key) != described.get(key):
                    raise ValueError(f"stage-1 artifact {path}: encoder {key} {described.get(key)!r} != "
                                     f"recorded {recorded.get(key)!r}")  # fmt: skip
        if built.dim != rvq.dim:
            raise ValueError(f"stage-1 encoder gives {built.dim}-dim states but the RVQ has dim {rvq.dim}")
        llm.attach_encoder(built)
    return loaded




class SpokenInstructionStage(LightningModule):
    """Gemma 4 + LoRA answering spoken instructions (Speechless stage 3).

    Args:
        llm: The wrapped LLM (``models.spoken_llm.SpokenLLM``), built from the config.
        stage1_artifact: Promoted stage-1 folder; its RVQ is attached frozen (levels/codebook must match),
            and in tokens mode with ``eval_audio_shards`` also its encoder (see ``attach_stage1``).
        lr: AdamW peak learning rate of the LoRA weights.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps, then cosine decay to 10 % over the run.
        optimizer: Trainable parameters -> optimiser (``class_path``/``init_args`` in the YAML); unset:
            AdamW with ``lr`` and ``weight_decay`` (:mod:`stages.optim`), which it replaces.
        lr_scheduler: Optimiser -> scheduler, stepped every optimiser step; unset:
            :class:`stages.optim.WarmupCosine` with ``warmup_steps`` (``count_this_step=False``), which it replaces.
        eval_audio_shards: Audio shards of real speech (held-out speakers) scored at each validation end.
            Recordings that preparation cut into pieces are joined and heard whole, scored against the
            whole transcript (``datamodules.pipeline.read_recordings``); one with pieces missing is left out.
        eval_task: The reference answer of each real utterance, and how it is scored: ``repeat``
            (open: the transcript ``json.text`` itself; the default, which any transcribed corpus
            has), ``json:<field>`` (open: the sample's own ``json[<field>]``, e.g. ``json:reference``
            or ``json:response`` written by ``speechless-prepare`` from a manifest column) or
            ``exact:json:<field>`` (closed: exact match of the answer's first word with that field,
            ``val/spoken_accuracy``, printed with its chance 1/k for k distinct answers; the demo's
            digit task is ``exact:json:answer``). Open tasks log ``val/spoken_wer`` and
            ``val/spoken_cer`` (WER/CER over the whole set) and ``val/spoken_accuracy`` (the share of
            answers equal to the reference after normalisation); choose checkpoints on
            ``val/spoken_wer`` with ``mode: min``.
        eval_closed_task: Deprecated name of ``eval_task`` (accepted, with a ``DeprecationWarning``).
        eval_language: Text normaliser of WER/CER and of open-task matches for every utterance
            (Whisper's English one for ``en``, its basic one otherwise); ``None`` (default): each
            utterance's own ``json.language`` (none recorded: the basic one).
        eval_instruction_text: Text placed before the audio in the eval prompt (as in training).
        eval_max_samples: Cap on scored utterances (``None``: all).
        eval_batch_size: Utterances per ``generate`` call.
        eval_max_new_tokens: Cap on each answer's tokens; ``None``: 4 for a closed task, and for an open
            one twice the longest reference's tokens in the batch plus 8 (sentences need more than 48).
        rvq_round_trip: Embeddings mode (native or projector): pass real speech's encoder states through
            RVQ encode/decode before the LLM, as in training (tokens mode always goes through the RVQ:
            its tokens are codes). Recorded in the artifact; ``speechless-infer`` follows it.
        pack: Train on packed rows: each batch's examples several to a row (rows levelled to the same
            length), attention kept inside each example by positions that restart and no attention mask
            (``collate_instructions``); the same loss as padded rows, with far fewer pad tokens.
            ``train/real_token_share`` (non-pad / all tokens of a batch) is logged either way.
        max_tokens_per_row: Row capacity when packing, in LLM positions (audio slots included).
        text_teacher: Text-teacher distillation (as Ultravox): every spoken example is also built with
            its instruction as text (the transcript stage 2 spoke) and the same response, and the loss adds
            ``text_teacher_weight x KL(teacher || student)`` over the response tokens, per token
            (``train/kl``); the CE stays. ``"base"``: the frozen base LLM (adapters off) is the teacher,
            ``"self"``: the model being trained (adapters on, no gradient); ``None``: off.
        text_teacher_weight: Weight of the KL term.
    """

    def __init__(
        self,
        *,
        llm: SpokenLLM,
        stage1_artifact: str | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        eval_audio_shards: str | None = None,
        eval_task: str = "repeat",
        eval_closed_task: str | None = None,
        eval_language: str | None = None,
        eval_instruction_text: str | None = None,
        eval_max_samples: int | None = None,
        eval_batch_size: int = 16,
        eval_max_new_tokens: int | None = None,
        rvq_round_trip: bool = True,
        pack: bool = False,
        max_tokens_per_row: int = 512,
        text_teacher: Literal["base", "self"] | None = None,
        text_teacher_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if max_tokens_per_row < 1:
            raise ValueError(f"max_tokens_per_row must be >= 1, got {max_tokens_per_row}")
        if text_teacher not in (None, *TEACHERS):
            raise ValueError(f"text_teacher must be null, 'base' or 'self', got {text_teacher!r}")
        if text_teacher_weight < 0:
            raise ValueError(f"text_teacher_weight must be >= 0, got {text_teacher_weight}")
        self.text_teacher, self.text_teacher_weight = text_teacher, float(text_teacher_weight)
        self.llm = llm
        self.pack, self.max_tokens_per_row = pack, max_tokens_per_row
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.eval_audio_shards, self.eval_instruction_text = eval_audio_shards, eval_instruction_text
        if eval_closed_task is not None:
            warnings.warn("SpokenInstructionStage: eval_closed_task is deprecated, it is now eval_task "
                          "(which also takes open tasks: repeat, json:<field>)", DeprecationWarning, stacklevel=2)  # fmt: skip
            eval_task = eval_closed_task
        self.eval_task, self.eval_open = eval_task, check_eval_task(eval_task)
        self._eval_answers = 0  # distinct references of the last spoken evaluation (its chance)
        self.eval_language = eval_language
        self.eval_max_samples, self.eval_batch_size = eval_max_samples, eval_batch_size
        self.eval_max_new_tokens = eval_max_new_tokens
        self.rvq_round_trip = rvq_round_trip
        # Checkpoints carry only the adapter: the frozen base reloads from its source.
        self.strict_loading = False
        self._parents: list[dict[str, Any]] = []
        self._stage1_encoder: dict[str, Any] | None = None
        if stage1_artifact is not None:
            self._attach_stage1(stage1_artifact)
        self.val_loss = MeanMetric()
        self.val_ctc = MeanMetric()

    def _attach_stage1(self, path: str) -> None:
        # Tokens mode and the projector hear real speech through the stage-1 encoder: loaded only when
        # validation needs it (speechless-infer loads it from the artifact the stage-3 one records).
        encoder = self.llm.hears_through_encoder and bool(self.eval_audio_shards)
        loaded = attach_stage1(self.llm, path, encoder=encoder)
        self._parents = [parent_record(loaded)]
        self._stage1_encoder = (loaded["config"].get("info") or {}).get("encoder")

    # ---- data binding ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "bind"):
            datamodule.bind(
                build_example=self.llm.example,  # codes -> audio slots (embeddings) or sound tokens (tokens)
                collate=partial(collate_instructions, pad_id=self.llm.pad_id, pack=self.pack,
                                max_tokens_per_row=self.max_tokens_per_row),
                ctc_targets=self.llm.ctc_targets if self.llm.ctc_weight > 0 else None,
                **({"text_teacher": True} if self.text_teacher else {}),
            )

    # ---- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.llm(batch)
        loss = out["loss"]
        bs = batch["input_ids"].shape[0]
        if self.text_teacher:
            # No collective in the teacher's forward (a plain no-grad call, not through DDP): a rank whose
            # batch has no spoken row skips it (KL 0) without the others waiting on it.
            kl = self.llm.text_teacher_kl(batch, out, teacher=self.text_teacher)
            loss = loss + self.text_teacher_weight * kl
            self.log("train/kl", kl.detach(), batch_size=bs)
        if self._trainer is not None and (self.trainer.world_size > 1 or isinstance(self.trainer.strategy, DDPStrategy)):
            # DDP all-reduces every trainable weight's gradient each step, in buckets; a text-only
            # batch leaves the audio path (a trainable audio embedder, sound-token rows) out of the
            # graph on one rank while another rank's batch uses it, and the ranks wait on each other
            # forever. A zero-weighted touch keeps every trainable weight in every rank's graph
            # (the LLaVA-style "dummy input" fix, cheaper than find_unused_parameters). A DDP strategy on
            # one device checks for unused weights too.
            loss = loss + 0.0 * sum(p.sum() for p in self.llm.parameters() if p.requires_grad)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/ce", out["ce"], batch_size=bs)
        if self.llm.ctc_weight > 0:  # loss = ce + ctc_weight * ctc (0 in a batch without audio)
            self.log("train/ctc", out.get("ctc", torch.zeros(())), batch_size=bs)
        self.log("train/response_tokens", out["n_tokens"].float(), batch_size=bs)
        self._log_real_tokens(batch, bs)
        return loss

    def _log_real_tokens(self, batch: dict, bs: int) -> None:
        """``train/real_token_share``: non-pad tokens over all tokens of the batch (packed or padded)."""
        real = batch.get("real_tokens")
        if real is None and batch.get("attention_mask") is not None:
            real = batch["attention_mask"].sum()
        if real is not None:
            share = real.float() / batch["input_ids"].numel()
            self.log("train/real_token_share", share, batch_size=bs)
            self.log("train/padding_fraction", 1 - share, batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.llm(batch)
        self.val_loss.update(out["ce"].detach(), weight=out["n_tokens"].float())
        self.log("val/loss", self.val_loss, batch_size=batch["input_ids"].shape[0])
        if "ctc" in out:
            self.val_ctc.update(out["ctc"].detach())
            self.log("val/ctc", self.val_ctc, batch_size=batch["input_ids"].shape[0])

    @property
    def summary_metrics(self) -> list[str]:
        """The checkpoint table's columns: the metrics this run's spoken validation logs."""
        if not self.eval_audio_shards:
            return ["val/loss"]
        if self.eval_open:
            return ["val/loss", "val/spoken_wer", "val/spoken_cer", "val/spoken_accuracy"]
        return ["val/loss", "val/spoken_accuracy"]

    def on_fit_start(self) -> None:
        """Check every real recording has the reference ``eval_task`` needs before training, not after an epoch."""
        if not self.eval_audio_shards:
            return
        from datamodules.shards import iter_tar_samples, resolve_shards

        seen: set[str] = set()
        for path in resolve_shards(self.eval_audio_shards).paths():
            for raw in iter_tar_samples(path):  # the json only: no audio is decoded here
                meta = json.loads(raw["json"])
                key = str(meta.get("parent")) if "segment" in meta else raw["__key__"]
                if key not in seen:
                    seen.add(key)
                    whole = {**meta, "text": meta.get("parent_text") or ""} if "segment" in meta else meta
                    eval_reference(self.eval_task, whole, where=f"{path}:{raw['__key__']}")

    def on_validation_epoch_end(self) -> None:
        if not self.eval_audio_shards or self.trainer.sanity_checking:
            return
        scores = self.spoken_scores()
        self.log("val/spoken_accuracy", scores["accuracy"])
        if self.eval_open:  # an open task ("repeat", a json field): error rates of the answers
            self.log("val/spoken_wer", scores["wer"])
            self.log("val/spoken_cer", scores["cer"])
            line = (f"spoken WER {scores['wer']:.3f}, CER {scores['cer']:.3f}, exact {scores['accuracy']:.3f} "
                    f"on {scores['n']} real utterances ({self.eval_task})")  # fmt: skip
        else:
            line = f"spoken accuracy {scores['accuracy']:.3f} on {scores['n']} real utterances"
            # chance: one of the k distinct answers at random is right 1/k of the time (the demo: 0.100)
            line += f" (chance {1 / self._eval_answers:.3f})" if self._eval_answers else ""
        if self.trainer.is_global_zero:
            print(f"\n[stage3] epoch {self.current_epoch}: {line}", flush=True)

    def _eval_samples(self) -> list[tuple[Any, str, str]]:
        """``(wave, reference, language)`` per real recording, pieces of a cut recording joined."""
        samples = []
        for rec in read_recordings(self.eval_audio_shards):
            if not rec["complete"]:  # a transcript cannot be scored against part of its recording
                continue
            meta = rec["meta"]
            reference = eval_reference(self.eval_task, meta, where=f"{self.eval_audio_shards}:{rec['id']}")
            samples.append((rec["wave"], reference, self.eval_language or meta.get("language") or "und"))
        samples = samples[: self.eval_max_samples] if self.eval_max_samples else samples
        self._eval_answers = len({reference for _, reference, _ in samples})
        return samples

    def _max_new_tokens(self, references: list[str]) -> int:
        if self.eval_max_new_tokens is not None:
            return self.eval_max_new_tokens
        if not self.eval_open:
            return 4
        longest = max(len(self.llm.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
        return 2 * longest + 8

    @torch.no_grad()
    def spoken_scores(self) -> dict[str, float]:
        """Greedy answers to real speech from ``eval_audio_shards``, scored for ``eval_task``, summed over ranks.

        Returns:
            ``{"accuracy", "wer", "cer", "n"}``: exact-match share (closed: first word; open: the whole
            normalised answer), word and character error rates over all references (open tasks;
            NaN for closed ones), and the number of utterances scored.
        """
        samples = self._eval_samples()
        # Every rank scores a disjoint slice; the sums are reduced below.
        rank, world = self.global_rank, self.trainer.world_size if self._trainer else 1
        mine = samples[rank::world]
        correct = 0
        wer, cer = WordErrorRate(), CharErrorRate()  # states: edits and reference length, summed below
        norms: dict[str, Any] = {}
        for start in range(0, len(mine), self.eval_batch_size):
            chunk = mine[start : start + self.eval_batch_size]
            # Audio over the 30 s window is cut at silence and heard whole, as speechless-infer does.
            pieces = [[w[a:b] for a, b in split_at_silence(w, 16_000, max_seconds=30.0)] for w, _, _ in chunk]
            batch = self.llm.prompts_from_audio([p for ps in pieces for p in ps], instruction_text=self.eval_instruction_text,
                                                pieces_per_item=[len(ps) for ps in pieces])  # fmt: skip
            batch["rvq_round_trip"] = self.rvq_round_trip
            answers = self.llm.generate(batch, max_new_tokens=self._max_new_tokens([r for _, r, _ in chunk]))
            if not self.eval_open:
                correct += sum(exact_match(a, ref) for a, (_, ref, _) in zip(answers, chunk, strict=True))
                continue
            for answer, (_, ref, language) in zip(answers, chunk, strict=True):
                norm = norms.setdefault(language, normalizer(language))
                hyp, ref_n = norm(answer), norm(ref)
                correct += hyp == ref_n
                wer.update([hyp], [ref_n])
                cer.update([hyp], [ref_n])
        total = torch.tensor([correct, len(mine), float(wer.errors), float(wer.total), float(cer.errors), float(cer.total)],
                             dtype=torch.float64, device=self.device)  # fmt: skip
        if self._trainer is not None and world > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        nan = float("nan")
        return {
            "accuracy": float(total[0] / total[1].clamp(min=1)),
            "wer": float(total[2] / total[3].clamp(min=1)) if self.eval_open else nan,
            "cer": float(total[4] / total[5].clamp(min=1)) if self.eval_open else nan,
            "n": int(total[1]),
        }

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.llm.parameters() if p.requires_grad]
        optimizer = self.optimizer or default_optimizer(lr=self.lr, weight_decay=self.weight_decay)
        lr_scheduler = self.lr_scheduler or partial(
            WarmupCosine, warmup_steps=self.warmup_steps, decay="cosine", min_lr_ratio=0.1, count_this_step=False
        )
        # Lightning's estimate of the fit's steps (not stages.optim.fit_steps): as this stage always counted.
        total = lambda: max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1  # noqa: E731
        return configure(params, optimizer=optimizer, lr_scheduler=lr_scheduler, total_steps=total)

    # ---- checkpoints: the adapter (and projector) only ---------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keys are the weights' own module paths: llm.peft_model.<peft name>, llm.projector.<name>.
        checkpoint["state_dict"] = {
            (f"llm.{k}" if k.startswith("projector.") else f"llm.peft_model.{k}"): v
            for k, v in self.llm.trainable_state_dict().items()
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = {}
        for k, v in checkpoint["state_dict"].items():
            if k.startswith("llm.peft_model."):
                state[k[len("llm.peft_model.") :]] = v
            elif k.startswith("llm.projector."):
                state[k[len("llm.") :]] = v
        # Exact key check here: strict_loading=False below must not hide a wrong adapter.
        self.llm.load_trainable_state_dict(state)

    # ---- promotion ---------------------------------------------------------------------------
    def artifact_modules(self, config: dict[str, Any]) -> dict[str, ArtifactModule]:
        """The PEFT adapter and a merged Hugging Face export, each in its own subfolder of ``llm/``.

        With a projector, also a ``projector`` module that ``load_artifact`` rebuilds (kind-checked,
        ``AudioProjector.load``) from the adapter folder's ``projector.json`` + ``projector.safetensors``.
        """
        spec = config.get("model", {}).get("init_args", {}).get("llm") or {}

        def save(directory: Path) -> None:
            self.llm.save_adapter(directory / "adapter")
            self.llm.export_merged(directory / "merged")

        modules = {
            "llm": ArtifactModule(
                spec.get("class_path", "models.spoken_llm.SpokenLLM"), spec.get("init_args", {}), save=save
            )
        }
        if self.llm.projector is not None:
            modules["projector"] = ArtifactModule("models.projector.AudioProjector.load",
                                                  {"directory": "@artifact/llm/adapter"})  # fmt: skip
        return modules

    def artifact_info(self) -> dict[str, Any]:
        return {
            "base_model": self.llm.model_name,
            "input_mode": self.llm.input_mode,
            "audio_path": self.llm.audio_path,
            **({"projector": self.llm.projector.config()} if self.llm.projector is not None else {}),
            "rvq_round_trip": self.rvq_round_trip,
            "num_levels": self.llm.num_levels,
            "codebook_size": self.llm.codebook_size,
            "adapter": "llm/adapter",
            "merged": "llm/merged",
            "audio_normalization": {"level_db": self.llm.level_db, "center_states": self.llm.center_states},
            # Tokens mode: how codes were written, and the stage-1 artifact whose encoder + RVQ make them.
            **({"sound_tokens": self.llm.sound.describe()} if self.llm.input_mode == "tokens" else {}),
            "stage1": self._parents[0] if self._parents else None,
            "encoder": self._stage1_encoder,
        }

    def parent_artifacts(self) -> list[dict[str, Any]]:
        return list(self._parents)
