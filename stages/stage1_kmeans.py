"""Stage 1, SpireLM's way: k-means units over a frozen speech encoder's states.

SpireLM (Ambilduke et al., 2025): HuBERT Large layer-22 features clustered into 5000 k-means units,
consecutive duplicates collapsed, units written as Unicode private-use characters
(:mod:`models.units`) so a text LLM's own tokenizer carries them. The clustering is
:class:`models.kmeans.KMeansUnits` (k-means++ then mini-batch k-means, DDP-correct); this module
fits it with ``lightning fit`` and tokenizes with ``lightning predict``, like
:class:`stages.stage1.RVQStage`, whose inputs, promotion and artifacts it shares.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric, Metric

from models.encoders import FrozenEncoder
from models.kmeans import KMeansUnits
from models.units import check_unit_count, units_to_pua
from stages.artifacts import load_artifact, parent_record
from stages.metrics import CodebookUsage
from stages.stage1 import RVQStage, check_encoder_matches

__all__ = ["KMeansStage", "StateVariance"]


class StateVariance(Metric):
    """Total variance of the states over an epoch: ``E ||x - E x||^2`` per frame (DDP-summed moments)."""

    full_state_update = False

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.add_state("n", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, frames: torch.Tensor) -> None:
        """Add ``frames [N, D]`` (valid frames only)."""
        frames = frames.double()
        self.n += frames.shape[0]
        self.total += frames.sum(0)
        self.sq += frames.square().sum()

    def compute(self) -> torch.Tensor:
        n = self.n.clamp_min(1)
        return self.sq / n - (self.total / n).square().sum()


class KMeansStage(LightningModule):
    """Fits k-means units on frozen encoder states; tokenizes speech into units in ``predict``.

    Nothing is learnt by gradient: each training step assigns the batch's frames and moves the
    centroids (:class:`models.kmeans.KMeansUnits`). Inputs are audio batches (the frozen encoder runs
    on the fly) or cached encoder states (``states``/``state_lengths``, written by ``predict`` with
    ``predict_output: states``), as in :class:`stages.stage1.RVQStage`; samples with
    ``sample_weight == 0`` (the padding batches that keep ranks in step) never move a centroid.

    Metrics (``val/`` and ``test/``, over the epoch, DDP-reduced): ``quant_error``, the mean squared
    distance of a frame to its centroid (k-means' inertia per frame); ``quant_error_ratio``, that over
    the states' total variance (the inertia of one centroid: 1 means nothing explained);
    ``mse`` (``quant_error / D``, the RVQ's reconstruction MSE) and ``cosine`` of frame and centroid,
    for comparison with the RVQ; ``utilisation`` and ``perplexity`` of the units.

    Args:
        quantizer: the k-means units; may be omitted when ``artifact`` is given.
        encoder: the frozen encoder; may be None when training only from cached states.
        artifact: a promoted stage-1 k-means artifact to start from (e.g. to tokenize with it); a
            quantizer or encoder given too must match it (codebook size, dim, encoder).
        predict_output: ``tokens`` (units ``[1, T]``, plus ``units_pua``: the deduplicated units as
            private-use characters, in each sample's json) or ``states`` (the encoder-state cache).
    """

    summary_metrics = ["val/quant_error", "val/quant_error_ratio", "val/cosine", "val/utilisation", "val/perplexity"]

    def __init__(
        self,
        *,
        quantizer: KMeansUnits | None = None,
        encoder: FrozenEncoder | None = None,
        artifact: str | None = None,
        predict_output: Literal["tokens", "states"] = "tokens",
    ) -> None:
        super().__init__()
        self._artifact_config: dict[str, Any] | None = None
        if artifact is not None:
            quantizer = self._from_artifact(artifact, quantizer, encoder)
        if quantizer is None:
            raise ValueError("stage 1 k-means needs a quantizer or an artifact")
        check_unit_count(quantizer.codebook_size)
        if encoder is not None and encoder.dim != quantizer.dim:
            raise ValueError(
                f"encoder {encoder.describe()} gives {encoder.dim}-dim states but the k-means expects "
                f"dim={quantizer.dim}: set quantizer.init_args.dim to {encoder.dim}"
            )
        self.quantizer, self.encoder, self.predict_output = quantizer, encoder, predict_output
        # No weight learns by gradient, but DDP refuses a module without a parameter: this scalar
        # (multiplied by 0 in the loss, stepped by an SGD with lr 0) keeps DDP and Lightning's loop going.
        self.ddp_anchor = torch.nn.Parameter(torch.zeros(()))
        for split in ("val", "test"):
            setattr(self, f"{split}_qerr", MeanMetric())
            setattr(self, f"{split}_cos", MeanMetric())
            setattr(self, f"{split}_var", StateVariance(dim=quantizer.dim))
            setattr(self, f"{split}_usage", CodebookUsage(num_quantizers=1, codebook_size=quantizer.codebook_size))

    def _from_artifact(self, path: str, quantizer: KMeansUnits | None, encoder: FrozenEncoder | None) -> KMeansUnits:
        loaded = load_artifact(path, names=["quantizer"], expect={"quantizer": KMeansUnits})
        self._artifact_config, self._parent = loaded["config"], parent_record(loaded)
        built: KMeansUnits = loaded["modules"]["quantizer"]
        if quantizer is not None:
            for attr in ("codebook_size", "dim"):
                if getattr(quantizer, attr) != getattr(built, attr):
                    raise ValueError(
                        f"artifact {path} has {attr}={getattr(built, attr)} but the config asks for "
                        f"{getattr(quantizer, attr)}: drop model.init_args.quantizer or make them agree"
                    )
            quantizer.load_state_dict(built.state_dict())
            built = quantizer
        info = loaded["config"].get("info", {})
        if encoder is not None and info.get("encoder"):
            check_encoder_matches(info["encoder"], encoder.describe(), where=path)
        return built

    # ---- promotion: what the artifact holds and says (RVQStage's own, for the same attributes) --
    def artifact_info(self) -> dict[str, Any]:
        """Facts later stages check at start-up (one level of ``K`` units)."""
        return {
            "tokenizer": "kmeans_units",
            "num_quantizers": 1,
            "codebook_size": self.quantizer.codebook_size,
            "dim": self.quantizer.dim,
            "encoder": self.encoder.describe() if self.encoder is not None else None,
        }

    # The quantizer by class path and weights, the encoder by reference; the artifact started from.
    artifact_modules = RVQStage.artifact_modules
    parent_artifacts = RVQStage.parent_artifacts

    # ---- inputs: audio through the frozen encoder, or cached states (RVQStage's own reader) ----
    states = RVQStage.states  # -> ``(x [B, T, D], mask [B, T])``, padding samples masked out

    # ---- fitting ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, mask = self.states(batch)
        out = self.quantizer(x, mask)
        n = mask.sum().clamp_min(1)
        quant_error = out.sq_dist.sum() / n
        used = (out.usage > 0).float().mean()
        self.log_dict({"train/quant_error": quant_error, "train/batch_utilisation": used,
                       "train/initialized": self.quantizer.initialized.float()}, prog_bar=True, batch_size=x.shape[0])
        return 0.0 * self.ddp_anchor

    # ---- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: dict, prefix: str) -> None:
        x, mask = self.states(batch)
        out = self.quantizer(x, mask)  # eval mode: assigns, never moves a centroid
        centroids = self.quantizer.decode(out.codes)
        getattr(self, f"{prefix}_qerr").update(out.sq_dist[mask])
        getattr(self, f"{prefix}_cos").update(F.cosine_similarity(centroids, x, dim=-1)[mask])
        getattr(self, f"{prefix}_var").update(x[mask])
        getattr(self, f"{prefix}_usage").update(out.codes, mask)

    def _eval_epoch_end(self, prefix: str) -> None:
        quant_error = getattr(self, f"{prefix}_qerr").compute()
        variance = getattr(self, f"{prefix}_var").compute()
        stats = getattr(self, f"{prefix}_usage").compute()
        self.log(f"{prefix}/quant_error", quant_error)
        self.log(f"{prefix}/quant_error_ratio", (quant_error / variance.clamp_min(1e-12)).float())
        self.log(f"{prefix}/mse", quant_error / self.quantizer.dim)
        self.log(f"{prefix}/cosine", getattr(self, f"{prefix}_cos").compute())
        self.log(f"{prefix}/utilisation", stats["utilisation_overall"])
        self.log(f"{prefix}/perplexity", stats["perplexity_mean"])
        for name in ("qerr", "cos", "var", "usage"):
            getattr(self, f"{prefix}_{name}").reset()

    # Lightning's hooks call the two above with "val" / "test", as RVQStage's do.
    validation_step, on_validation_epoch_end = RVQStage.validation_step, RVQStage.on_validation_epoch_end
    test_step, on_test_epoch_end = RVQStage.test_step, RVQStage.on_test_epoch_end

    # ---- tokenization -------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Units per utterance at the encoder's frame rate, for :class:`stages.writers.ShardPredictionWriter`.

        Returns:
            ``{"keys", "meta", "weights"}`` and ``codes`` (LongTensor ``[1, T_i]`` each; every meta
            gets ``units_pua``, the deduplicated units as private-use characters) or ``states``.
        """
        x, mask = self.states(batch)
        lengths = [int(n) for n in mask.sum(1)]
        weight = batch.get("sample_weight")
        metas = batch.get("meta") or [{} for _ in batch["keys"]]
        out = {"keys": batch["keys"], "weights": weight.tolist() if weight is not None else [1.0] * x.shape[0]}
        if self.predict_output == "states":
            out["states"] = [x[i, :n].cpu() for i, n in enumerate(lengths)]
            out["meta"] = metas
            return out
        codes = self.quantizer.encode(x, mask)  # [B, 1, T]
        out["codes"] = [codes[i, :, :n].cpu() for i, n in enumerate(lengths)]
        out["meta"] = [{**meta, "units_pua": units_to_pua(c[0])} for meta, c in zip(metas, out["codes"], strict=True)]
        return out

    # ---- checkpoints: the generator and an unfinished init buffer ride along ------------------
    # The buffer holds every rank's frames (gathered each step), so rank 0's copy, restored on
    # every rank, resumes a run killed before k-means++ ran exactly.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["kmeans_generator"] = self.quantizer.generator_state()
        frames = self.quantizer.init_buffer()
        if frames:
            checkpoint["kmeans_init_buffer"] = frames

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "kmeans_generator" in checkpoint:
            self.quantizer.set_generator_state(checkpoint["kmeans_generator"])
        self.quantizer.set_init_buffer(checkpoint.get("kmeans_init_buffer") or [])

    def configure_optimizers(self):
        # Lightning's loop needs an optimiser; nothing is learnt by gradient (lr 0 on the anchor).
        return torch.optim.SGD([self.ddp_anchor], lr=0.0)
