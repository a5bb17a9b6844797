"""Stage 1: a residual VQ over a frozen speech encoder's states (the Speechless recipe, stage 1).

Dao et al., "Speechless" (INTERSPEECH 2025, arXiv:2505.17417) and the Twi stage-1 release: the
Gemma 4 audio encoder's 1024-dim pre-projection states at 25 frames/s are quantized by an RVQ of
8 levels x 2048 codes, trained with ``0.5 * MSE + 0.5 * (1 - cosine) + beta * commitment``. The codes
are the *semantic tokens* that stages 2 and 3 read.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from models.encoders import FrozenEncoder
from models.rvq import ResidualVQ
from stages.artifacts import ArtifactModule, load_artifact, parent_record
from stages.metrics import CodebookUsage
from stages.optim import configure, default_optimizer, fit_steps

__all__ = ["RVQStage"]


class RVQStage(LightningModule):
    """Trains a residual VQ on frozen encoder states; tokenizes speech in ``predict``.

    Loss: ``w_mse * MSE + w_cos * (1 - cosine) + beta * commitment (+ codebook loss when codebooks
    are learnt by gradient)``, where beta is the quantizer's ``commitment_weight`` (0.25, see
    :class:`models.rvq.ResidualVQ` for why).

    Inputs are either audio batches (``audio``, ``audio_lengths``: the frozen encoder runs on the
    fly) or cached encoder states (``states``, ``state_lengths``: the fast path for many epochs).
    Samples with ``sample_weight == 0`` (the datamodule's padding batches that keep DDP ranks in
    step) never update codebooks nor count in losses or metrics.

    Args:
        quantizer: the residual VQ (``models.rvq.ResidualVQ``); may be omitted when ``artifact``
            is given.
        encoder: the frozen encoder; may be None when training only from cached states. Its
            weights are never saved in checkpoints (they reload from their source).
        artifact: a promoted stage-1 artifact (``artifacts/stage1/current``) to start from, e.g. to
            tokenize with it: its quantizer is rebuilt from safetensors + JSON, and a quantizer or
            encoder given here must match it (levels, codebook size, dim, encoder), else start-up fails.
        predict_output: what ``predict`` produces: codes (tokenization) or encoder states (the
            cache that training from states reads).
        w_mse: weight of the reconstruction MSE (mean over frames and dims).
        w_cos: weight of ``1 - cosine`` between reconstruction and input, per frame.
        lr: AdamW learning rate for gradient-learnt parts (codebooks when ``learnable="grad"``).
        weight_decay: AdamW weight decay.
        optimizer: trainable parameters -> optimiser (``class_path``/``init_args`` in the YAML); unset:
            AdamW with ``lr`` and ``weight_decay`` (:mod:`stages.optim`), which it replaces.
        lr_scheduler: optimiser -> scheduler, stepped every optimiser step; unset: a constant rate.
    """

    def __init__(
        self,
        *,
        quantizer: ResidualVQ | None = None,
        encoder: FrozenEncoder | None = None,
        artifact: str | None = None,
        predict_output: Literal["tokens", "states"] = "tokens",
        w_mse: float = 0.5,
        w_cos: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self._artifact_config: dict[str, Any] | None = None
        if artifact is not None:
            quantizer = self._from_artifact(artifact, quantizer, encoder)
        if quantizer is None:
            raise ValueError("stage 1 needs a quantizer or an artifact")
        self.quantizer = quantizer
        self.encoder = encoder
        self.predict_output = predict_output
        self.w_mse, self.w_cos = w_mse, w_cos
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        if encoder is not None and encoder.dim != quantizer.dim:
            raise ValueError(
                f"encoder {encoder.describe()} gives {encoder.dim}-dim states but the quantizer expects "
                f"dim={quantizer.dim}: set quantizer.init_args.dim to {encoder.dim}"
            )
        # An EMA-learnt RVQ has no gradient-trained parameter, but DDP refuses a module without
        # one: this scalar (always multiplied by 0 in the loss) keeps DDP and the optimizer happy.
        self.ddp_anchor = torch.nn.Parameter(torch.zeros(()))
        q, k = quantizer.num_quantizers, quantizer.codebook_size
        self.val_mse, self.val_cos = MeanMetric(), MeanMetric()
        self.val_usage = CodebookUsage(num_quantizers=q, codebook_size=k)
        self.test_mse, self.test_cos = MeanMetric(), MeanMetric()
        self.test_usage = CodebookUsage(num_quantizers=q, codebook_size=k)

    summary_metrics = ["val/mse", "val/cosine", "val/utilisation", "val/perplexity"]

    def _from_artifact(self, path: str, quantizer: ResidualVQ | None, encoder: FrozenEncoder | None) -> ResidualVQ:
        loaded = load_artifact(path, names=["quantizer"], expect={"quantizer": ResidualVQ})
        self._artifact_config = loaded["config"]
        self._parent = parent_record(loaded)
        built: ResidualVQ = loaded["modules"]["quantizer"]
        info = loaded["config"].get("info", {})
        if quantizer is not None:
            for attr in ("num_quantizers", "codebook_size", "dim"):
                if getattr(quantizer, attr) != getattr(built, attr):
                    raise ValueError(
                        f"artifact {path} has {attr}={getattr(built, attr)} but the config asks for "
                        f"{getattr(quantizer, attr)}: drop model.init_args.quantizer or make them agree"
                    )
            quantizer.load_state_dict(built.state_dict())
            built = quantizer
        if encoder is not None and info.get("encoder"):
            check_encoder_matches(info["encoder"], encoder.describe(), where=path)
        return built

    def artifact_modules(self, config: dict[str, Any]) -> dict[str, ArtifactModule]:
        """What promotion saves: the RVQ with weights, the encoder by reference (no weights)."""
        model_args = config.get("model", {}).get("init_args", {})
        q_spec = model_args.get("quantizer") or (self._artifact_config or {}).get("modules", {}).get("quantizer")
        if not q_spec:
            raise ValueError("cannot tell how to rebuild the quantizer: no class_path in the config")
        modules = {"quantizer": ArtifactModule(q_spec["class_path"], q_spec.get("init_args", {}), self.quantizer.state_dict())}
        e_spec = model_args.get("encoder")
        if e_spec:
            modules["encoder"] = ArtifactModule(e_spec["class_path"], e_spec.get("init_args", {}))
        return modules

    def artifact_info(self) -> dict[str, Any]:
        """Facts later stages check at start-up against their own configuration."""
        return {
            "num_quantizers": self.quantizer.num_quantizers,
            "codebook_size": self.quantizer.codebook_size,
            "dim": self.quantizer.dim,
            "encoder": self.encoder.describe() if self.encoder is not None else None,
        }

    def parent_artifacts(self) -> list[dict[str, Any]]:
        return [] if self._artifact_config is None else [self._parent]

    # ---- inputs -------------------------------------------------------------------------------
    def states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``[B, T, D]`` and a frame mask ``[B, T]`` (False on padding)."""
        if "states" in batch:
            x = batch["states"].float()
            lengths = batch["state_lengths"]
            mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        else:
            if self.encoder is None:
                raise ValueError("audio batches need an encoder; set model.init_args.encoder")
            out = self.encoder(batch["audio"], batch["audio_lengths"])
            x, mask = out.states.float(), out.mask
        weight = batch.get("sample_weight")
        if weight is not None:
            mask = mask & (weight > 0)[:, None].to(mask.device)
        return x, mask

    # ---- losses -------------------------------------------------------------------------------
    def losses(self, x: torch.Tensor, out, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms, each a masked mean over real frames."""
        recon = out.quantized
        n = mask.sum().clamp_min(1)
        mse = (((recon - x) ** 2).mean(-1) * mask).sum() / n
        cos = (F.cosine_similarity(recon, x, dim=-1) * mask).sum() / n
        total = self.w_mse * mse + self.w_cos * (1 - cos) + out.loss + 0.0 * self.ddp_anchor
        return {
            "loss": total,
            "mse": mse.detach(),
            "cosine": cos.detach(),
            "commit": out.commit_loss.detach(),
            "codebook": out.codebook_loss.detach(),
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, mask = self.states(batch)
        out = self.quantizer(x, mask)
        losses = self.losses(x, out, mask)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=x.shape[0])
        return losses["loss"]

    # ---- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: dict, prefix: str) -> None:
        x, mask = self.states(batch)
        out = self.quantizer(x, mask)
        losses = self.losses(x, out, mask)
        self.log(f"{prefix}/loss", losses["loss"], batch_size=x.shape[0], sync_dist=True)
        frame_mse = ((out.quantized - x) ** 2).mean(-1)[mask]
        frame_cos = F.cosine_similarity(out.quantized, x, dim=-1)[mask]
        getattr(self, f"{prefix}_mse").update(frame_mse)
        getattr(self, f"{prefix}_cos").update(frame_cos)
        getattr(self, f"{prefix}_usage").update(out.codes, mask)

    def _eval_epoch_end(self, prefix: str) -> None:
        usage = getattr(self, f"{prefix}_usage")
        stats = usage.compute()
        self.log(f"{prefix}/mse", getattr(self, f"{prefix}_mse").compute())
        self.log(f"{prefix}/cosine", getattr(self, f"{prefix}_cos").compute())
        self.log(f"{prefix}/utilisation", stats["utilisation_overall"])
        self.log(f"{prefix}/perplexity", stats["perplexity_mean"])
        for level, (u, p) in enumerate(zip(stats["utilisation"], stats["perplexity"])):
            self.log(f"{prefix}/utilisation_l{level}", u)
            self.log(f"{prefix}/perplexity_l{level}", p)
        self._plot_usage(prefix, usage.counts)
        for name in ("mse", "cos", "usage"):
            getattr(self, f"{prefix}_{name}").reset()

    def _plot_usage(self, prefix: str, counts: torch.Tensor) -> None:
        """TensorBoard image: per-level code usage, codes sorted by frequency (a flat band = healthy)."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or self.global_rank != 0:
            return
        sorted_counts = counts.float().sort(dim=1, descending=True).values
        image = torch.log1p(sorted_counts)
        image = image / image.max().clamp_min(1e-6)
        experiment.add_image(f"{prefix}/code_usage", image[None].cpu(), self.global_step)
        for level in range(counts.shape[0]):
            experiment.add_histogram(f"{prefix}/code_counts_l{level}", counts[level].cpu(), self.global_step)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ---- tokenization -------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Codes per utterance, trimmed to its length, for the token writer.

        Returns:
            ``{"keys": [B], "meta": [B], "codes": list of LongTensor [Q, T_i], "weights": [B]}``.
        """
        x, mask = self.states(batch)
        lengths = mask.sum(1)
        weight = batch.get("sample_weight")
        out = {
            "keys": batch["keys"],
            "meta": batch.get("meta", [{} for _ in batch["keys"]]),
            "weights": weight.tolist() if weight is not None else [1.0] * x.shape[0],
        }
        if self.predict_output == "states":
            out["states"] = [x[i, : int(lengths[i])].cpu() for i in range(x.shape[0])]
        else:
            codes = self.quantizer.encode(x, mask)  # [B, Q, T]
            out["codes"] = [codes[i, :, : int(lengths[i])].cpu() for i in range(codes.shape[0])]
        return out

    # ---- optimisation -------------------------------------------------------------------------
    # ---- checkpoints: the RVQ's generator rides along so a resumed run matches an uninterrupted one
    # The frames collected for k-means ride along too while it has not run. Only rank 0's are
    # saved (the checkpoint is rank 0's): a multi-rank run killed before k-means ran (its first
    # ``kmeans_buffer_frames`` frames, a few steps) collects the other ranks' frames again.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rvq_generator"] = self.quantizer.generator_state()
        frames = self.quantizer.kmeans_frames()
        if frames:
            checkpoint["rvq_kmeans_frames"] = frames

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rvq_generator" in checkpoint:  # checkpoints written before it was saved have none
            self.quantizer.set_generator_state(checkpoint["rvq_generator"])
        if checkpoint.get("rvq_kmeans_frames") and self.global_rank == 0:
            self.quantizer.set_kmeans_frames(checkpoint["rvq_kmeans_frames"])

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer or default_optimizer(lr=self.lr, weight_decay=self.weight_decay)
        return configure(params, optimizer=optimizer, lr_scheduler=self.lr_scheduler, total_steps=lambda: fit_steps(self.trainer))


def check_encoder_matches(expected: dict[str, Any], actual: dict[str, Any], *, where: str) -> None:
    """Raise a clear error when an encoder differs from the one an artifact was trained on."""
    # "window": Whisper's full vs clip-length input (absent = full), which moves the states; so does
    # "clip_silence_s" (absent = 0).
    keys = ("kind", "source", "dim", "frame_rate", "layer", "pooling", "window", "clip_silence_s")
    diffs = [f"{k}: artifact {expected.get(k)!r} vs config {actual.get(k)!r}" for k in keys if expected.get(k) != actual.get(k)]
    if diffs:
        raise ValueError(f"encoder mismatch with {where}:\n  " + "\n  ".join(diffs))
