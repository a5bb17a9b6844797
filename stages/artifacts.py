"""The artifact format: a trained stage promoted (gated, atomically) into a folder the next stage loads.

An artifact is a folder ``artifacts/<stage>/v<N>/`` that rebuilds its modules without the training
code's checkpoint pickle (``../shared/DESIGN.md``, promoted-artifact contract):

- ``<name>.safetensors`` per exported module, and ``config.json`` with each module's ``class_path``
  and ``init_args`` (enough to rebuild it), plus stage-specific ``info``. Loading builds only this
  project's ``models`` classes of the kind expected for each module name (:data:`ARTIFACT_KINDS`)
  and reads only files inside the artifact folder, checked before any import (:mod:`stages.safety`;
  loading is :mod:`stages.artifact_loading`);
- ``metrics.json``; ``provenance.json`` (resolved config, code version and dirty flag, shards with
  sample counts and hashes, parent artifacts with their hashes, time); ``README.md`` (model card,
  :mod:`stages.artifact_card`).

The version folder is written under a temporary name and renamed when complete; ``current`` is a
symlink swapped with ``os.replace``, so a promotion killed half-way leaves the previous ``current``
intact and no half-written version that looks complete; the next promotion removes what it left
(``.v<N>.tmp-<PID>``, ``.current.tmp-<PID>`` of a PID that is no longer running). Gates are checked first: a failure is a
clear message and no promotion, unless the user overrides them on purpose (``force_gates``): the
version is then written with the failed gates (metric, value, bounds) in ``provenance.json``
(``gates.overridden``) and at the top of its model card, and the override is announced on stderr and
as a :class:`GatesOverridden` warning. A worse artifact does not replace a better ``current`` unless
forced (``force``, a separate choice: overriding the gates does not also replace a better ``current``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from datamodules.shards import file_sha256
from stages.artifact_card import model_card, stage_dir_hint  # noqa: F401 (stage_dir_hint: re-exported)
from stages.artifact_loading import (
    ARTIFACT_KINDS,
    build_module,
    check_spec,
    load_artifact,
    parent_record,
    resolve_artifact,
)
from stages.safety import UnsafeArtifactError

__all__ = [
    "ARTIFACT_KINDS",
    "ArtifactModule",
    "GateError",
    "GatesOverridden",
    "PromotionResult",
    "UnsafeArtifactError",
    "build_module",
    "check_spec",
    "code_version",
    "evaluate_gates",
    "gate_failures",
    "load_artifact",
    "model_card",
    "parent_record",
    "promote",
    "remove_stale_tmp",
    "resolve_artifact",
]


class GateError(RuntimeError):
    """Raised when a candidate fails its gates or is worse than ``current``."""


class GatesOverridden(UserWarning):
    """A version was promoted although some of its gates failed (``force_gates``)."""


@dataclass
class ArtifactModule:
    """One module of an artifact: how to rebuild it, and its weights (may be empty).

    ``save`` (optional) writes the module into its own subfolder ``<name>/`` of the artifact, for
    modules with their own pickle-free format (e.g. :meth:`models.speech_lm.SpeechLM.save`); an
    ``init_args`` string ``"@artifact/<sub>"`` is resolved to that folder at load, and
    ``class_path`` may name a classmethod (``pkg.mod.Class.load``).
    """

    class_path: str
    init_args: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    save: Callable[[Path], Any] | None = None


@dataclass
class PromotionResult:
    path: Path
    version: int
    became_current: bool


def code_version(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Git commit of the code and whether the tree had uncommitted changes."""
    root = str(root or Path(__file__).resolve().parents[1])
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("speechless-lightning")
    except PackageNotFoundError:
        pkg = "unknown"
    return {"commit": commit, "dirty": dirty, "package_version": pkg}


def gate_failures(metrics: dict[str, float], gates: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The failed gates, each as ``{"metric", "value", "bounds", "message"}`` (empty: all passed).

    ``value`` is None for a metric the run does not have; NaN never passes.

    Args:
        metrics: ``{"val/cosine": 0.97, ...}``.
        gates: ``{"val/cosine": {"min": 0.9}, "val/mse": {"max": 2.5}}``.
    """
    failures = []
    for name, bounds in gates.items():
        bounds = dict(bounds)
        if name not in metrics:
            failures.append({"metric": name, "value": None, "bounds": bounds,
                             "message": f"{name}: no such metric (have {sorted(metrics)})"})  # fmt: skip
            continue
        value = float(metrics[name])
        if value != value:  # NaN never passes
            failures.append({"metric": name, "value": value, "bounds": bounds, "message": f"{name} is NaN"})
            continue
        if "min" in bounds and not value >= bounds["min"]:
            failures.append({"metric": name, "value": value, "bounds": bounds,
                             "message": f"{name} = {value:.4g} is below the minimum {bounds['min']}"})  # fmt: skip
        if "max" in bounds and not value <= bounds["max"]:
            failures.append({"metric": name, "value": value, "bounds": bounds,
                             "message": f"{name} = {value:.4g} is above the maximum {bounds['max']}"})  # fmt: skip
    return failures


def evaluate_gates(metrics: dict[str, float], gates: dict[str, dict[str, float]]) -> list[str]:
    """Return the failed gate messages (empty: all passed); see :func:`gate_failures`.

    Args:
        metrics: ``{"val/cosine": 0.97, ...}``.
        gates: ``{"val/cosine": {"min": 0.9}, "val/mse": {"max": 2.5}}``.
    """
    return [f["message"] for f in gate_failures(metrics, gates)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _versions(stage_dir: Path) -> list[int]:
    out = []
    for p in stage_dir.glob("v*"):
        if p.is_dir() and p.name[1:].isdigit() and (p / "config.json").exists():
            out.append(int(p.name[1:]))
    return sorted(out)


_COMPARABLE_KEYS = ("encoder", "stage1", "num_quantizers", "num_levels", "codebook_size")


def promote(
    *,
    stage: str,
    modules: dict[str, ArtifactModule],
    metrics: dict[str, float],
    artifacts_dir: str | os.PathLike = "artifacts",
    gates: dict[str, dict[str, float]] | None = None,
    compare_metric: str | None = None,
    compare_mode: str = "max",
    force: bool = False,
    force_gates: bool = False,
    info: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> PromotionResult:
    """Write ``artifacts/<stage>/v<N>`` atomically and point ``current`` at it.

    Args:
        stage: ``stage1``, ``stage2`` or ``stage3``.
        modules: name -> module description and weights.
        metrics: the selected checkpoint's metrics.
        artifacts_dir: the artifacts root.
        gates: per-metric bounds; any failure raises :class:`GateError` and writes nothing (unless
            ``force_gates``). Recorded in the provenance (``gates.bounds``) and the model card.
        compare_metric: metric deciding whether the new version beats ``current``.
        compare_mode: ``max`` (higher is better) or ``min``.
        force: replace a better ``current`` anyway (gates are never skipped). A ``current`` whose
            ``info`` names another encoder, stage-1 parent or code book is not compared with: its
            metrics were measured in another space, so the new version replaces it.
        force_gates: promote despite failed gates, on purpose: says so on stderr and as a
            :class:`GatesOverridden` warning, and records each failed gate (metric, value, bounds) in
            ``provenance["gates"]["overridden"]`` and at the top of the model card. Whether the
            version replaces a better ``current`` is still ``force``'s decision.
        info: stage-specific facts later stages check (levels, codebook size, encoder...).
        provenance: config, data, parents, checkpoint; code version and time are added here.

    Returns:
        Where it was written and whether it became ``current``.

    Raises:
        GateError: A gate failed (and ``force_gates`` is off); nothing is written.
        UnsafeArtifactError: A module that loading would refuse (not a project class of the kind
            :data:`ARTIFACT_KINDS` gives its name); nothing is written.
    """
    failures = gate_failures(metrics, gates or {})
    listed = "\n  - ".join(f["message"] for f in failures)
    if failures and not force_gates:
        raise GateError(f"{stage}: not promoted, gates failed:\n  - {listed}")
    for name, mod in modules.items():  # what loading would refuse is not promoted
        check_spec({"class_path": mod.class_path, "init_args": mod.init_args}, ARTIFACT_KINDS.get(name), what=f"{stage} module {name!r}")
    stage_dir = Path(artifacts_dir) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    current_link = stage_dir / "current"
    became_current = True
    if current_link.exists() and compare_metric and not force:
        old = json.loads((current_link / "metrics.json").read_text())
        old_info = json.loads((current_link / "config.json").read_text()).get("info", {})
        # Metrics are only comparable in the same space: same encoder (stage 1), same stage-1 parent
        # (stage 2's generation cosine is measured in its RVQ's state space), same code book.
        same_space = all(old_info.get(k) == (info or {}).get(k) for k in _COMPARABLE_KEYS)
        if same_space and compare_metric in old and compare_metric in metrics:
            new_v, old_v = float(metrics[compare_metric]), float(old[compare_metric])
            worse = new_v < old_v if compare_mode == "max" else new_v > old_v
            if worse:
                became_current = False
    remove_stale_tmp(stage_dir)
    version = (_versions(stage_dir) or [0])[-1] + 1
    provenance = dict(provenance or {})
    provenance["gates"] = {"bounds": dict(gates or {}), "overridden": failures, "override": "force_gates" if failures else None}
    if failures:  # loudly: the user asked for it, and everyone reading the log must see it
        message = (f"{stage}: GATES OVERRIDDEN (force_gates): promoting v{version} although these gates failed:"
                   f"\n  - {listed}\n(recorded in its provenance.json and model card)")  # fmt: skip
        print(f"[promote] {message}", file=sys.stderr, flush=True)
        warnings.warn(message, GatesOverridden, stacklevel=2)
    tmp = stage_dir / f".v{version}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        return _write_version(stage_dir, tmp, version, stage, modules, metrics, info, provenance, became_current)
    except BaseException:
        # A failure (not a kill) removes its own temporary entries; a kill leaves them to the next one.
        _remove_entry(tmp)
        _remove_entry(stage_dir / f".current.tmp-{os.getpid()}")
        raise


def _write_version(
    stage_dir: Path, tmp: Path, version: int, stage: str, modules: dict[str, ArtifactModule],
    metrics: dict[str, float], info: dict[str, Any] | None, provenance: dict[str, Any] | None, became_current: bool,
) -> PromotionResult:  # fmt: skip
    current_link = stage_dir / "current"
    config: dict[str, Any] = {"stage": stage, "version": version, "modules": {}, "info": info or {}}
    parts = []
    for name, mod in modules.items():
        entry: dict[str, Any] = {"class_path": mod.class_path, "init_args": mod.init_args}
        if mod.state_dict:
            weights = tmp / f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in mod.state_dict.items()}, str(weights))
            entry["weights"] = weights.name
            entry["sha256"] = file_sha256(weights)
            parts.append(entry["sha256"])
        if mod.save is not None:
            mod.save(tmp / name)
            entry["folder"] = name
            entry["sha256"] = hashlib.sha256(
                "".join(file_sha256(f) for f in sorted((tmp / name).rglob("*")) if f.is_file()).encode()
            ).hexdigest()
            parts.append(entry["sha256"])
        config["modules"][name] = entry
    config["sha256"] = hashlib.sha256("".join(parts).encode()).hexdigest()
    prov = dict(provenance or {})
    prov.setdefault("time", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    prov.setdefault("code", code_version())
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "metrics.json", metrics)
    _write_json(tmp / "provenance.json", prov)
    (tmp / "README.md").write_text(model_card(stage, version, metrics, prov))
    _fsync_dir(tmp)
    final = stage_dir / f"v{version}"
    os.replace(tmp, final)
    _fsync_dir(stage_dir)
    if became_current:
        link_tmp = stage_dir / f".current.tmp-{os.getpid()}"
        _remove_entry(link_tmp)
        os.symlink(final.name, link_tmp)
        os.replace(link_tmp, current_link)
        _fsync_dir(stage_dir)
    return PromotionResult(path=final, version=version, became_current=became_current)


_TMP_ENTRY = re.compile(r"\.(?:v\d+|current)\.tmp-(\d+)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_entry(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_tmp(stage_dir: Path) -> list[str]:
    """Remove what killed promotions left in ``stage_dir``: ``.v<N>.tmp-<PID>`` and ``.current.tmp-<PID>``.

    An entry is stale when its PID is no live process on this machine (or is this process, which is
    not promoting yet); a concurrent promotion's entries (live PID) are kept. Promotion writes from
    one process on one machine (rank 0); for an artifacts folder shared by promotions on *several*
    machines at once a PID from another machine can look dead here, so do not run those concurrently.

    Returns:
        The names removed.
    """
    removed = []
    for entry in stage_dir.iterdir():
        match = _TMP_ENTRY.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        _remove_entry(entry)
        removed.append(entry.name)
    return sorted(removed)


