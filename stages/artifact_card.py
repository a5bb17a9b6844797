"""An artifact's model card (``README.md``): what was promoted, its gates, metrics and provenance.

Written by :func:`stages.artifacts.promote` into every version folder. When gates were overridden on
purpose (``force_gates``), the card opens with a warning that lists each failed gate.
"""

from __future__ import annotations

from typing import Any

__all__ = ["gates_section", "model_card", "stage_dir_hint"]


def gates_section(gates: dict[str, Any]) -> tuple[str, str]:
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


def model_card(stage: str, version: int, metrics: dict[str, float], provenance: dict[str, Any]) -> str:
    """An artifact's ``README.md``: the gates (with a banner when overridden), metrics, provenance and how to load it."""
    banner, gates = gates_section(provenance.get("gates") or {})
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
    """Where ``current`` of ``stage`` is, as the model card spells it."""
    return f"artifacts/{stage}/current"
