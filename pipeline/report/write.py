"""Writing a report: report.json, report.md and report.html into a folder (local or s3://);
:func:`write_documents` writes every job's three files (the attack report's and the
analysis' too)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.io import storage
from pipeline.report.html import render_html
from pipeline.report.markdown import render_markdown
from pipeline.report.thumbnails import alert_thumbnails


@dataclass(frozen=True)
class WrittenReport:
    report: dict[str, Any]
    locations: tuple[str, ...]  # report.json, report.md, report.html


def write_report(report: dict[str, Any], out_dir: str, s3: storage.S3Options | None,
                 thumbnails: int = 24) -> WrittenReport:
    """Write report.json, report.md and report.html into ``out_dir`` (local or s3://)."""
    thumbs = alert_thumbnails(report, s3, thumbnails) if thumbnails > 0 else []
    return WrittenReport(report, write_documents(
        out_dir, "report", report, render_markdown(report), render_html(report, thumbs), s3))


def write_documents(out_dir: str, stem: str, document: dict[str, Any], markdown: str,
                    html: str, s3: storage.S3Options | None = None) -> tuple[str, ...]:
    """Write ``<stem>.json`` (sorted keys; NaN refused), ``<stem>.md`` and ``<stem>.html`` into
    ``out_dir`` (local or s3://), each atomically; their locations."""
    files = {
        f"{stem}.json": json.dumps(document, indent=2, sort_keys=True, allow_nan=False,
                                   default=_json_default) + "\n",
        f"{stem}.md": markdown,
        f"{stem}.html": html,
    }
    locations = []
    for name, text in files.items():
        at = storage.join(out_dir, name)
        storage.write_text_atomic(at, text, s3)
        locations.append(at)
    return tuple(locations)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"report.json: cannot encode {type(value).__name__}")
