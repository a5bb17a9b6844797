"""``speechless-init``'s first step: split a corpus into train / val / test and prepare it into shards.

A manifest's own ``split`` column is kept (``dev``, ``validation`` and ``valid`` are read as ``val``);
a manifest without one is split speaker-disjoint when it has at least 3 speakers, else by a ``session``
column with at least 3 sessions, else by utterance (:func:`assign_splits`). The split manifest is
prepared with :func:`datamodules.prepare.prepare`, the same code and options as ``speechless-prepare``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any

from datamodules.manifests import PrepareError, read_manifest
from datamodules.prepare import build_parser, prepare
from datamodules.report import print_summary
from datamodules.shards import atomic_write_text

__all__ = ["SPLITS", "InitError", "assign_splits", "prepare_corpus", "split_manifest"]

SPLITS = ("train", "val", "test")
VAL_ALIASES = ("val", "validation", "dev", "valid")
UNSET = "_init_unassigned"  # the split of manifest rows without one (a legal split name nobody uses)


class InitError(Exception):
    """A problem with the corpus or the options that stops ``speechless-init`` (exit status 2)."""


# ---- splits -----------------------------------------------------------------------------------


def assign_splits(
    rows: list[dict[str, Any]], *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], str]:
    """Train / val / test for rows without a split: by speaker, else session, else utterance.

    Held-out sets should be new voices, as a user measures the model on people it never heard: with at
    least 3 distinct speakers (``unknown`` does not count) whole speakers are held out; with fewer, whole
    recording sessions (a ``session`` field) when there are at least 3; else single utterances, in which
    case val/test share speakers with training (said in the summary). Each held-out split gets
    ``max(1, round(fraction x groups))`` groups, drawn with ``seed``; train keeps at least one group.

    Args:
        rows: ``{"key", "speaker", "session" (optional)}`` per utterance.
        val_fraction, test_fraction: share of groups held out for validation and test.
        seed: the draw's seed.

    Returns:
        ``(split per row, how)``; ``how`` is ``"speaker"``, ``"session"`` or ``"utterance"``.

    Raises:
        InitError: fewer than 3 utterances, or fractions that leave nothing to train on.
    """
    if len(rows) < 3:
        raise InitError(
            f"the corpus has {len(rows)} usable utterance(s); train, val and test need at least 3"
        )
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InitError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in (0, 1) "
                        "and sum to less than 1")  # fmt: skip
    speakers = {r.get("speaker") for r in rows} - {None, "", "unknown"}
    sessions = {r.get("session") for r in rows} - {None, ""}
    if len(speakers) >= 3:
        how, group = "speaker", [str(r.get("speaker")) for r in rows]
    elif len(sessions) >= 3:
        how, group = "session", [str(r.get("session")) for r in rows]
    else:
        how, group = "utterance", [str(r["key"]) for r in rows]
    names = sorted(set(group))
    random.Random(seed).shuffle(names)
    n_test = max(1, round(test_fraction * len(names)))
    n_val = max(1, round(val_fraction * len(names)))
    if n_test + n_val >= len(names):
        n_test, n_val = 1, 1
    role = {g: "test" for g in names[:n_test]} | {g: "val" for g in names[n_test : n_test + n_val]}
    return [role.get(g, "train") for g in group], how


def split_manifest(args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    """The user's manifest with a train/val/test split per row, as ``<out>/raw/manifest.jsonl``.

    Read with :func:`datamodules.manifests.read_manifest` (the same reader, columns and defaults as
    ``speechless-prepare``); audio paths are written absolute. Rows the reader marks bad are left out
    and reported (they have no usable audio path or field).

    Returns:
        ``(manifest path, facts)``; ``facts`` says how the split was made and lists the bad rows.
    """
    columns = {
        f: getattr(args, f"{f}_column") for f in ("audio", "text", "speaker", "language", "id", "split")
    }
    defaults = {"split": UNSET, "language": args.language, "speaker": args.speaker or "unknown"}
    items = read_manifest(args.manifest, columns=columns, defaults=defaults, require_text=args.require_text)
    bad = [f"{it.source}: {it.error[1]}" for it in items if it.error is not None]
    good = [it for it in items if it.error is None]
    if not good:
        raise InitError(f"manifest {args.manifest} has no usable row ({len(bad)} bad: {bad[:3]})")
    given = {it.split for it in good}
    if given == {UNSET}:
        rows = [{"key": it.key, "speaker": it.speaker, "session": it.extra.get("session")} for it in good]
        splits, how = assign_splits(rows, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                    seed=args.seed)  # fmt: skip
    elif UNSET in given:
        missing = [it.source for it in good if it.split == UNSET]
        raise InitError(f"manifest {args.manifest}: {len(missing)} row(s) have no split while others do "
                        f"(e.g. {missing[0]}): give every row a split, or none (init then splits the corpus)")  # fmt: skip
    else:
        alias = {name: "val" for name in VAL_ALIASES}
        splits, how = [alias.get(it.split, it.split) for it in good], "manifest"
        if "train" not in splits or "val" not in splits:
            raise InitError(f"manifest {args.manifest} has splits {sorted(given)}: init needs 'train' and "
                            f"'val' (or {', '.join(VAL_ALIASES[1:])}); 'test' is optional")  # fmt: skip
    lines = []
    for it, split in zip(good, splits, strict=True):
        row = {**it.extra, "id": it.key, "audio": os.path.abspath(it.audio), "text": it.text or "",
               "speaker": it.speaker, "language": it.language, "split": split}  # fmt: skip
        if it.sample_rate:
            row["sample_rate"] = it.sample_rate
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    path = out / "raw" / "manifest.jsonl"
    atomic_write_text(path, "".join(lines))
    counts = {s: splits.count(s) for s in sorted(set(splits))}
    return path, {"split_by": how, "rows": counts, "bad_rows": bad}


def prepare_corpus(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Split (manifests) and prepare the corpus into ``<out>/shards``; returns facts for the summary.

    Raises:
        InitError: a bad manifest, a preparation usage error, or splits that leave train/val empty.
    """
    keys = {a.dest for a in build_parser()._actions if a.dest != "help"}
    kwargs = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    kwargs["split"] = "train"  # a one-split Hugging Face dataset's name; manifests get theirs from init
    facts: dict[str, Any] = {}
    try:
        if args.manifest:
            manifest, facts = split_manifest(args, out)
            columns = {f"{f}_column": f for f in ("audio", "text", "speaker", "language", "id", "split")}
            kwargs.update(manifest=str(manifest), hf_dataset=None, **columns)
        summary = prepare(**{**kwargs, "out": out / "shards", "language": args.language})
    except PrepareError as err:
        raise InitError(str(err)) from err
    print_summary(summary)
    folders = {name: name for name in summary.splits if summary.splits[name]["samples"]}
    for alias in VAL_ALIASES[1:]:  # a Hugging Face dataset's "validation" split serves as val
        if "val" not in folders and alias in folders:
            folders["val"] = folders.pop(alias)
    if "train" not in folders or "val" not in folders:
        hint = (
            "; a dataset needs a train and a validation split (--hf-split train,validation), or export it to "
            "a manifest, which init splits by speaker"
        )
        raise InitError(
            f"after preparation the corpus has splits {sorted(folders)} with samples: init needs train and val "
            f"(see prepare_summary.json for skipped inputs){hint if args.hf_dataset else ''}"
        )
    if "test" not in folders:
        folders["test"] = folders["val"]
        facts["note"] = "no test split: the held-out test commands use the val split"
    facts.update(folders=folders, skipped=dict(summary.skipped), prepare_exit=summary.exit_code)
    return facts
