"""``speechless-merge-codebooks``: Ichigo's merge of two promoted WhisperVQ artifacts into one book.

Checkpoint surgery on promoted stage-1 artifacts (safetensors + ``config.json``, :mod:`stages.artifacts`),
never on training pickles: the new artifact keeps every weight and setting of ``--new`` and grows its
book by the real codes of ``--old`` (:func:`models.whisper_vq.merge_codebooks`): with Ichigo's books,
2048 codes and the mask code (2048) first, then the 512 earlier codes at 2049..2560, 2561 in all.
The result is promoted (ungated: it was never validated) under ``--out`` as
``<out>/stage1/v<N>`` with both artifacts as parents; its ``info.codebook_size`` is the merged size,
which stage 2 and stage 3 then need.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from models.whisper_vq import WhisperVQ, merge_codebooks
from stages.artifacts import ArtifactModule, load_artifact, parent_record, promote

__all__ = ["main", "merge_artifacts"]


def merge_artifacts(new: str, old: str, out: str) -> dict[str, Any]:
    """Merge the books of two WhisperVQ stage-1 artifacts into a new artifact under ``out``.

    Returns:
        ``{"artifact": path, "codebook_size": K, "mask_code": m, "old_offset": first index of the old codes}``.

    Raises:
        ValueError: The quantizers differ in code dimension or model width.
    """
    a = load_artifact(new, names=["quantizer", "encoder"], expect={"quantizer": WhisperVQ, "encoder": "models.encoders.base.FrozenEncoder"})
    b = load_artifact(old, names=["quantizer"], expect={"quantizer": WhisperVQ})
    qa, qb = a["modules"]["quantizer"], b["modules"]["quantizer"]
    if (qa.codebook_dim, qa.dim) != (qb.codebook_dim, qb.dim):
        raise ValueError(f"cannot merge {new} (codebook_dim {qa.codebook_dim}, dim {qa.dim}) with {old} "
                         f"(codebook_dim {qb.codebook_dim}, dim {qb.dim}): the books must share their spaces")
    state, size = merge_codebooks(qa.state_dict(), qb.state_dict(), old_mask_code=qb.mask_code, fresh_count=qa.fresh_count)
    entries = a["config"]["modules"]
    spec = entries["quantizer"]
    modules = {"quantizer": ArtifactModule(spec["class_path"], {**spec["init_args"], "codebook_size": size,
                                                                "mask_code": qa.mask_code}, state)}  # fmt: skip
    if "encoder" in entries:
        modules["encoder"] = ArtifactModule(entries["encoder"]["class_path"], entries["encoder"]["init_args"])
    info = {**a["config"].get("info", {}), "codebook_size": size, "mask_code": qa.mask_code,
            "merged": {"new_codes": qa.codebook_size, "old_codes": size - qa.codebook_size, "old_offset": qa.codebook_size}}
    result = promote(stage="stage1", modules=modules, metrics={}, artifacts_dir=out, info=info,
                     provenance={"merged_from": {"new": parent_record(a), "old": parent_record(b)},
                                 "parents": [parent_record(a), parent_record(b)]})  # fmt: skip
    return {"artifact": str(result.path), "codebook_size": size, "mask_code": qa.mask_code, "old_offset": qa.codebook_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="speechless-merge-codebooks",
        description="Merge two promoted WhisperVQ stage-1 artifacts: --new's codes and mask code first, then "
                    "--old's codes (Ichigo: 2048 + mask + 512 = 2561).",
    )  # fmt: skip
    parser.add_argument("--new", required=True, help="stage-1 artifact whose weights and first codes are kept")
    parser.add_argument("--old", required=True, help="stage-1 artifact whose real codes are appended")
    parser.add_argument("--out", required=True, help="artifacts root: writes <out>/stage1/v<N> and <out>/stage1/current")
    args = parser.parse_args(argv)
    try:
        result = merge_artifacts(args.new, args.old, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"speechless-merge-codebooks: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
