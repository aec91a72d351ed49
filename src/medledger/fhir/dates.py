"""FHIR date, dateTime and instant values as millisecond ranges (UTC).

A FHIR date value has a precision: ``2020`` means the whole year, ``2020-05``
the month, ``2020-05-01T10:00:00Z`` one second and ``...:00.123Z`` one
millisecond. :func:`parse_range` returns the half-open interval
``[start_ms, end_ms)`` the value covers; :func:`to_ms` returns its start, the
single instant we index a record under. Values without a time zone (dates,
and dateTimes in search parameters) are read as UTC: FHIR leaves their zone
to the server, and a ledger shared between organisations needs one answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

__all__ = ["DateRange", "format_date", "format_instant", "parse_range", "to_ms"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

_RE = re.compile(
    r"""
    (?P<y>[0-9]{4})
    (?:-(?P<m>[0-9]{2})
      (?:-(?P<d>[0-9]{2})
        (?:T(?P<H>[0-9]{2}):(?P<M>[0-9]{2})
          (?::(?P<S>[0-9]{2})(?:\.(?P<f>[0-9]{1,9}))?)?
          (?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?
        )?
      )?
    )?
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class DateRange:
    """``[start, end)`` in ms since the epoch, and the precision of the value."""

    start: int
    end: int
    precision: str  # "year" | "month" | "day" | "minute" | "second" | "ms"


def _ms(dt: datetime) -> int:
    return (dt - _EPOCH) // _MS


def parse_range(value: str, *, lenient_time: bool = False) -> DateRange:
    """The interval a FHIR date/dateTime/instant covers.

    Raises ``ValueError`` for anything that is not a valid FHIR value. With
    ``lenient_time`` (search parameters) a time without seconds and a time
    without a zone (read as UTC) are accepted.
    """
    if not isinstance(value, str):
        raise ValueError("a date must be a string")
    m = _RE.fullmatch(value)
    if m is None:
        raise ValueError(f"not a FHIR date/dateTime: {value!r}")
    year = int(m["y"])
    if year < 1:
        raise ValueError(f"year out of range: {value!r}")
    if m["m"] is None:
        start = datetime(year, 1, 1, tzinfo=UTC)
        end = datetime(year + 1, 1, 1, tzinfo=UTC) if year < 9999 else None
        return _range(start, end, "year")
    month = int(m["m"])
    if not 1 <= month <= 12:
        raise ValueError(f"month out of range: {value!r}")
    if m["d"] is None:
        start = datetime(year, month, 1, tzinfo=UTC)
        nxt: datetime | None = None
        if month < 12:
            nxt = datetime(year, month + 1, 1, tzinfo=UTC)
        elif year < 9999:
            nxt = datetime(year + 1, 1, 1, tzinfo=UTC)
        return _range(start, nxt, "month")
    try:
        day = datetime(year, month, int(m["d"]), tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"invalid date {value!r}: {exc}") from None
    if m["H"] is None:
        return _range(day, day + timedelta(days=1), "day")
    hour, minute = int(m["H"]), int(m["M"])
    if hour > 23 or minute > 59:
        raise ValueError(f"time out of range: {value!r}")
    if m["S"] is None and not lenient_time:
        raise ValueError(f"a dateTime with a time needs seconds: {value!r}")
    if m["tz"] is None and not lenient_time:
        raise ValueError(f"a dateTime with a time needs a time zone: {value!r}")
    second = int(m["S"] or 0)
    if second > 60:  # 60: leap second
        raise ValueError(f"seconds out of range: {value!r}")
    tz = UTC
    if m["tz"] not in (None, "Z"):
        sign = 1 if m["tz"][0] == "+" else -1
        oh, om = int(m["tz"][1:3]), int(m["tz"][4:6])
        if oh > 14 or om > 59:
            raise ValueError(f"time zone out of range: {value!r}")
        tz = timezone(sign * timedelta(hours=oh, minutes=om))
    frac = m["f"]
    micro = int((frac or "0")[:6].ljust(6, "0"))
    start = datetime(year, month, day.day, hour, minute, tzinfo=tz) + timedelta(
        seconds=second, microseconds=micro
    )
    if m["S"] is None:
        return _range(start, start + timedelta(minutes=1), "minute")
    if frac is None:
        return _range(start, start + timedelta(seconds=1), "second")
    # sub-second precision: the last digit given, but never finer than 1 ms
    step = timedelta(microseconds=max(1000, 10 ** max(0, 6 - len(frac))))
    s_ms = _ms(start)
    return DateRange(s_ms, max(s_ms + 1, _ms(start + step)), "ms")


def _range(start: datetime, end: datetime | None, precision: str) -> DateRange:
    s = _ms(start)
    e = _ms(end) if end is not None else _ms(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)) + 1000
    return DateRange(s, e, precision)


def to_ms(value: str) -> int:
    """The first millisecond a FHIR date/dateTime/instant covers (UTC)."""
    return parse_range(value).start


def format_instant(ms: int) -> str:
    """``ms`` since the epoch as a FHIR instant with millisecond precision, in UTC."""
    dt = _EPOCH + timedelta(milliseconds=ms)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
        f"{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


def format_date(ms: int) -> str:
    """The UTC calendar date of ``ms`` as a FHIR date."""
    dt = _EPOCH + timedelta(milliseconds=ms)
    return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
