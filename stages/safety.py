"""Loading runs nothing a downloaded file names: artifact class paths, artifact paths, checkpoints.

Artifacts are shared like data (``../shared/DESIGN.md``: "artifacts are data, never code"), so what
their ``config.json`` says is checked *before* anything is imported or opened:

- a ``class_path`` must be a dotted path of public identifiers inside one of this project's own
  packages (:data:`PROJECT_PACKAGES`), name a class defined there (or a classmethod a project class
  defines, ``models.speech_lm.SpeechLM.load``), and be of the kind the caller expects; only then is
  the project module (and nothing else) imported;
- a file or folder an artifact names (``weights``, ``folder``, ``"@artifact/<sub>"``) must resolve,
  symbolic links followed, inside the artifact folder.

Lightning checkpoints are pickles: one fetched by URL is loaded with ``weights_only=True``
(:func:`checkpoint_weights_only`), which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import importlib
import importlib.util
import keyword
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PROJECT_PACKAGES",
    "UnsafeArtifactError",
    "checkpoint_weights_only",
    "inside_artifact",
    "is_remote_checkpoint",
    "resolve_class_path",
]

#: Top-level packages whose classes an artifact may name. Artifacts hold ``nn.Module``s, which live
#: in ``models``; ``stages`` (LightningModules) and ``datamodules`` are never an artifact's content.
PROJECT_PACKAGES = ("models",)

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Public names only: no ``_private``, no ``__dunder__`` (``models.rvq.__builtins__`` reaches eval).
_PUBLIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class UnsafeArtifactError(ValueError):
    """An artifact names code or a path that loading refuses."""


def _fail(what: str, message: str) -> UnsafeArtifactError:
    return UnsafeArtifactError(f"{what}: {message}")


def _project_module_file(parts: list[str]) -> Path | None:
    """The project source file of module ``parts`` (``models/rvq.py`` or ``models/encoders/__init__.py``)."""
    base = _PROJECT_ROOT.joinpath(*parts)
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _check_package_is_ours(package: str, what: str) -> None:
    """The importable ``package`` must be this checkout's, not another install that shadows the name."""
    spec = importlib.util.find_spec(package)  # top level: finds, imports nothing
    want = _project_module_file([package])
    # A folder of the same name in the working directory (``models/`` of downloaded weights) makes
    # ``models`` a namespace package that runs no code; the installed project's finder still serves
    # ``models.rvq``, and each module's file is checked before it is imported (``_check_module``).
    namespace = spec is not None and spec.origin in (None, "namespace") and spec.submodule_search_locations is not None
    if namespace:
        return
    if spec is None or spec.origin is None or want is None or Path(spec.origin).resolve() != want:
        raise _fail(what, f"package {package!r} does not resolve to this project ({_PROJECT_ROOT})")


def _check_module(parts: list[str], what: str) -> None:
    """Each module on the way to ``parts`` not yet imported must be found at its project file before
    it runs (``models.encoders``, then ``models.encoders.base``), so no other file is ever executed."""
    for cut in range(2, len(parts) + 1):
        name, want = ".".join(parts[:cut]), _project_module_file(parts[:cut])
        if name in sys.modules:
            continue  # already loaded (its file is checked after the import)
        spec = importlib.util.find_spec(name)  # imports its parent, checked in the previous round
        if spec is None or spec.origin is None or want is None or Path(spec.origin).resolve() != want:
            raise _fail(what, f"module {name!r} does not resolve to this project ({want})")


def resolve_class_path(class_path: Any, expected: type, *, what: str) -> Any:
    """The class (or classmethod) ``class_path`` names, if it is a project class of kind ``expected``.

    Checked in this order, so that nothing a hostile path names is ever imported: the path is a
    dotted path of public identifiers; its first component is in :data:`PROJECT_PACKAGES`; its
    module is a source file of this checkout. Then that project module is imported and the named
    attribute must be a class *defined* in a project module (not one it imported), a subclass of
    ``expected``; a trailing ``.method`` must be a classmethod that a project class defines.

    Args:
        class_path: ``models.rvq.ResidualVQ`` or ``models.speech_lm.SpeechLM.load``.
        expected: The kind the caller accepts (a project base class, or ``torch.nn.Module``).
        what: Names the spec in error messages (artifact folder and module name).

    Returns:
        The class, or the bound classmethod.

    Raises:
        UnsafeArtifactError: On anything else, before any import of what the path names.
    """
    if not isinstance(class_path, str):
        raise _fail(what, f"class_path must be a string, got {type(class_path).__name__}")
    parts = class_path.split(".")
    if len(parts) < 2 or not all(_PUBLIC_NAME.fullmatch(p) and not keyword.iskeyword(p) for p in parts):
        raise _fail(what, f"class_path {class_path!r} is not a dotted path of public identifiers")
    if parts[0] not in PROJECT_PACKAGES:
        raise _fail(
            what,
            f"class_path {class_path!r} is outside this project: an artifact can only name classes of "
            f"{', '.join(p + '.*' for p in PROJECT_PACKAGES)} (loading never imports other code)",
        )
    _check_package_is_ours(parts[0], what)
    # The longest prefix that is a project source file is the module; one or two names follow it.
    for cut in range(len(parts) - 1, 0, -1):
        module_file = _project_module_file(parts[:cut])
        if module_file is not None:
            break
    else:
        raise _fail(what, f"class_path {class_path!r} names no module of this project")
    attrs = parts[cut:]
    if len(attrs) > 2:
        raise _fail(what, f"class_path {class_path!r}: expected module.Class or module.Class.classmethod")
    module_name = ".".join(parts[:cut])
    _check_module(parts[:cut], what)
    module = importlib.import_module(module_name)
    if getattr(module, "__file__", None) is None or Path(module.__file__).resolve() != module_file:
        raise _fail(what, f"module {module_name!r} was not loaded from this project ({module_file})")
    cls = vars(module).get(attrs[0])  # the module's namespace, no module-level __getattr__
    if not isinstance(cls, type) or cls.__module__.split(".")[0] not in PROJECT_PACKAGES:
        raise _fail(
            what, f"class_path {class_path!r}: {module_name}.{attrs[0]} is not a class defined in this project"
        )
    if not issubclass(cls, expected):
        raise _fail(
            what, f"class_path {class_path!r} is a {cls.__name__}, not a {expected.__module__}.{expected.__qualname__}"
        )
    if len(attrs) == 1:
        return cls
    owner = next((k for k in cls.__mro__ if attrs[1] in vars(k)), None)
    raw = vars(owner).get(attrs[1]) if owner is not None else None
    if not isinstance(raw, classmethod) or owner.__module__.split(".")[0] not in PROJECT_PACKAGES:
        raise _fail(what, f"class_path {class_path!r}: {attrs[1]!r} is not a classmethod of a project class")
    return getattr(cls, attrs[1])


def inside_artifact(root: Path, relative: Any, *, what: str) -> Path:
    """``root / relative``, refused unless it resolves (links followed) inside the artifact ``root``."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise _fail(what, f"{relative!r} must be a relative path inside the artifact folder")
    root = root.resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise _fail(what, f"{relative!r} leaves the artifact folder {root}")
    return target


def is_remote_checkpoint(ckpt_path: Any) -> bool:
    """A URL (``https://``, ``s3://``, ``hf://``...) or what Lightning downloads (``http`` prefix)."""
    path = str(ckpt_path) if isinstance(ckpt_path, (str, os.PathLike)) else ""
    return path.startswith("http") or "://" in path


def checkpoint_weights_only(ckpt_path: Any, weights_only: bool | None) -> bool | None:
    """The ``weights_only`` a ``Trainer.fit/validate/test/predict`` call should pass for ``ckpt_path``.

    Lightning unpickles a checkpoint fetched by URL with ``weights_only=False`` unless told
    otherwise, i.e. runs whatever the file's pickle names. A remote checkpoint gets ``True``; asking
    for ``False`` with one is refused. A local path keeps the caller's choice (torch >= 2.6 loads it
    with ``weights_only=True`` by default; this project's own checkpoints load that way).

    Raises:
        ValueError: ``weights_only=False`` with a remote checkpoint, or a torch older than 2.6
            (its ``weights_only=True`` loader is not safe, CVE-2025-32434).
    """
    if not is_remote_checkpoint(ckpt_path):
        return weights_only
    if weights_only is False:
        raise ValueError(
            f"refusing weights_only=False for the downloaded checkpoint {ckpt_path}: it would run any code "
            "its pickle names; download it, check it, and pass the local path"
        )
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        raise ValueError(f"loading a downloaded checkpoint needs torch >= 2.6 (have {torch.__version__})")
    return True
