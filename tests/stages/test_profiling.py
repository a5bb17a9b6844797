"""StepTimer: per-step times, work counts and memory, written as JSON at the end of fit."""

from __future__ import annotations

import json

import torch
from lightning import LightningModule, Trainer
from torch.utils.data import DataLoader

from stages.profiling import StepTimer, batch_work, count_parameters


class _Hidden(torch.nn.Module):
    """Like models.encoders.base.FrozenEncoder: the network is hidden from registration."""

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_model", torch.nn.Linear(4, 4).requires_grad_(False))  # 20 frozen parameters

    def num_frames(self, n: torch.Tensor) -> torch.Tensor:
        return n // 640  # 25 frames/s at 16 kHz


class _Module(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Hidden()
        self.head = torch.nn.Linear(3, 1)  # 4 trainable parameters
        self.register_buffer("codebook", torch.zeros(2, 3))

    def training_step(self, batch, batch_idx):
        return self.head(batch["input_ids"].float()[..., None].expand(-1, -1, 3)).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def _batches(n: int) -> list[dict]:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask} for _ in range(n)]


def test_counts_hidden_frozen_networks_and_buffers():
    counts = count_parameters(_Module())
    assert counts == {"total": 24, "trainable": 4, "float_buffers": 6}


def test_batch_work_reads_audio_and_token_batches():
    module = _Module()
    audio = {"audio_lengths": torch.tensor([16000, 32000, 8000]), "sample_weight": torch.tensor([1.0, 1.0, 0.0])}
    assert batch_work(audio, module) == {"samples": 2.0, "audio_seconds": 3.0, "frames": 75.0}
    tokens = batch_work(_batches(1)[0], module)
    assert tokens == {"samples": 2.0, "tokens_padded": 8.0, "tokens": 5.0}


def test_step_timer_writes_steps_memory_and_parameters(tmp_path):
    out = tmp_path / "timer" / "steps.json"
    trainer = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer(output=str(out), label="t")])  # fmt: skip
    trainer.fit(_Module(), DataLoader(_batches(3), batch_size=None))
    report = json.loads(out.read_text())
    assert report["label"] == "t" and len(report["steps"]) == 3
    assert all(s["seconds"] > 0 and s["tokens"] == 5.0 for s in report["steps"])
    assert report["parameters"]["trainable"] == 4 and report["memory"]["peak_rss_bytes"] > 0
    assert report["torch_threads"] >= 1
