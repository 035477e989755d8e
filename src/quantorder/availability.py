"""Variants a quantization method cannot make ("n/a: reason"), and the artifacts only they need.

Every quantize@X records the method's `unsupported_variants()` in its output. A stage whose every
user variant is unsupported, or whose input is itself n/a, writes an n/a marker dir instead of a
model (its provenance file with the reason, nothing else); evaluate@V writes `na` instead of numbers.
"""

from __future__ import annotations

from pathlib import Path

from quantorder.io import atomic_dir, read_json, write_json
from quantorder.layout import PROVENANCE_FILE
from quantorder.variants import users


def _record(path: Path) -> dict:
    file = path / PROVENANCE_FILE
    return read_json(file) if file.is_file() else {}


def na_reason(inputs: list[Path], wanted_by: list[str], unsupported: dict[str, str] | None = None) -> str | None:
    """Why what a stage would make from `inputs` for the variants `wanted_by` cannot be made, or None:
    an input is n/a, or the method (`unsupported`, or as recorded by the quantize stage that made
    an input) supports none of those variants."""
    records = [_record(path) for path in inputs]
    if reasons := [r["na"] for r in records if "na" in r]:
        return reasons[0]
    unsupported = dict(unsupported or {})
    for r in records:
        unsupported |= r.get("unsupported_variants") or {}
    if wanted_by and all(v in unsupported for v in wanted_by):
        return "; ".join(dict.fromkeys(unsupported[v] for v in wanted_by))
    return None


def mark_na(out_dir: Path, inputs: list[Path], unsupported: dict[str, str] | None = None, **record) -> str | None:
    """If artifact `out_dir` cannot be made (see na_reason), write its n/a marker and return the reason."""
    reason = na_reason(inputs, users(out_dir), unsupported)
    if reason:
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / PROVENANCE_FILE, {"na": reason, **record})
    return reason
