"""Logging for fhirtwin processes: plain text by default, one JSON object per line on request.

``$FHIRTWIN_LOG_FORMAT=json`` (what the Helm chart sets) makes every record one JSON
object: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, ``process`` and, for an
exception, ``exc_type`` and ``exc_where`` (file:line of each frame). ``$FHIRTWIN_LOG_LEVEL``
sets the level (default INFO).

No PHI: log calls in fhirtwin name records by reference (topic/partition/offset, MSH-10,
peer address), never by content. As a second line of defence the JSON formatter

- never writes an exception's message (a pydantic or parser error can quote the value it
  refused): only its type and where it was raised;
- replaces anything that looks like HL7 v2 segments (``PID|…``) or a FHIR resource
  (``"resourceType"``) in the message with ``[redacted]``;
- cuts messages at 500 characters.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["JsonFormatter", "configure", "scrub"]

_SEGMENT = re.compile(r"(?:\b[A-Z][A-Z0-9]{2}\|[^\r\n]*)")
_RESOURCE = re.compile(r"\{[^{}]*\"resourceType\".*", re.S)
_MAX = 500
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def scrub(text: str) -> str:
    """``text`` without HL7 v2 segments or FHIR JSON, at most 500 characters."""
    text = _SEGMENT.sub("[redacted]", text)
    text = _RESOURCE.sub("[redacted]", text)
    if len(text) > _MAX:
        text = text[:_MAX] + "…"
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            msg = str(record.msg)
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": scrub(msg),
            "process": record.process,
        }
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, _, tb = record.exc_info
            out["exc_type"] = exc_type.__name__
            where = []
            while tb is not None:
                code = tb.tb_frame.f_code
                where.append(f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}:{code.co_name}")
                tb = tb.tb_next
            out["exc_where"] = where[-8:]
        return orjson.dumps(out).decode()


def configure(level: int | str | None = None) -> None:
    """Set up the root logger on stderr, as ``$FHIRTWIN_LOG_FORMAT`` says (text or json).

    Called once per process by the commands that run a part of the pipeline; calling it
    again replaces the handler instead of adding a second one.
    """
    level = level or os.environ.get("FHIRTWIN_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("FHIRTWIN_LOG_FORMAT", "").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_fhirtwin", False):
            root.removeHandler(old)
    handler._fhirtwin = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
