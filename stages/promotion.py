"""Gated, atomic promotion of a trained stage into an artifact the next stage loads.

An artifact is a folder ``artifacts/<stage>/v<N>/`` that rebuilds its modules without the training
code's checkpoint pickle (``../shared/DESIGN.md``, promoted-artifact contract):

- ``<name>.safetensors`` per exported module, and ``config.json`` with each module's ``class_path``
  and ``init_args`` (enough to rebuild it by import), plus stage-specific ``info``;
- ``metrics.json``; ``provenance.json`` (resolved config, code version and dirty flag, shards with
  sample counts and hashes, parent artifacts with their hashes, time); ``README.md`` (model card).

The version folder is written under a temporary name and renamed when complete; ``current`` is a
symlink swapped with ``os.replace``, so a promotion killed half-way leaves the previous ``current``
intact and no half-written version that looks complete. Gates are checked first: a failure is a
clear message and no promotion. A worse artifact does not replace a better ``current`` unless
forced.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "ArtifactModule",
    "GateError",
    "PromotionResult",
    "build_module",
    "code_version",
    "evaluate_gates",
    "load_artifact",
    "promote",
    "resolve_artifact",
]


class GateError(RuntimeError):
    """Raised when a candidate fails its gates or is worse than ``current``."""


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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def evaluate_gates(metrics: dict[str, float], gates: dict[str, dict[str, float]]) -> list[str]:
    """Return the failed gate messages (empty: all passed).

    Args:
        metrics: ``{"val/cosine": 0.97, ...}``.
        gates: ``{"val/cosine": {"min": 0.9}, "val/mse": {"max": 2.5}}``.
    """
    failures = []
    for name, bounds in gates.items():
        if name not in metrics:
            failures.append(f"{name}: no such metric (have {sorted(metrics)})")
            continue
        value = float(metrics[name])
        if value != value:  # NaN never passes
            failures.append(f"{name} is NaN")
            continue
        if "min" in bounds and not value >= bounds["min"]:
            failures.append(f"{name} = {value:.4g} is below the minimum {bounds['min']}")
        if "max" in bounds and not value <= bounds["max"]:
            failures.append(f"{name} = {value:.4g} is above the maximum {bounds['max']}")
    return failures


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


def _model_card(stage: str, version: int, metrics: dict[str, float], provenance: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    parents = "\n".join(f"- `{p['path']}` (sha256 `{p.get('sha256', '')[:12]}`)" for p in provenance.get("parents", [])) or "- none"
    shards = provenance.get("data", {})
    code = provenance.get("code", {})
    return (
        f"# {stage} v{version}\n\n"
        f"Promoted {provenance.get('time')} from `{provenance.get('checkpoint')}` "
        f"(selected: {provenance.get('selected')}).\n\n"
        f"## Metrics\n\n| metric | value |\n| --- | --- |\n{rows}\n\n"
        f"## Provenance\n\n- code: `{code.get('commit')}`{' (dirty tree)' if code.get('dirty') else ''}\n"
        f"- training data: {shards.get('samples', '?')} samples in {len(shards.get('shards', []))} shards "
        f"(content hash `{str(shards.get('content_hash', ''))[:12]}`)\n"
        f"- parents:\n{parents}\n\n"
        f"## Load\n\n```python\nfrom stages.promotion import load_artifact\nmodules = load_artifact('{stage_dir_hint(stage)}')\n```\n"
    )


def stage_dir_hint(stage: str) -> str:
    return f"artifacts/{stage}/current"


def _versions(stage_dir: Path) -> list[int]:
    out = []
    for p in stage_dir.glob("v*"):
        if p.is_dir() and p.name[1:].isdigit() and (p / "config.json").exists():
            out.append(int(p.name[1:]))
    return sorted(out)


def resolve_artifact(path: str | os.PathLike) -> Path:
    """Resolve ``artifacts/<stage>/current`` (or a version folder) to a complete version folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"artifact {str(path)!r} does not exist (promote a run first)")
    p = p.resolve()
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} is not a complete artifact (no config.json)")
    return p


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
    info: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> PromotionResult:
    """Write ``artifacts/<stage>/v<N>`` atomically and point ``current`` at it.

    Args:
        stage: ``stage1``, ``stage2`` or ``stage3``.
        modules: name -> module description and weights.
        metrics: the selected checkpoint's metrics.
        artifacts_dir: the artifacts root.
        gates: per-metric bounds; any failure raises :class:`GateError` and writes nothing.
        compare_metric: metric deciding whether the new version beats ``current``.
        compare_mode: ``max`` (higher is better) or ``min``.
        force: replace a better ``current`` anyway (gates are never skipped). A ``current`` whose
            ``info`` names another encoder, stage-1 parent or code book is not compared with: its
            metrics were measured in another space, so the new version replaces it.
        info: stage-specific facts later stages check (levels, codebook size, encoder...).
        provenance: config, data, parents, checkpoint; code version and time are added here.

    Returns:
        Where it was written and whether it became ``current``.
    """
    failures = evaluate_gates(metrics, gates or {})
    if failures:
        raise GateError(f"{stage}: not promoted, gates failed:\n  - " + "\n  - ".join(failures))
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
    version = (_versions(stage_dir) or [0])[-1] + 1
    tmp = stage_dir / f".v{version}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    config: dict[str, Any] = {"stage": stage, "version": version, "modules": {}, "info": info or {}}
    parts = []
    for name, mod in modules.items():
        entry: dict[str, Any] = {"class_path": mod.class_path, "init_args": mod.init_args}
        if mod.state_dict:
            weights = tmp / f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in mod.state_dict.items()}, str(weights))
            entry["weights"] = weights.name
            entry["sha256"] = _sha256_file(weights)
            parts.append(entry["sha256"])
        if mod.save is not None:
            mod.save(tmp / name)
            entry["folder"] = name
            entry["sha256"] = hashlib.sha256(
                "".join(_sha256_file(f) for f in sorted((tmp / name).rglob("*")) if f.is_file()).encode()
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
    (tmp / "README.md").write_text(_model_card(stage, version, metrics, prov))
    _fsync_dir(tmp)
    final = stage_dir / f"v{version}"
    os.replace(tmp, final)
    _fsync_dir(stage_dir)
    if became_current:
        link_tmp = stage_dir / f".current.tmp-{os.getpid()}"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(final.name, link_tmp)
        os.replace(link_tmp, current_link)
        _fsync_dir(stage_dir)
    return PromotionResult(path=final, version=version, became_current=became_current)


def _import(class_path: str):
    """``pkg.mod.Class`` or ``pkg.mod.Class.method``: the longest importable module prefix wins."""
    parts = class_path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {class_path!r}")


def build_module(spec: dict[str, Any], root: Path | None = None) -> Any:
    """Instantiate ``{"class_path", "init_args"}`` recursively (nested class specs included).

    ``root``: the artifact folder that ``"@artifact/<sub>"`` strings are resolved against.
    """

    def _build(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("@artifact/"):
            if root is None:
                raise ValueError(f"{value!r} needs the artifact folder to resolve against")
            return str(root / value[len("@artifact/") :])
        if isinstance(value, dict) and "class_path" in value:
            return build_module(value, root)
        if isinstance(value, dict):
            return {k: _build(v) for k, v in value.items()}
        if isinstance(value, list):
            return [_build(v) for v in value]
        return value

    cls = _import(spec["class_path"])
    return cls(**{k: _build(v) for k, v in (spec.get("init_args") or {}).items()})


def load_artifact(path: str | os.PathLike, *, names: list[str] | None = None) -> dict[str, Any]:
    """Rebuild an artifact's modules from JSON and safetensors only (nothing is unpickled).

    Returns:
        ``{"config": config.json, "metrics": ..., "path": Path, "modules": {name: nn.Module}}``.
    """
    root = resolve_artifact(path)
    config = json.loads((root / "config.json").read_text())
    modules = {}
    for name, entry in config["modules"].items():
        if names is not None and name not in names:
            continue
        module = build_module(entry, root)
        if "weights" in entry:
            state = load_file(str(root / entry["weights"]))
            missing, unexpected = module.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith("_")]:
                raise ValueError(f"{root}/{entry['weights']} does not fit {entry['class_path']}: missing {missing}, unexpected {unexpected}")
        modules[name] = module
    metrics = json.loads((root / "metrics.json").read_text()) if (root / "metrics.json").exists() else {}
    return {"config": config, "metrics": metrics, "path": root, "modules": modules}
