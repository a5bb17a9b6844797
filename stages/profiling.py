"""A step profiler for any stage: step times, peak memory, parameters and work per step, as JSON.

``--trainer.callbacks+=stages.profiling.StepTimer --trainer.callbacks.output runs/step_times.json``
adds it to any ``fit`` (or ``predict``) run. Per training step it records the wall time from batch
start to batch end (CUDA synchronised, so the time covers the step's kernels; with gradient
accumulation a "step" is one micro-batch) and what the batch held, read from the batch keys the
stages use:

- ``audio_lengths`` (stage 1 on audio): audio seconds, and encoder frames via ``encoder.num_frames``;
- ``code_lengths`` + ``meta`` (stage 2 token batches): frames, and tokens = prompt tokens + frames +
  the LM's extra answer steps (end of speech, delay pattern), i.e. the positions the LM runs on;
- ``attention_mask`` / ``input_ids`` (stage 3): tokens = non-padding positions (``tokens_padded``
  counts padding too).

The JSON (rank 0, written at the end of ``fit`` and of ``predict``) has the steps, parameters (total,
trainable; a frozen encoder's hidden network counts in the total), peak memory (CUDA:
``torch.cuda.max_memory_allocated`` since the start; CPU: the process's peak RSS, which includes
memory-mapped weights once touched) and the torch thread count.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["StepTimer", "batch_work", "count_parameters"]


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    """``{"total", "trainable", "float_buffers"}`` counts; frozen encoders' hidden networks count in the total.

    ``float_buffers`` are floating-point buffers (an EMA-learnt RVQ keeps its codebooks there).
    """
    seen: set[int] = set()
    total = trainable = 0
    params = list(module.parameters())
    for sub in module.modules():
        hidden = sub.__dict__.get("_model")  # models.encoders.base.FrozenEncoder keeps its network here
        if isinstance(hidden, torch.nn.Module):
            params += list(hidden.parameters())
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return {"total": total, "trainable": trainable, "float_buffers": buffers}


def batch_work(batch: Any, pl_module: LightningModule) -> dict[str, float]:
    """What one batch holds: ``audio_seconds``, ``frames``, ``tokens``, ``tokens_padded``, ``samples``."""
    if not isinstance(batch, dict):
        return {}
    out: dict[str, float] = {}
    weight = batch.get("sample_weight")
    live = (weight > 0) if torch.is_tensor(weight) else None
    if torch.is_tensor(batch.get("audio_lengths")):
        lengths = batch["audio_lengths"].cpu()
        lengths = lengths[live.cpu()] if live is not None else lengths
        out["samples"] = float(lengths.numel())
        out["audio_seconds"] = float(lengths.sum()) / 16000
        encoder = getattr(pl_module, "encoder", None)
        if encoder is not None and hasattr(encoder, "num_frames"):
            out["frames"] = float(encoder.num_frames(lengths).sum())
    elif torch.is_tensor(batch.get("code_lengths")) and "meta" in batch and "input_ids" not in batch:
        lengths = batch["code_lengths"].cpu()
        keep = [i for i in range(len(lengths)) if live is None or bool(live[i])]
        out["samples"] = float(len(keep))
        out["frames"] = float(sum(int(lengths[i]) for i in keep))
        lm = getattr(pl_module, "lm", None)
        if lm is not None and hasattr(lm, "prompt_ids"):
            extra = 1 + ((lm.num_levels - 1) if getattr(lm, "delay", False) and lm.output_form == "all_levels" else 0)
            prompts = sum(len(lm.prompt_ids(batch["meta"][i].get("text", ""))) for i in keep)
            out["tokens"] = out["frames"] + prompts + extra * len(keep)
    if torch.is_tensor(batch.get("input_ids")):
        ids = batch["input_ids"]
        out["samples"] = float(ids.shape[0])
        out["tokens_padded"] = float(ids.numel())
        mask = batch.get("attention_mask")
        out["tokens"] = float(mask.sum()) if torch.is_tensor(mask) else float(ids.numel())
        if torch.is_tensor(batch.get("code_lengths")):
            out["frames"] = float(batch["code_lengths"].sum())
    return out


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss_bytes()


class StepTimer(Callback):
    """Record per-step wall time, work and memory; write them as JSON at the end of ``fit``/``predict``.

    Args:
        output: JSON path (folders are created).
        label: free text stored in the JSON (e.g. the stage name).
    """

    def __init__(self, *, output: str = "step_times.json", label: str = "") -> None:
        super().__init__()
        self.output, self.label = output, label
        self.steps: list[dict[str, float]] = []
        self.predict_batches: list[dict[str, float]] = []
        self._t0 = 0.0
        self._start = time.perf_counter()
        self._max_step_rss = 0

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _begin(self, pl_module: LightningModule) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def _end(self, pl_module: LightningModule, batch: Any, into: list[dict[str, float]]) -> None:
        self._sync(pl_module)
        seconds = time.perf_counter() - self._t0
        self._max_step_rss = max(self._max_step_rss, _rss_bytes())
        into.append({"seconds": seconds, **batch_work(batch, pl_module)})

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps = []
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._begin(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end(pl_module, batch, self.steps)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.predict_batches = []
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin(pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end(pl_module, batch, self.predict_batches)
        if isinstance(outputs, dict) and isinstance(outputs.get("codes"), list):
            # Generated (stage 2) or tokenized (stage 1) frames: what a predict batch produced.
            self.predict_batches[-1]["frames_out"] = float(sum(c.shape[-1] for c in outputs["codes"]))

    def report(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        device = pl_module.device
        memory: dict[str, Any] = {"peak_rss_bytes": _peak_rss_bytes(), "max_step_rss_bytes": self._max_step_rss}
        if device.type == "cuda":
            memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            memory["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        return {
            "label": self.label,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
            "precision": str(trainer.precision),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "parameters": count_parameters(pl_module),
            "memory": memory,
            "steps": self.steps,
            "predict_batches": self.predict_batches,
            "process_seconds": time.perf_counter() - self._start,
        }

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(self.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.report(trainer, pl_module), indent=1))
        os.replace(tmp, path)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)
