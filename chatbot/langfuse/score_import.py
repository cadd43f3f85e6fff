"""Bring outcomes in from outside: scores made in Langfuse, and CSV/JSONL files.

``flywheel outcomes import --from-langfuse [--since …]`` calls
:func:`import_langfuse_scores`: it pages through ``GET /api/public/v3/scores``
for scores created by people (annotation queues) or evaluators (LLM-as-a-judge)
and stores each as an outcome event, so it can be a KPI term or a guardrail.
The score's session comes from the score itself (session scores), else from
its trace: a turn we traced (``turns.trace_id``), else the trace's root
observation in Langfuse. The idempotency key is ``langfuse:<score id>``, so a
second import adds nothing; a score edited in Langfuse after its import keeps
its first value here (the store is append-only).

``flywheel outcomes import FILE`` calls :func:`import_outcome_file` for a CSV
or JSONL file with the fields of ``POST /api/outcomes``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from optimizer.clock import as_utc
from optimizer.store import OutcomeRecord, Store, schema

if TYPE_CHECKING:
    from langfuse.api import LangfuseAPI

    from chatbot.langfuse.tracer import Tracer

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SOURCES", "ImportReport", "import_langfuse_scores", "import_outcome_file"]

#: Langfuse score sources imported by default: people and evaluators, not API clients (us).
DEFAULT_SOURCES = ("ANNOTATION", "EVAL")
_FIELDS = {"idempotency_key", "name", "value", "session_id", "user_id", "occurred_at", "source"}


@dataclass
class ImportReport:
    """Counts of one import; ``skipped`` maps a reason to how many rows it hit."""

    read: int = 0
    imported: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "imported": self.imported,
            "duplicates": self.duplicates,
            "skipped": dict(self.skipped),
            "errors": self.errors,
        }


# -- from Langfuse ------------------------------------------------------------
def import_langfuse_scores(
    store: Store,
    api: LangfuseAPI,
    *,
    since: datetime | None = None,
    sources: Sequence[str] = DEFAULT_SOURCES,
    page_size: int = 100,
) -> ImportReport:
    """Store Langfuse scores (numeric and boolean) as outcomes with ``source="langfuse"``.

    Raises the SDK's API errors when Langfuse cannot be read; scores stored
    before the error stay stored (a re-run skips them as duplicates).
    """
    if not 1 <= page_size <= 100:
        raise ValueError(f"page_size must be between 1 and 100, got {page_size}")
    from chatbot.langfuse.ids import SCORE_ID_PREFIX

    report = ImportReport()
    sessions = _SessionResolver(store, api)
    for score in _pages(api, since=since, sources=sources, page_size=page_size):
        report.read += 1
        if score.id.startswith(SCORE_ID_PREFIX):
            report.skipped["flywheel's own score"] += 1
            continue
        value = _numeric(score)
        if value is None:
            report.skipped[f"{score.data_type} value"] += 1
            continue
        session_id, user_id, trace_id = sessions.resolve(score)
        if session_id is None:
            report.skipped["no session"] += 1
            continue
        outcome = OutcomeRecord(
            idempotency_key=f"langfuse:{score.id}",
            name=score.name,
            value=value,
            session_id=session_id,
            user_id=user_id,
            occurred_at=as_utc(score.timestamp),
            source="langfuse",
            extra={
                k: v
                for k, v in {
                    "langfuse_score_id": score.id,
                    "langfuse_source": str(score.source),
                    "data_type": score.data_type,
                    "trace_id": trace_id,
                    "comment": score.comment,
                    "author_user_id": score.author_user_id,
                    "queue_id": score.queue_id,
                    "config_id": score.config_id,
                }.items()
                if v is not None
            },
        )
        if store.record_outcome(outcome):
            report.imported += 1
        else:
            report.duplicates += 1
    return report


def _pages(
    api: LangfuseAPI, *, since: datetime | None, sources: Sequence[str], page_size: int
) -> Iterator[Any]:
    cursor: str | None = None
    while True:
        page = api.scores.get_many(
            limit=page_size,
            cursor=cursor,
            fields="details,subject,annotation",
            source=",".join(s.upper() for s in sources) or None,
            from_timestamp=as_utc(since) if since is not None else None,
        )
        yield from page.data
        cursor = page.meta.cursor
        if not cursor or not page.data:
            return


def _numeric(score: Any) -> float | None:
    if score.data_type == "BOOLEAN":
        return 1.0 if score.value else 0.0
    if score.data_type == "NUMERIC" and math.isfinite(float(score.value)):
        return float(score.value)
    return None  # categorical, text and corrections are not KPI numbers


class _SessionResolver:
    """Session (and user) of a score: its subject, our turns, else Langfuse's observations."""

    def __init__(self, store: Store, api: LangfuseAPI) -> None:
        self.store = store
        self.api = api
        self._by_trace: dict[str, tuple[str | None, str | None]] = {}

    def resolve(self, score: Any) -> tuple[str | None, str | None, str | None]:
        subject = score.subject
        kind = getattr(subject, "kind", None)
        if kind == "session":
            return subject.id, None, None
        trace_id = subject.id if kind == "trace" else getattr(subject, "trace_id", None)
        if trace_id is None:
            return None, None, None
        if trace_id not in self._by_trace:
            self._by_trace[trace_id] = self._lookup(trace_id)
        session_id, user_id = self._by_trace[trace_id]
        return session_id, user_id, trace_id

    def _lookup(self, trace_id: str) -> tuple[str | None, str | None]:
        t = schema.turns
        with self.store.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.c.session_id, t.c.user_id).where(t.c.trace_id == trace_id).limit(1)
            ).first()
        if row is not None:
            return row.session_id, row.user_id
        page = self.api.observations.get_many(trace_id=trace_id, fields="core,basic", limit=50)
        for obs in page.data:
            if obs.session_id:
                return obs.session_id, obs.user_id
        return None, None


# -- from a file --------------------------------------------------------------
def import_outcome_file(
    store: Store, path: str | Path, *, tracer: Tracer | None = None, max_errors: int = 20
) -> ImportReport:
    """Store the outcomes of a CSV (header row) or JSONL file; invalid rows are reported.

    Fields: ``name`` and ``value`` (required), ``session_id`` and/or ``user_id``
    (one required), ``idempotency_key`` (default: a hash of the row, so an
    identical row counts once), ``occurred_at`` (ISO 8601, naive = UTC),
    ``source`` (default ``import``); any other field goes to ``extra``. Stored
    outcomes are mirrored to ``tracer`` when given.

    >>> import tempfile, pathlib
    >>> from optimizer.store import Store
    >>> store = Store("sqlite:///:memory:"); store.create_all()
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "o.csv"
    >>> _ = f.write_text("session_id,name,value\\ns1,conversion,1\\ns1,conversion,1\\n")
    >>> import_outcome_file(store, f).as_dict()["imported"]
    1
    """
    path = Path(path)
    report = ImportReport()
    for line, row in _rows(path):
        report.read += 1
        try:
            outcome = _outcome_from_row(row)
        except ValueError as exc:
            report.skipped["invalid row"] += 1
            if len(report.errors) < max_errors:
                report.errors.append(f"{path.name}:{line}: {exc}")
            continue
        if store.record_outcome(outcome):
            report.imported += 1
            if tracer is not None:
                tracer.score_outcome(outcome)
        else:
            report.duplicates += 1
    return report


def _rows(path: Path) -> Iterable[tuple[int, Mapping[str, Any]]]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as fh:
        if suffix == ".csv":
            for i, row in enumerate(csv.DictReader(fh), start=2):
                yield i, {k: v for k, v in row.items() if k and v not in (None, "")}
        elif suffix in (".jsonl", ".ndjson"):
            for i, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    obj = {"__error__": f"not valid JSON: {exc.msg}"}
                yield (
                    i,
                    obj
                    if isinstance(obj, dict)
                    else {"__error__": "each line must be a JSON object"},
                )
        else:
            raise ValueError(
                f"{path}: file must end in .csv, .jsonl or .ndjson, got {suffix or 'no suffix'!r}"
            )


def _outcome_from_row(row: Mapping[str, Any]) -> OutcomeRecord:
    if "__error__" in row:
        raise ValueError(row["__error__"])
    name = str(row.get("name", "")).strip()
    if not name or len(name) > 100:
        raise ValueError(f"name must be 1-100 characters, got {row.get('name')!r}")
    try:
        value = float(row["value"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"value must be a number, got {row.get('value')!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value}")
    session_id = _text(row.get("session_id"))
    user_id = _text(row.get("user_id"))
    if session_id is None and user_id is None:
        raise ValueError("needs a session_id or a user_id, got neither")
    occurred_at = None
    if row.get("occurred_at"):
        try:
            occurred_at = as_utc(
                datetime.fromisoformat(str(row["occurred_at"]).replace("Z", "+00:00"))
            )
        except ValueError:
            raise ValueError(f"occurred_at must be ISO 8601, got {row['occurred_at']!r}") from None
    key = _text(row.get("idempotency_key"))
    if key is None:
        canonical = json.dumps(
            [name, value, session_id, user_id, occurred_at and occurred_at.isoformat()]
        )
        key = "import:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]
    extra = {k: v for k, v in row.items() if k not in _FIELDS}
    return OutcomeRecord(
        idempotency_key=key,
        name=name,
        value=value,
        session_id=session_id,
        user_id=user_id,
        occurred_at=occurred_at,
        source=_text(row.get("source")) or "import",
        extra=extra,
    )


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None
