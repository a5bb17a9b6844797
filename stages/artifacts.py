"""The artifact format: a trained stage promoted (gated, atomically) into a folder the next stage loads.

An artifact is a folder ``artifacts/<stage>/v<N>/`` that rebuilds its modules without the training
code's checkpoint pickle (``../shared/DESIGN.md``, promoted-artifact contract):

- ``<name>.safetensors`` per exported module, and ``config.json`` with each module's ``class_path``
  and ``init_args`` (enough to rebuild it), plus stage-specific ``info``. Loading builds only this
  project's ``models`` classes of the kind expected for each module name (:data:`ARTIFACT_KINDS`)
  and reads only files inside the artifact folder, checked before any import (:mod:`stages.safety`);
- ``metrics.json``; ``provenance.json`` (resolved config, code version and dirty flag, shards with
  sample counts and hashes, parent artifacts with their hashes, time); ``README.md`` (model card).

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
from safetensors.torch import load_file, save_file

from datamodules.shards import file_sha256
from stages.safety import UnsafeArtifactError, inside_artifact, resolve_class_path

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


def _gates_section(gates: dict[str, Any]) -> tuple[str, str]:
    """The model card's warning banner (empty unless gates were overridden) and its gates section."""
    overridden = gates.get("overridden") or []
    bounds = gates.get("bounds") or {}
    if not bounds:
        return "", ""

    def bound(b: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in b.items())

    failed = {f["metric"] for f in overridden}
    rows = "\n".join(
        f"| {name} | {bound(b)} | {'FAILED (overridden)' if name in failed else 'passed'} |" for name, b in bounds.items()
    )
    section = f"## Gates\n\n| metric | bounds | result |\n| --- | --- | --- |\n{rows}\n\n"
    if not overridden:
        return "", section
    lines = "\n".join(
        f"- `{f['metric']}` = {'missing' if f['value'] is None else format(f['value'], '.4g')} (bounds: {bound(f['bounds'])})"
        for f in overridden
    )
    banner = (
        f"> **Warning: promoted with failed gates** (overridden on purpose with `{gates.get('override', 'force_gates')}`).\n"
        f"> These bounds were not met:\n\n{lines}\n\n"
    )
    return banner, section


def _model_card(stage: str, version: int, metrics: dict[str, float], provenance: dict[str, Any]) -> str:
    banner, gates = _gates_section(provenance.get("gates") or {})
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    parents = "\n".join(f"- `{p['path']}` (sha256 `{p.get('sha256', '')[:12]}`)" for p in provenance.get("parents", [])) or "- none"
    shards = provenance.get("data", {})
    code = provenance.get("code", {})
    return (
        f"# {stage} v{version}\n\n"
        f"{banner}"
        f"Promoted {provenance.get('time')} from `{provenance.get('checkpoint')}` "
        f"(selected: {provenance.get('selected')}).\n\n"
        f"## Metrics\n\n| metric | value |\n| --- | --- |\n{rows}\n\n"
        f"{gates}"
        f"## Provenance\n\n- code: `{code.get('commit')}`{' (dirty tree)' if code.get('dirty') else ''}\n"
        f"- training data: {shards.get('samples', '?')} samples in {len(shards.get('shards', []))} shards "
        f"(content hash `{str(shards.get('content_hash', ''))[:12]}`)\n"
        f"- parents:\n{parents}\n\n"
        f"## Load\n\n```python\nfrom stages.artifacts import load_artifact\nmodules = load_artifact('{stage_dir_hint(stage)}')\n```\n"
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
    (tmp / "README.md").write_text(_model_card(stage, version, metrics, prov))
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


#: What each artifact module may be built as, by module name, when ``load_artifact`` is given no
#: ``expect``: stage 1 ``quantizer`` and ``encoder``, stage 2 ``lm``, stage 3 ``llm`` (and ``projector``).
ARTIFACT_KINDS: dict[str, str] = {
    "quantizer": "models.quantizer.SemanticQuantizer",
    "encoder": "models.encoders.base.FrozenEncoder",
    "lm": "models.speech_lm.SpeechLM",
    "llm": "models.spoken_llm.SpokenLLM",
    "projector": "models.projector.AudioProjector",
}


def _kind(expected: type | str) -> type:
    """A kind given by dotted name is one of ours (``ARTIFACT_KINDS``), resolved like any class path."""
    if isinstance(expected, type):
        return expected
    return resolve_class_path(expected, torch.nn.Module, what=f"expected kind {expected!r}")


def check_spec(spec: dict[str, Any], expected: type | str | None, *, what: str) -> None:
    """Refuse, without building anything, a spec that :func:`build_module` would refuse.

    ``expected`` None: the module's name has no kind in :data:`ARTIFACT_KINDS`.
    """
    if expected is None:
        raise UnsafeArtifactError(f"{what}: no expected kind for this module name (known: {sorted(ARTIFACT_KINDS)})")
    resolve_class_path(spec.get("class_path"), _kind(expected), what=what)

    def _walk(value: Any, where: str) -> None:
        if isinstance(value, dict) and "class_path" in value:
            check_spec(value, torch.nn.Module, what=where)
        elif isinstance(value, dict):
            for k, v in value.items():
                _walk(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                _walk(v, f"{where}[{i}]")

    for k, v in (spec.get("init_args") or {}).items():
        _walk(v, f"{what}.{k}")


def build_module(spec: dict[str, Any], root: Path | None = None, *, expected: type | str = torch.nn.Module, what: str = "spec") -> Any:
    """Instantiate ``{"class_path", "init_args"}`` recursively, building only project modules.

    The top-level ``class_path`` must be a project class (or project classmethod) of kind
    ``expected``; a nested spec (a dict with ``class_path`` inside ``init_args``) must be a project
    ``torch.nn.Module``. Each is checked by :func:`stages.safety.resolve_class_path` before its
    module is imported; the built object must be an instance of the kind.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``.
        root: The artifact folder that ``"@artifact/<sub>"`` strings are resolved against; they
            must stay inside it.
        expected: The kind (a class, or the dotted name of a project class).
        what: Names the spec in error messages.

    Raises:
        UnsafeArtifactError: A class path or folder reference that loading refuses.
    """
    kind = _kind(expected)
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise UnsafeArtifactError(f"{what}: not a {{class_path, init_args}} spec")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict) or not all(isinstance(k, str) for k in init_args):
        raise UnsafeArtifactError(f"{what}: init_args must be an object with string keys")
    check_spec(spec, kind, what=what)  # the whole tree, before anything in it is built
    target = resolve_class_path(spec["class_path"], kind, what=what)

    def _build(value: Any, where: str) -> Any:
        if isinstance(value, str) and value.startswith("@artifact/"):
            if root is None:
                raise ValueError(f"{value!r} needs the artifact folder to resolve against")
            return str(inside_artifact(root, value[len("@artifact/") :], what=where))
        if isinstance(value, dict) and "class_path" in value:
            return build_module(value, root, expected=torch.nn.Module, what=where)
        if isinstance(value, dict):
            return {k: _build(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [_build(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    kwargs = {k: _build(v, f"{what}.{k}") for k, v in init_args.items()}
    built = target(**kwargs)
    if not isinstance(built, kind):
        raise UnsafeArtifactError(f"{what}: {spec['class_path']} returned a {type(built).__name__}, not a {kind.__name__}")
    return built


def load_artifact(
    path: str | os.PathLike, *, names: list[str] | None = None, expect: dict[str, type | str] | None = None
) -> dict[str, Any]:
    """Rebuild an artifact's modules from JSON and safetensors only (nothing is unpickled).

    Nothing the artifact names is executed: each module must be a class of this project's
    ``models`` package of the kind expected for its name, checked before import (see
    :func:`build_module`), and every file it names must lie inside the artifact folder.

    Args:
        path: ``artifacts/<stage>/current`` or a version folder.
        names: Load only these modules (default: all).
        expect: Module name -> the kind it must be (a class or a project class's dotted name);
            default :data:`ARTIFACT_KINDS`. A module with no expected kind is refused.

    Returns:
        ``{"config": config.json, "metrics": ..., "path": Path, "modules": {name: nn.Module}}``.

    Raises:
        UnsafeArtifactError: A class or path the artifact names that loading refuses.
    """
    root = resolve_artifact(path)
    config = json.loads((root / "config.json").read_text())
    entries = config.get("modules") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UnsafeArtifactError(f"{root}/config.json: no 'modules' object")
    kinds = ARTIFACT_KINDS if expect is None else expect
    modules = {}
    for name, entry in entries.items():
        if names is not None and name not in names:
            continue
        what = f"{root}/config.json module {name!r}"
        if name not in kinds:
            raise UnsafeArtifactError(f"{what}: no expected kind for this module (known: {sorted(kinds)})")
        if not isinstance(entry, dict):
            raise UnsafeArtifactError(f"{what}: not an object")
        weights = inside_artifact(root, entry["weights"], what=f"{what} weights") if "weights" in entry else None
        if "folder" in entry:
            inside_artifact(root, entry["folder"], what=f"{what} folder")
        module = build_module(entry, root, expected=kinds[name], what=what)
        if weights is not None:
            state = load_file(str(weights))
            missing, unexpected = module.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith("_")]:
                raise ValueError(f"{root}/{entry['weights']} does not fit {entry['class_path']}: missing {missing}, unexpected {unexpected}")
        modules[name] = module
    metrics = json.loads((root / "metrics.json").read_text()) if (root / "metrics.json").exists() else {}
    return {"config": config, "metrics": metrics, "path": root, "modules": modules}


def parent_record(loaded: dict[str, Any]) -> dict[str, str]:
    """``{"path", "sha256"}`` of a :func:`load_artifact` result: how a stage records the artifact it
    started from (``parent_artifacts()``, then ``provenance.json``'s ``parents``)."""
    return {"path": str(loaded["path"]), "sha256": loaded["config"].get("sha256", "")}
