"""Helper for ``test_speech_ddp.py``: fit a tiny module over ``SpeechDataModule`` with DDP on the CPU.

Each rank writes ``rank<global_rank>.json`` into ``--out``: per split and epoch, its batches as
lists of ``[key, sample_weight]``. Run as a script so Lightning's ``ddp`` launcher can re-run it for
the other local ranks (and so two "nodes" can be started by hand). ``--train-shards`` takes a JSON
value for ``train_shards`` (e.g. a list of weighted sources); otherwise ``--shards`` serves training
and validation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import lightning as L  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

from datamodules.speech import SpeechDataModule  # noqa: E402


class Recorder(L.LightningModule):
    """A one-weight regression on the mean audio level; records what each rank saw."""

    def __init__(self, out: str, tag: str) -> None:
        super().__init__()
        self.out, self.tag = out, tag
        self.lin = torch.nn.Linear(1, 1)
        self.seen: dict[str, dict[str, list]] = {"train": {}, "val": {}}

    def _step(self, batch, split: str) -> torch.Tensor:
        w = batch["sample_weight"]  # [B]
        x = batch["audio"].abs().mean(dim=1, keepdim=True)  # [B, 1]
        loss = ((self.lin(x).squeeze(1) - 1.0) ** 2 * w).sum() / w.sum().clamp(min=1.0)
        record = self.seen[split].setdefault(str(self.current_epoch), [])
        record.append([[k, float(v)] for k, v in zip(batch["keys"], w.tolist())])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_train_epoch_end(self) -> None:
        loader = self.trainer.train_dataloader
        assert not isinstance(getattr(loader, "sampler", None), DistributedSampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_fit_end(self) -> None:
        out = {"rank": self.global_rank, "world_size": self.trainer.world_size, "seen": self.seen}
        with open(os.path.join(self.out, f"{self.tag}-rank{self.global_rank}.json"), "w") as f:
            json.dump(out, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--train-shards", default=None, help="JSON value for train_shards (default: --shards)")
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default="exact", help="comma-separated epoch modes, one fit each")
    p.add_argument("--epoch-batches", type=int, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    for mode in args.modes.split(","):
        dm = SpeechDataModule(
            train_shards=json.loads(args.train_shards) if args.train_shards else args.shards,
            val_shards=args.shards,
            epoch_mode=mode,
            epoch_batches=args.epoch_batches if mode == "resampled" else None,
            max_batch_seconds=0.9,
            max_batch_size=3,
            bucket_boundaries=[0.3],
            shuffle_buffer=4,
            seed=7,
            num_workers=args.num_workers,
        )
        trainer = L.Trainer(
            accelerator="cpu",
            devices=args.devices,
            num_nodes=args.num_nodes,
            strategy="ddp",
            max_epochs=args.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=args.out,
        )
        trainer.fit(Recorder(args.out, mode), datamodule=dm)


if __name__ == "__main__":
    main()
