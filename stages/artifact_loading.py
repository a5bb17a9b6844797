"""Loading an artifact: rebuild its modules from JSON and safetensors only, building only our own classes.

Nothing an artifact names is executed: each module must be a class of this project's ``models``
package of the kind expected for its name (:data:`ARTIFACT_KINDS`), checked before its module is
imported (:mod:`stages.safety`), and every file it names must lie inside the artifact folder. The
format itself is written by :func:`stages.artifacts.promote`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from stages.safety import UnsafeArtifactError, inside_artifact, resolve_class_path

__all__ = ["ARTIFACT_KINDS", "build_module", "check_spec", "load_artifact", "parent_record", "resolve_artifact"]


def resolve_artifact(path: str | os.PathLike) -> Path:
    """Resolve ``artifacts/<stage>/current`` (or a version folder) to a complete version folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"artifact {str(path)!r} does not exist (promote a run first)")
    p = p.resolve()
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} is not a complete artifact (no config.json)")
    return p



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
