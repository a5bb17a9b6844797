"""Stage 3: fine-tune Gemma 4 (LoRA) on synthetic spoken instructions, answer real speech.

Follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417), stage 3: the instructions' semantic
tokens (stage 2) are dequantized by the frozen stage-1 RVQ into the Gemma 4 audio encoder's own
pre-projection space and enter the LLM through its native audio path (``models.spoken_llm.SpokenLLM``);
only LoRA trains, on the response tokens. Validation also feeds *real* speech of held-out speakers
through the audio tower and scores greedy answers against a closed task (the demo: next digit).

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

import io
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from lightning import LightningModule
from torchmetrics import MeanMetric
from torchmetrics.text import WordErrorRate

from datamodules.instructions import CLOSED_TASKS, OPEN_TASKS
from datamodules.shards import iter_tar_samples, resolve_shards
from models.chat_format import IGNORE_INDEX, collate_padded
from models.encoders import FrozenEncoder
from models.rvq import ResidualVQ
from models.spoken_llm import SpokenLLM
from stages.infer import normalizer
from stages.promotion import ArtifactModule, load_artifact
from stages.stage1 import check_encoder_matches

__all__ = ["SpokenInstructionStage", "attach_stage1", "build_demo_llm", "collate_instructions", "exact_match"]


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
                           expect={"quantizer": ResidualVQ, "encoder": FrozenEncoder})  # fmt: skip
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


def build_demo_llm(path: str | Path, *, encoder_dir: str | Path, seed: int = 0, texts: list[str] | None = None) -> Path:
    """A tiny random Gemma 4 whose audio tower *is* the stage-1 demo encoder (config and weights).

    The stage-1 RVQ was trained on that encoder's pre-projection states, so real speech through this
    model's audio tower lands where the RVQ's codes decode to.

    Args:
        path: Output folder.
        encoder_dir: The stage-1 encoder folder (a saved ``Gemma4AudioModel``).
        seed: Seed of the random text weights.
        texts: Tokenizer training text.

    Returns:
        The folder (model, tokenizer, feature extractor).
    """
    from transformers import Gemma4AudioModel, Gemma4ForConditionalGeneration

    from models.gemma4_tiny import build_tiny_gemma4

    path = build_tiny_gemma4(path, seed=seed, texts=texts)
    encoder = Gemma4AudioModel.from_pretrained(str(encoder_dir))
    model = Gemma4ForConditionalGeneration.from_pretrained(str(path))
    config = model.config
    config.audio_config = encoder.config
    torch.manual_seed(seed)
    rebuilt = Gemma4ForConditionalGeneration(config).eval()
    missing, unexpected = rebuilt.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".audio_tower." not in k and "embed_audio" not in k},
        strict=False,
    )
    if unexpected or [k for k in missing if ".audio_tower." not in k and "embed_audio" not in k]:
        raise RuntimeError(f"text weights did not carry over: missing {missing[:5]}, unexpected {unexpected[:5]}")
    rebuilt.model.audio_tower.load_state_dict(encoder.state_dict())
    rebuilt.generation_config = model.generation_config
    rebuilt.save_pretrained(path)
    return path


def collate_instructions(examples: list[dict[str, Any]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """``build_example`` outputs (+ ``codes`` [Q, T_i] for spoken ones) -> a right-padded batch.

    Returns:
        ``input_ids``/``labels``/``attention_mask``/``audio_positions`` [B, L]; with spoken rows also
        ``codes`` [N, Q, T] (padded with -1) and ``code_lengths`` [N], N = spoken rows in batch order;
        with CTC targets ``ctc_targets`` [N, S] (padded with ``IGNORE_INDEX``).
    """
    batch = collate_padded(examples, pad_id=pad_id)
    targets = [e["ctc_targets"] for e in examples if "ctc_targets" in e]
    if targets:
        batch["ctc_targets"] = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX)
    spoken = [e["codes"] for e in examples if "codes" in e]
    if spoken:
        q, t = spoken[0].shape[0], max(c.shape[-1] for c in spoken)
        codes = torch.full((len(spoken), q, t), -1, dtype=torch.long)
        for i, c in enumerate(spoken):
            codes[i, :, : c.shape[-1]] = c
        batch["codes"] = codes
        batch["code_lengths"] = torch.tensor([c.shape[-1] for c in spoken])
    return batch


def exact_match(answer: str, reference: str) -> bool:
    """First word of the answer, lower-cased and stripped of punctuation, equals the reference."""
    words = answer.strip().lower().split()
    return bool(words) and words[0].strip(".,!?;:'\"") == reference.strip().lower()


class SpokenInstructionStage(LightningModule):
    """Gemma 4 + LoRA answering spoken instructions (Speechless stage 3).

    Args:
        llm: The wrapped LLM (``models.spoken_llm.SpokenLLM``), built from the config.
        stage1_artifact: Promoted stage-1 folder; its RVQ is attached frozen (levels/codebook must match),
            and in tokens mode with ``eval_audio_shards`` also its encoder (see ``attach_stage1``).
        lr: AdamW peak learning rate of the LoRA weights.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps, then cosine decay to 10 % over the run.
        eval_audio_shards: Audio shards of real speech (held-out speakers) scored at each validation end.
        eval_closed_task: How the reference answer follows from a shard's ``json.text``: ``next_digit``
            (a closed set, exact match) or ``repeat`` (the transcript; also logs ``val/spoken_wer``).
        eval_language: Text normaliser of that WER (Whisper's English one for ``en``, its basic one otherwise).
        eval_instruction_text: Text placed before the audio in the eval prompt (as in training).
        eval_max_samples: Cap on scored utterances (``None``: all).
        eval_batch_size: Utterances per ``generate`` call.
        rvq_round_trip: Embeddings mode (native or projector): pass real speech's encoder states through
            RVQ encode/decode before the LLM, as in training (tokens mode always goes through the RVQ:
            its tokens are codes). Recorded in the artifact; ``speechless-infer`` follows it.
    """

    summary_metrics = ["val/loss", "val/spoken_accuracy"]

    def __init__(
        self,
        *,
        llm: SpokenLLM,
        stage1_artifact: str | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        eval_audio_shards: str | None = None,
        eval_closed_task: str = "next_digit",
        eval_language: str = "en",
        eval_instruction_text: str | None = None,
        eval_max_samples: int | None = None,
        eval_batch_size: int = 16,
        rvq_round_trip: bool = True,
    ) -> None:
        super().__init__()
        self.llm = llm
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.eval_audio_shards, self.eval_instruction_text = eval_audio_shards, eval_instruction_text
        if eval_closed_task not in CLOSED_TASKS:
            raise ValueError(f"eval_closed_task must be one of {sorted(CLOSED_TASKS)}, got {eval_closed_task!r}")
        self.eval_task = CLOSED_TASKS[eval_closed_task]
        self.eval_closed_task, self.eval_open = eval_closed_task, eval_closed_task in OPEN_TASKS
        self.eval_language = eval_language
        self._spoken_wer = float("nan")
        self.eval_max_samples, self.eval_batch_size = eval_max_samples, eval_batch_size
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
        self._parents = [{"path": str(loaded["path"]), "sha256": loaded["config"].get("sha256", "")}]
        self._stage1_encoder = (loaded["config"].get("info") or {}).get("encoder")

    # ---- data binding ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "bind"):
            datamodule.bind(
                build_example=self.llm.example,  # codes -> audio slots (embeddings) or sound tokens (tokens)
                collate=partial(collate_instructions, pad_id=self.llm.pad_id),
                ctc_targets=self.llm.ctc_targets if self.llm.ctc_weight > 0 else None,
            )

    # ---- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.llm(batch)
        loss = out["loss"]
        if self._trainer is not None and self.trainer.world_size > 1:
            # DDP all-reduces every trainable weight's gradient each step, in buckets; a text-only
            # batch leaves the audio path (a trainable audio embedder, sound-token rows) out of the
            # graph on one rank while another rank's batch uses it, and the ranks wait on each other
            # forever. A zero-weighted touch keeps every trainable weight in every rank's graph
            # (the LLaVA-style "dummy input" fix, cheaper than find_unused_parameters).
            loss = loss + 0.0 * sum(p.sum() for p in self.llm.parameters() if p.requires_grad)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log("train/ce", out["ce"], batch_size=bs)
        if "ctc" in out:  # loss = ce + ctc_weight * ctc
            self.log("train/ctc", out["ctc"], batch_size=bs)
        self.log("train/response_tokens", out["n_tokens"].float(), batch_size=bs)
        if batch.get("attention_mask") is not None:  # share of pad tokens: length bucketing keeps it small
            self.log("train/padding_fraction", 1 - batch["attention_mask"].float().mean(), batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.llm(batch)
        self.val_loss.update(out["ce"].detach(), weight=out["n_tokens"].float())
        self.log("val/loss", self.val_loss, batch_size=batch["input_ids"].shape[0])
        if "ctc" in out:
            self.val_ctc.update(out["ctc"].detach())
            self.log("val/ctc", self.val_ctc, batch_size=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self) -> None:
        if not self.eval_audio_shards or self.trainer.sanity_checking:
            return
        accuracy, n = self.spoken_accuracy()
        self.log("val/spoken_accuracy", accuracy)
        line = f"spoken accuracy {accuracy:.3f} on {n} real utterances"
        if self.eval_open:  # an open task ("repeat"): word error rate of the answers
            self.log("val/spoken_wer", self._spoken_wer)
            line += f", WER {self._spoken_wer:.3f}"
        elif self.eval_closed_task == "next_digit":
            line += f" (chance {1 / 10:.3f})"
        if self.trainer.is_global_zero:
            print(f"\n[stage3] epoch {self.current_epoch}: {line}", flush=True)

    def _eval_samples(self) -> list[tuple[Any, str]]:
        samples = []
        for path in resolve_shards(self.eval_audio_shards).paths():
            for raw in iter_tar_samples(path):
                wave, rate = sf.read(io.BytesIO(raw["flac"]), dtype="float32")
                if rate != 16_000:
                    raise ValueError(f"{path}:{raw['__key__']} is {rate} Hz; audio shards are 16 kHz")
                samples.append((wave, self.eval_task(json.loads(raw["json"])["text"])))
        return samples[: self.eval_max_samples] if self.eval_max_samples else samples

    @torch.no_grad()
    def spoken_accuracy(self) -> tuple[float, int]:
        """Greedy answers to real speech from ``eval_audio_shards`` vs the closed task: (accuracy, n)."""
        samples = self._eval_samples()
        # Every rank scores a disjoint slice; the sum is reduced below.
        rank, world = self.global_rank, self.trainer.world_size if self._trainer else 1
        mine = samples[rank::world]
        correct = 0
        wer = WordErrorRate()  # its state: word edits and reference words, summed over ranks below
        norm = normalizer(self.eval_language)
        for start in range(0, len(mine), self.eval_batch_size):
            chunk = mine[start : start + self.eval_batch_size]
            batch = self.llm.prompts_from_audio([w for w, _ in chunk], instruction_text=self.eval_instruction_text)
            batch["rvq_round_trip"] = self.rvq_round_trip
            answers = self.llm.generate(batch, max_new_tokens=48 if self.eval_open else 4)
            correct += sum(exact_match(a, ref) for a, (_, ref) in zip(answers, chunk, strict=True))
            if self.eval_open:
                wer.update([norm(a) for a in answers], [norm(ref) for _, ref in chunk])
        total = torch.tensor([correct, len(mine), float(wer.errors), float(wer.total)], dtype=torch.float64, device=self.device)
        if self._trainer is not None and world > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        self._spoken_wer = float(total[2] / total[3].clamp(min=1))
        return float(total[0] / total[1].clamp(min=1)), int(total[1])

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.llm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.stage3 build-demo-model``: the demo's tiny stage-3 Gemma 4 (see ``build_demo_llm``)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["build-demo-model"])
    parser.add_argument("--out", default="data/demo/models/gemma4_stage3")
    parser.add_argument("--encoder-dir", default="data/demo/models/gemma4_audio")
    parser.add_argument("--text-jsonl", default="data/demo/raw/text_instructions.jsonl")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.text_jsonl).read_text().splitlines() if line.strip()]
    texts = [f"{r['instruction']} {r['response']}" for r in rows]
    print(build_demo_llm(args.out, encoder_dir=args.encoder_dir, texts=texts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
