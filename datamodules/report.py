"""What ``speechless-prepare`` reports: the summary of a run, its skipped inputs, its exit status.

Nothing is dropped silently: every input is either kept or skipped with one reason, the first that
applies in this order: ``bad_manifest_row``, ``missing_text``, ``missing_file`` (no such path, or a
link to nothing), ``not_a_file`` (a directory, device, fifo or socket, or a link to one: never
opened, so a link to ``/dev/zero`` is not read), ``unreadable``, ``empty`` (zero bytes or zero
samples), ``non_finite``, ``silent``, ``too_short``. Warnings on kept inputs are counted the same way:
``rate_mismatch`` (the file header's rate is used; the manifest's claim is kept in the sample's json
as ``manifest_sample_rate``), ``clipped`` (resampling overshoot beyond full scale), ``split_long``,
``duplicate_key`` (a repeated id or stem gets ``_1``, ``_2``, ... in input order). The summary is
printed (:func:`print_summary`) and written to ``<out>/prepare_summary.json``; every skipped input is
listed in ``<out>/prepare_skipped.tsv`` (:func:`write_report`).

Exit status: 0 when every input was kept, 3 when any input was skipped, 2 for usage errors.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.shards import atomic_write_text

__all__ = [
    "EXIT_OK",
    "EXIT_SKIPPED",
    "EXIT_USAGE",
    "SKIPPED_NAME",
    "SUMMARY_NAME",
    "PrepareSummary",
    "print_summary",
    "progress_bar",
    "skipped_row",
    "write_report",
]

EXIT_OK, EXIT_USAGE, EXIT_SKIPPED = 0, 2, 3
SUMMARY_NAME = "prepare_summary.json"
SKIPPED_NAME = "prepare_skipped.tsv"
MAX_EXAMPLES = 5


@dataclass
class PrepareSummary:
    """What a run kept and skipped; ``to_json()`` is what ``prepare_summary.json`` holds.

    ``inputs == kept + sum(skipped.values())`` always; ``samples >= kept`` (long recordings give
    several samples). ``splits`` maps a split to ``{"inputs", "kept", "samples", "seconds", "shards"}``.
    Examples are up to five ``{"source", "detail"}`` per reason.
    """

    out: str
    inputs: int = 0
    kept: int = 0
    samples: int = 0
    seconds: float = 0.0
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    warning_examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_SKIPPED if sum(self.skipped.values()) else EXIT_OK

    def skip(self, reason: str, source: str, detail: str) -> None:
        """Count an input skipped for ``reason``."""
        self._count(self.skipped, self.skipped_examples, reason, source, detail)

    def warn(self, reason: str, source: str, detail: str) -> None:
        """Count a warning on a kept input."""
        self._count(self.warnings, self.warning_examples, reason, source, detail)

    def _count(self, counts: dict, examples: dict, reason: str, source: str, detail: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        shown = examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append({"source": source, "detail": detail})

    def to_json(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "inputs": self.inputs,
            "kept": self.kept,
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
            "splits": self.splits,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": dict(sorted(self.skipped_examples.items())),
            "warnings": dict(sorted(self.warnings.items())),
            "warning_examples": dict(sorted(self.warning_examples.items())),
        }


def skipped_row(source: str, reason: str, detail: str) -> str:
    """One line of ``prepare_skipped.tsv`` (tabs and newlines inside a field become spaces)."""
    clean = [s.replace("\t", " ").replace("\n", " ") for s in (source, reason, detail)]
    return "\t".join(clean) + "\n"


def write_report(out: Path, summary: PrepareSummary, skipped_rows: list[str]) -> None:
    """Write ``prepare_skipped.tsv`` (rows from :func:`skipped_row`) and ``prepare_summary.json``."""
    atomic_write_text(out / SKIPPED_NAME, "source\treason\tdetail\n" + "".join(skipped_rows))
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary.to_json(), indent=1, ensure_ascii=False) + "\n")


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar on stderr (a no-op one when not ``enabled``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)


def print_summary(summary: PrepareSummary, *, file: Any = None) -> None:
    """Print the kept/skipped/warning tables of a run."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=120)
    kept = Table(title=f"speechless-prepare -> {summary.out}")
    for name in ("split", "inputs", "kept", "samples", "hours", "shards"):
        kept.add_column(name, justify="left" if name == "split" else "right")
    for name, s in summary.splits.items():
        kept.add_row(
            name,
            str(s["inputs"]),
            str(s["kept"]),
            str(s["samples"]),
            f"{s['seconds'] / 3600:.3f}",
            str(s["shards"]),
        )
    kept.add_row(
        "all",
        str(summary.inputs),
        str(summary.kept),
        str(summary.samples),
        f"{summary.seconds / 3600:.3f}",
        "",
    )
    console.print(kept)
    for title, counts, examples in (
        ("skipped", summary.skipped, summary.skipped_examples),
        ("warnings (kept)", summary.warnings, summary.warning_examples),
    ):
        if not counts:
            continue
        table = Table(title=title)
        for name in ("reason", "count", "examples"):
            table.add_column(name)
        for reason, count in sorted(counts.items()):
            shown = "\n".join(e["source"] for e in examples.get(reason, []))
            table.add_row(reason, str(count), shown)
        console.print(table)
