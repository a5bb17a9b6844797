"""Promotion as a step of ``fit``: the :class:`Promote` callback, which ``speechless-promote``
(:func:`stages.cli.promote_main`) also drives over a finished run.

After ``fit``, the CLI validates the best, final and averaged checkpoints, then the ``Promote``
callback (when configured) picks one by config, checks its gates and writes the artifact
(:mod:`stages.artifacts`). Only rank 0 writes; the other ranks wait at a barrier and all ranks
leave with the same outcome, so nobody hangs. A gate failure ends the command with exit status 4,
unless the gates are overridden on purpose (``force_gates``: ``lightning fit ... --promote.force_gates
true``, ``speechless-promote ... --force-gates``, or ``force_gates: true`` in the callback's YAML): the
artifact is then written, the failed gates are printed on stderr, and they are recorded (metric, value,
bounds) in its ``provenance.json`` and at the top of its model card (:func:`stages.artifacts.promote`).
The run's skipped samples (:mod:`stages.skips`) are gated like any metric (``skipped/train/fraction``
joins the validation metrics) and recorded in ``provenance["data"]["skipped"]``; over a finished run
the train counts come from the checkpoint's ``SkipTally`` state, the val counts from validating it.
"""

from __future__ import annotations

import hashlib
import math
import traceback
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from stages.artifacts import GateError, PromotionResult, code_version, promote
from stages.skips import explain_skips, skip_tally

__all__ = ["Promote", "plain", "provenance_for"]


def plain(value: Any) -> Any:
    """A jsonargparse Namespace / nested structure as plain JSON-able data."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _data_provenance(datamodule: Any) -> dict[str, Any]:
    """Shards the run trained on, with sample counts and a content hash over their hashes."""
    describe = getattr(datamodule, "describe_data", None)
    if describe is None:
        return {}
    data = describe()
    digest = hashlib.sha256()
    for shard in data.get("shards", []):
        digest.update(f"{shard.get('url')}:{shard.get('samples')}:{shard.get('sha256')}".encode())
    for i, source in enumerate(data.get("sources", [])):
        if source.get("weight", 1.0) != 1.0:  # reweighting the same shards is other training data
            digest.update(f"source {i} weight {source['weight']!r}".encode())
    data["content_hash"] = digest.hexdigest()
    return data


def provenance_for(*, config: Any, model: LightningModule, datamodule: Any, checkpoint: str | None, selected: str) -> dict[str, Any]:
    parents = getattr(model, "parent_artifacts", lambda: [])()
    return {
        "config": plain(config),
        "code": code_version(),
        "data": _data_provenance(datamodule),
        "parents": parents,
        "checkpoint": checkpoint,
        "selected": selected,
    }


class Promote(Callback):
    """Promote the chosen checkpoint of a finished ``fit`` into ``artifacts/<stage>/v<N>``.

    Args:
        stage: artifact stage name (``stage1`` ...).
        select: which checkpoint: ``averaged``, ``best`` or ``final`` (falls back in that order
            when the chosen one does not exist, and says so), or ``validated``: whichever of them
            scores best on ``compare_metric`` in the validation the CLI runs after ``fit`` (ties go
            to the earlier of averaged, best, final). ``best`` is ModelCheckpoint's choice among the
            checkpoints validated *during* training, so a fit that stops between validations
            (``max_steps`` mid-epoch) leaves its last steps to ``final`` alone; ``validated`` weighs
            them all on the same footing.
        gates: ``{"val/cosine": {"min": 0.9}, "skipped/train/fraction": {"max": 0.01}}``: bounds on
            the chosen checkpoint's validation metrics and the fit's skip counts (``stages.skips``).
        compare_metric: the metric deciding whether the new version replaces ``current``.
        compare_mode: ``max`` or ``min``.
        artifacts_dir: root of the artifacts.
        force: replace a better ``current`` (gates still apply).
        force_gates: promote despite failed gates, on purpose (said on stderr, recorded in the
            artifact's provenance and model card); whether it replaces a better ``current`` is
            still ``force``'s choice. The CLI's ``--promote.force_gates true`` sets it for one run.
    """

    def __init__(
        self,
        *,
        stage: str,
        select: Literal["averaged", "best", "final", "validated"] = "averaged",
        gates: dict[str, dict[str, float]] | None = None,
        compare_metric: str | None = None,
        compare_mode: Literal["max", "min"] = "max",
        artifacts_dir: str = "artifacts",
        force: bool = False,
        force_gates: bool = False,
    ) -> None:
        super().__init__()
        if select not in ("averaged", "best", "final", "validated"):
            raise ValueError(f"select must be averaged, best, final or validated, got {select!r}")
        if select == "validated" and not compare_metric:
            raise ValueError("select: validated needs a compare_metric to rank the validated checkpoints by")
        self.stage, self.select, self.gates = stage, select, gates or {}
        self.compare_metric, self.compare_mode = compare_metric, compare_mode
        self.artifacts_dir, self.force, self.force_gates = artifacts_dir, force, force_gates
        self.result: PromotionResult | None = None

    def choose(self, candidates: dict[str, str]) -> tuple[str, str | None]:
        """The checkpoint to validate last and promote; for ``validated``, a provisional choice
        (``averaged`` first) that :meth:`choose_validated` settles once every candidate is scored."""
        order = [self.select] + [c for c in ("averaged", "best", "final") if c != self.select]
        for name in order:
            if name in candidates:
                return name, candidates[name]
        return "current-weights", None

    def choose_validated(self, results: dict[str, dict[str, float]]) -> str | None:
        """``select: validated``: the candidate whose post-fit validation is best on ``compare_metric``
        (``None`` for the other selections, or when no candidate reports the metric). Ties go to
        the earlier of averaged, best, final; a NaN never wins."""
        if self.select != "validated":
            return None
        values = {n: results[n].get(self.compare_metric, math.nan) for n in ("averaged", "best", "final") if n in results}
        scored = [(n, v) for n, v in values.items() if not math.isnan(v)]
        if not scored:
            return None
        sign = 1.0 if self.compare_mode == "min" else -1.0
        return min(scored, key=lambda nv: sign * nv[1])[0]

    def promote_module(
        self, *, trainer: Trainer, model: LightningModule, datamodule: Any, config: Any, metrics: dict[str, float], selected: str, checkpoint: str | None
    ) -> PromotionResult | None:
        """Rank 0 writes; every rank returns after the barrier with the same outcome.

        A gate failure raises ``GateError`` on every rank; any other failure of rank 0's write
        raises ``RuntimeError`` (with rank 0's message) on every rank, so no rank is left waiting.
        """
        outcome: tuple[str, str] | None = None  # (kind, message) of rank 0's failure
        # The run's skips: train counts join the gated metrics (val ones are validation metrics).
        tally = skip_tally(trainer)
        metrics = {**metrics, **(tally.metrics("train") if tally else {})}
        if trainer.is_global_zero:
            try:
                provenance = provenance_for(config=config, model=model, datamodule=datamodule, checkpoint=checkpoint, selected=selected)
                if tally is not None:
                    provenance["data"]["skipped"] = tally.records()
                self.result = promote(
                    stage=self.stage,
                    modules=model.artifact_modules(plain(config)),
                    metrics={k: float(v) for k, v in metrics.items()},
                    artifacts_dir=self.artifacts_dir,
                    gates=self.gates,
                    compare_metric=self.compare_metric,
                    compare_mode=self.compare_mode,
                    force=self.force,
                    force_gates=self.force_gates,
                    info=model.artifact_info(),
                    provenance=provenance,
                )
                verdict = "now current" if self.result.became_current else "kept; current is better (use force to replace)"
                print(f"[promote] {self.stage}: {selected} checkpoint -> {self.result.path} ({verdict})", flush=True)
            except GateError as exc:
                outcome = ("gate", explain_skips(str(exc), tally))
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                outcome = ("error", f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
        outcome = trainer.strategy.broadcast(outcome, src=0)
        trainer.strategy.barrier("promote")
        if outcome is not None:
            kind, message = outcome
            if kind == "gate":
                raise GateError(message)
            raise RuntimeError(f"promotion failed on rank 0: {message}")
        return self.result
