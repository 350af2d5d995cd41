"""HL7 v2 primitive values → FHIR primitive values (pure functions).

Each converter takes the text of one v2 component and returns the FHIR value,
or raises ``ValueError`` with a message that says what is wrong; the mapping
engine adds where (segment, field, component) and what to do.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "to_boolean",
    "to_date",
    "to_datetime",
    "to_decimal",
    "to_instant",
    "to_integer",
    "to_time",
    "utc_offset",
]

_DTM = re.compile(
    r"(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<f>\d{1,4}))?(?P<tz>[+-]\d{4}|Z)?\Z"
)
_TM = re.compile(
    r"(?P<h>\d{2})(?P<mi>\d{2})?(?P<s>\d{2})?(?:\.(?P<f>\d{1,4}))?(?P<tz>[+-]\d{4})?\Z"
)
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)\Z")


def _offset_text(tz: str) -> str:
    return "Z" if tz == "Z" else f"{tz[:3]}:{tz[3:]}"


def utc_offset(zone: str, when: datetime) -> str:
    """The '+hh:mm' offset of an IANA time zone at a given local time."""
    try:
        tzinfo = _zone(zone)
    except ZoneInfoNotFoundError:
        raise ValueError(f"time zone {zone!r} is not an IANA time zone name") from None
    off = when.replace(tzinfo=tzinfo).utcoffset() or timedelta(0)
    minutes = int(off.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _check_date(y: int, mo: int, d: int, text: str) -> None:
    try:
        date(y, mo, d)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid date") from None


def to_date(text: str) -> str:
    """DT/DTM → FHIR date (YYYY, YYYY-MM or YYYY-MM-DD); time and zone are dropped."""
    m = _DTM.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a v2 date (expected YYYY[MM[DD]])")
    y, mo, d = m["y"], m["mo"], m["d"]
    if mo is None:
        return y
    if not 1 <= int(mo) <= 12:
        raise ValueError(f"{text!r} is not a valid date (month {mo})")
    if d is None:
        return f"{y}-{mo}"
    _check_date(int(y), int(mo), int(d), text)
    return f"{y}-{mo}-{d}"


_DATETIMES: dict[tuple[str, str | None], tuple[str, bool]] = {}
_DATETIMES_MAX = 8192


def to_datetime(text: str, default_offset: str | None) -> tuple[str, bool]:
    """DTM/TS → FHIR dateTime. Returns (value, used_default_offset).

    FHIR forbids a time without an offset: the value's own offset wins, else
    ``default_offset`` ('+hh:mm', or an IANA zone name prefixed 'tz:'); with
    neither, ValueError.

    Memoized (a pure function; the same times recur in every segment of a message and
    across a feed's messages). Only results are kept, so a bad value raises every time.
    The memo is emptied when full (a bound, not an LRU).
    """
    key = (text, default_offset)
    got = _DATETIMES.get(key)
    if got is not None:
        return got
    got = _to_datetime(text, default_offset)
    if len(_DATETIMES) >= _DATETIMES_MAX:
        _DATETIMES.clear()
    _DATETIMES[key] = got
    return got


def _to_datetime(text: str, default_offset: str | None) -> tuple[str, bool]:
    m = _DTM.match(text.strip())
    if not m:
        raise ValueError(
            f"{text!r} is not a v2 date/time (expected YYYY[MM[DD[HH[MM[SS]]]]][+ZZZZ])"
        )
    y, mo, d, h = m["y"], m["mo"], m["d"], m["h"]
    if mo is None:
        return y, False
    if not 1 <= int(mo) <= 12:
        raise ValueError(f"{text!r} is not a valid date (month {mo})")
    if d is None:
        return f"{y}-{mo}", False
    _check_date(int(y), int(mo), int(d), text)
    if h is None:
        return f"{y}-{mo}-{d}", False
    mi = m["mi"] or "00"
    s = m["s"] or "00"
    if int(h) > 23 or int(mi) > 59 or int(s) > 59:
        raise ValueError(f"{text!r} is not a valid time of day")
    frac = f".{m['f']}" if m["f"] else ""
    tz = m["tz"]
    used_default = False
    if tz:
        if tz != "Z" and (int(tz[1:3]) > 14 or int(tz[3:5]) > 59):
            raise ValueError(f"{text!r} has an impossible UTC offset {tz}")
        off = _offset_text(tz)
    elif default_offset:
        used_default = True
        if default_offset.startswith("tz:"):
            local = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s))
            off = utc_offset(default_offset[3:], local)
        else:
            off = default_offset
    else:
        raise ValueError(f"{text!r} has a time but no UTC offset")
    return f"{y}-{mo}-{d}T{h}:{mi}:{s}{frac}{off}", used_default


def to_instant(text: str, default_offset: str | None) -> tuple[str, bool]:
    """DTM → FHIR instant (needs seconds and offset: a bare date is refused)."""
    value, used = to_datetime(text, default_offset)
    if "T" not in value:
        raise ValueError(f"{text!r} is not precise enough for an instant (needs a time)")
    return value, used


def to_time(text: str) -> str:
    """TM → FHIR time (hh:mm:ss); a zone, if sent, is dropped (FHIR time has none)."""
    m = _TM.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a v2 time (expected HH[MM[SS[.S]]])")
    h, mi, s = m["h"], m["mi"] or "00", m["s"] or "00"
    if int(h) > 23 or int(mi) > 59 or int(s) > 59:
        raise ValueError(f"{text!r} is not a valid time of day")
    frac = f".{m['f']}" if m["f"] else ""
    return f"{h}:{mi}:{s}{frac}"


def to_decimal(text: str) -> int | float | Decimal:
    """NM → a JSON number, keeping integers integral."""
    t = text.strip()
    if not _DECIMAL.match(t):
        raise ValueError(f"{text!r} is not a number")
    if "." not in t:
        return int(t)
    try:
        d = Decimal(t)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    return float(d)


def to_integer(text: str) -> int:
    """NM/SI → integer."""
    t = text.strip()
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


_TRUE = frozenset({"Y", "YES", "T", "TRUE", "1"})
_FALSE = frozenset({"N", "NO", "F", "FALSE", "0"})


def to_boolean(text: str) -> bool:
    """ID (table 0136 Y/N) → boolean."""
    t = text.strip().upper()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a yes/no value (table 0136: Y or N)")
