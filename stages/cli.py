"""The project's command line: one LightningCLI for every stage.

``lightning fit --config configs/stage1_rvq.yaml`` (also installed as ``speechless``, and runnable as
``python -m stages``) builds the LightningModule and LightningDataModule named by ``class_path`` /
``init_args`` in the config (subclass mode for both), so one entry point runs all three stages and
``fit | validate | test | predict``, ``--print_config`` and ``--ckpt_path`` work as in Lightning.

The saved ``config.yaml`` in the log directory is overwritten on a re-run into the same directory
rather than raising, because resuming a killed run into its own folder is the normal case here.

``speechless-promote`` (:func:`promote_main`) validates a finished run's checkpoint and promotes it
with the run's own ``Promote`` callback.

``--promote.force_gates true`` promotes despite failed gates and ``--promote.force true`` replaces a
better ``current`` (both set the config's ``stages.promote.Promote`` callback for this command, without
editing its YAML). Outside ``fit`` (``validate``, ``test``, ``predict``) the config's
``ModelCheckpoint`` callbacks do not restore the fit's top-k record from ``--ckpt_path``: they save
nothing there, and restoring it into another folder (``--trainer.logger false`` resolves theirs to
``./checkpoints``) only warned that the folder had changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from stages.artifacts import GateError
from stages.averaging import CheckpointAveraging, checkpoint_candidates, save_final_checkpoint
from stages.promote import Promote
from stages.resume import ExactResume, resume_version
from stages.safety import checkpoint_weights_only
from stages.skips import skip_tally, with_skip_tally

__all__ = ["GATE_EXIT", "SpeechlessCLI", "main", "promote_main", "without_checkpoint_restore"]

GATE_EXIT = 4  # exit status of a command whose promotion gates failed

DESCRIPTION = (
    "speechless: train speech-capable Gemma 4 models for low-resource languages "
    "(stage 1 RVQ, stage 2 text-to-semantic-tokens, stage 3 LoRA). "
    "Usage: lightning fit|validate|test|predict --config configs/<stage>.yaml"
)
PROMOTE_DESCRIPTION = "Validate a finished run's checkpoint and promote it with the run's Promote callback."


class FitConfigSaver(SaveConfigCallback):
    """Save the resolved config for ``fit`` only: ``predict``/``validate`` without a logger would
    otherwise drop a ``config.yaml`` into the working directory."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def _ignore_fit_state(state_dict: dict) -> None:
    """A ``ModelCheckpoint.load_state_dict`` for runs that never save: the fit's top-k record stays out."""


def without_checkpoint_restore(trainer: Trainer) -> Trainer:
    """Keep a non-fitting trainer's ``ModelCheckpoint`` callbacks from restoring the fit's top-k record.

    ``validate``/``test``/``predict`` and ``speechless-promote`` save no checkpoint, yet Lightning
    restores every callback's state from ``--ckpt_path``; where the callback's folder is not the one
    the checkpoint records (``--trainer.logger false`` resolves it to ``./checkpoints``, a new logger
    version to another folder) ``ModelCheckpoint`` warned that the folder changed. The callbacks stay
    (dropping them makes Lightning warn that the checkpoint's callbacks are missing); only their
    restore is skipped, which nothing outside ``fit`` reads.
    """
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            cb.load_state_dict = _ignore_fit_state  # this instance only; a fit trainer keeps the method
    return trainer


class SpeechlessCLI(LightningCLI):
    """LightningCLI with the project's defaults (subclass mode, overwrite of the saved config)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", FitConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--promote.force_gates", type=bool, default=False,
                            help="promote although gates failed (said on stderr, recorded in the artifact)")  # fmt: skip
        parser.add_argument("--promote.force", type=bool, default=False, help="replace a better current artifact")

    def _promote_overrides(self) -> dict[str, bool]:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        promote = config.get("promote") or {}
        return {k: bool(promote.get(k, False)) for k in ("force_gates", "force")}

    def before_instantiate_classes(self) -> None:
        """A resumed fit (``--ckpt_path <run>/checkpoints/last.ckpt``) logs into that run's folder."""
        if self.subcommand != "fit":
            return
        cfg = self.config[self.subcommand]
        loggers = cfg.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            args = getattr(logger, "init_args", None) if hasattr(logger, "class_path") else None
            if args is None or args.get("version") is not None or "save_dir" not in args:
                continue
            version = resume_version(cfg.get("ckpt_path"), args["save_dir"], args.get("name", "lightning_logs"))
            if version is not None:
                args["version"] = version

    def instantiate_trainer(self, **kwargs):
        """The trainer, with the callbacks every run needs whether or not its config names them:
        skipped samples are counted (``stages.skips``) and a resumed fit is exact (``stages.resume``)."""
        trainer = with_skip_tally(super().instantiate_trainer(**kwargs))
        if not any(isinstance(cb, ExactResume) for cb in trainer.callbacks):
            trainer.callbacks.append(ExactResume())
        if self.subcommand in ("validate", "test", "predict"):
            without_checkpoint_restore(trainer)
        overrides = self._promote_overrides()
        for cb in trainer.callbacks:
            if isinstance(cb, Promote):
                cb.force_gates = cb.force_gates or overrides["force_gates"]
                cb.force = cb.force or overrides["force"]
        return trainer

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # A checkpoint fetched by URL is never unpickled (Lightning's own default there is weights_only=False).
        if "ckpt_path" in kwargs:
            kwargs["weights_only"] = checkpoint_weights_only(kwargs["ckpt_path"], kwargs.get("weights_only"))
        # Tokenizing 100 h must not keep every prediction in memory: writers stream them to disk.
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        return kwargs

    def after_fit(self) -> None:
        """Validate best, final and averaged checkpoints alike, then promote when configured.

        Runs on every rank, and every collective here is reached by every rank in the same order:
        rank 0's view of the candidates is broadcast (another node may not see the same files), each
        rank validates the same list, and ``trainer.log_dir`` (itself a broadcast) is read by all.
        """
        trainer, model, datamodule = self.trainer, self.model, self.datamodule
        strategy = trainer.strategy
        promoter = next((cb for cb in trainer.callbacks if isinstance(cb, Promote)), None)
        averaging = any(isinstance(cb, CheckpointAveraging) for cb in trainer.callbacks)
        if not (promoter or averaging) or trainer.interrupted:
            return
        if not averaging:  # CheckpointAveraging writes final.ckpt itself
            save_final_checkpoint(trainer)
        candidates = strategy.broadcast(checkpoint_candidates(trainer), src=0)
        if not candidates:
            return
        chosen, chosen_path = promoter.choose(candidates) if promoter else (None, None)
        # The chosen checkpoint is validated last, so the module holds its weights for export.
        order = [n for n in candidates if n != chosen] + ([chosen] if chosen in candidates else [])
        tally = skip_tally(trainer)  # validating a checkpoint loads its train skip counts: keep the fit's
        skipped = {"train": tally.record("train")} if tally else {}
        results: dict[str, dict[str, float]] = {}

        def validate(name: str) -> None:
            metrics = trainer.validate(model, datamodule=datamodule, ckpt_path=candidates[name], verbose=False)
            results[name] = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
            results[name].update(tally.metrics("train") if tally else {})  # as far as this checkpoint

        for name in order:
            validate(name)
        if promoter is not None and promoter.select == "validated":
            # Every rank holds the same reduced metrics; rank 0's pick is broadcast all the same.
            best = strategy.broadcast(promoter.choose_validated(results), src=0)
            if best is not None and best != chosen:  # the module must hold the promoted weights: validate it last, again
                validate(best)
                chosen, chosen_path = best, candidates[best]
            if trainer.is_global_zero and chosen in results:
                print(f"[promote] {promoter.stage}: select validated -> {chosen} ({promoter.compare_metric} "
                      f"{results[chosen].get(promoter.compare_metric, float('nan')):.4f})", flush=True)
        log_dir = trainer.log_dir  # a broadcast: every rank reads it
        if trainer.is_global_zero:
            print_checkpoint_table(results, getattr(model, "summary_metrics", None))
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                with open(os.path.join(log_dir, "checkpoint_metrics.json"), "w") as f:
                    json.dump({"candidates": candidates, "metrics": results, "skipped": skipped}, f, indent=1)
        if promoter is None:
            return
        try:
            promoter.promote_module(
                trainer=trainer,
                model=model,
                datamodule=datamodule,
                config=self.config.get(self.subcommand, self.config),
                metrics=results.get(chosen, {}),
                selected=chosen or "current-weights",
                checkpoint=os.path.abspath(chosen_path) if chosen_path else None,
            )
        except GateError as exc:
            if trainer.is_global_zero:
                print(f"[promote] {exc}", flush=True)
            raise SystemExit(GATE_EXIT) from None


def print_checkpoint_table(results: dict[str, dict[str, float]], keys: list[str] | None = None) -> None:
    """Print one row per checkpoint (best, final, averaged) with the stage's summary metrics."""
    if not results:
        return
    keys = keys or sorted({k for m in results.values() for k in m})
    width = max(len(k) for k in keys)
    print("\ncheckpoint  " + "  ".join(f"{k:>{width}}" for k in keys))
    for name, metrics in results.items():
        cells = "  ".join(f"{metrics.get(k, float('nan')):>{width}.4f}" for k in keys)
        print(f"{name:<10}  {cells}")
    print(flush=True)


def main(args: list[str] | None = None) -> int:
    """Run the CLI on ``args`` (default: the command line); ``speechless init ...`` is ``speechless-init``."""
    # Tokenizers' Rust thread pool and forked DataLoader workers do not mix; quiet the warning.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["init"]:
        from stages.init import main as init_main

        return init_main(argv[1:])
    quiet_known_notices()
    SpeechlessCLI(args=args)
    return 0


# Notices Lightning prints on every run that say nothing to act on here: its own internal use of a
# deprecated torch pytree API, and that frozen modules (the stage-1 encoder, the frozen LLM base)
# are in eval mode at the start of training, which is what this project intends.
KNOWN_NOTICES = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Found \d+ module\(s\) in eval mode at the start of training",
)


def quiet_known_notices() -> None:
    """Hide :data:`KNOWN_NOTICES` (only those: every other warning still shows)."""
    import warnings

    for message in KNOWN_NOTICES:
        warnings.filterwarnings("ignore", message=message)


# Keys a subcommand adds to the config it saves (``fit`` saves ``ckpt_path`` and ``weights_only``);
# they are arguments of that subcommand, not of the model, data or trainer. ``promote`` holds the
# one-command overrides (``--promote.force_gates``): a fit that forced its gates does not make a later
# ``speechless-promote`` over its saved config force them too.
SUBCOMMAND_KEYS = ("ckpt_path", "weights_only", "verbose", "return_predictions", "promote")


def run_config(path: str, tmp: str) -> str:
    """The run's saved ``config.yaml`` without its subcommand's own keys, as a file under ``tmp``."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    if not any(key in config for key in SUBCOMMAND_KEYS):
        return path
    for key in SUBCOMMAND_KEYS:
        config.pop(key, None)
    out = Path(tmp) / "config.yaml"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(out)


def promote_main(argv: list[str] | None = None) -> int:
    """``speechless-promote``: validate a finished run's checkpoint and promote it.

    ``speechless-promote --config lightning_logs/version_0/config.yaml --ckpt_path
    lightning_logs/version_0/checkpoints/averaged.ckpt [--force] [--force-gates]``: ``--force``
    replaces a better ``current``; ``--force-gates`` promotes despite failed gates. They are separate
    choices: a forced-gates version that is worse than ``current`` is kept beside it. Other arguments
    go to the run's CLI (``--trainer.logger false``). Returns 0, 2 (the config has no ``Promote``
    callback) or :data:`GATE_EXIT`.
    """
    parser = argparse.ArgumentParser(prog="speechless-promote", description=PROMOTE_DESCRIPTION)
    parser.add_argument("--config", required=True, help="the run's config.yaml (in its log directory)")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to promote (e.g. .../checkpoints/averaged.ckpt)")
    parser.add_argument("--select", default=None, help="label recorded in provenance (default: from the file name)")
    parser.add_argument("--force", action="store_true", help="replace a better current artifact")
    parser.add_argument("--force-gates", action="store_true",
                        help="promote even though gates failed (said on stderr, recorded in provenance and model card)")
    parser.add_argument("--artifacts_dir", default=None)
    args, rest = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cli = SpeechlessCLI(args=["--config", run_config(args.config, tmp), *rest], run=False)
    without_checkpoint_restore(cli.trainer)  # this command validates a checkpoint; it never saves one
    promoter = next((cb for cb in cli.trainer.callbacks if isinstance(cb, Promote)), None)
    if promoter is None:
        print("speechless-promote: the config has no stages.promote.Promote callback (stage and gates)", file=sys.stderr)
        return 2
    promoter.force = promoter.force or args.force
    promoter.force_gates = promoter.force_gates or args.force_gates
    if args.artifacts_dir:
        promoter.artifacts_dir = args.artifacts_dir
    # The fit's train skips ride in its checkpoints; validating here counts the val ones anew.
    tally = skip_tally(cli.trainer)
    if tally is not None and not tally.load_checkpoint(args.ckpt_path):
        print(f"speechless-promote: {args.ckpt_path} holds no skip counts of its fit", file=sys.stderr)
    metrics = cli.trainer.validate(
        cli.model, datamodule=cli.datamodule, ckpt_path=args.ckpt_path, verbose=False,
        weights_only=checkpoint_weights_only(args.ckpt_path, None),  # a URL is never unpickled
    )[0]  # fmt: skip
    selected = args.select or Path(args.ckpt_path).stem
    try:
        promoter.promote_module(
            trainer=cli.trainer, model=cli.model, datamodule=cli.datamodule, config=cli.config,
            metrics=metrics, selected=selected, checkpoint=os.path.abspath(args.ckpt_path),
        )
    except GateError as exc:
        print(str(exc), file=sys.stderr)
        return GATE_EXIT
    print(json.dumps({"artifact": str(promoter.result.path), "current": promoter.result.became_current}))
    return 0
