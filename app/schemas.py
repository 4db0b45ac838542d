"""Shared pydantic building blocks: codes, strict bodies, pages, amounts."""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
)
from pydantic import (
    Strict as NoCoercion,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from app.errors import ValidationProblem
from app.money import MAX_PLACES

CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
Code = Annotated[str, StringConstraints(pattern=CODE_PATTERN)]


def uid_pattern(longest: int) -> str:
    """A client's own id for something (a usage uid, a payment reference): 1 to `longest` of
    A-Z a-z 0-9 _ . : -, starting with a letter or digit."""
    return rf"^[A-Za-z0-9][A-Za-z0-9_.:\-]{{0,{longest - 1}}}$"


UID_PATTERN = uid_pattern(128)
Uid = Annotated[str, StringConstraints(pattern=UID_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Email = Annotated[str, StringConstraints(pattern=r"^[^@\s]{1,64}@[^@\s]{1,255}$")]
Description = Annotated[str, StringConstraints(max_length=1000)]


def _plain_zero(value: Decimal) -> Decimal:
    return value if value else Decimal(0)  # 0E+999999999 is a zero without the exponent


def _whole_number(value: object) -> object:
    # JSON has one number type: 26306.0 is the integer 26306 (as JSON Schema's "integer" says);
    # bodies parse it as a Decimal
    number = Decimal(value) if isinstance(value, float) and math.isfinite(value) else value
    if isinstance(number, Decimal) and number.is_finite() and number.adjusted() < 19 \
            and number == number.to_integral_value():
        return int(number)
    return value


# An integer in a body: a JSON integer, or a number with no fraction ("5" and true are not).
Integer = Annotated[int, BeforeValidator(_whole_number), NoCoercion()]


# A decimal written as a JSON string: ASCII digits, an optional point and exponent ("12.50",
# "1e3"). Python's Decimal would also read " 1 ", "1_000" and digits of other scripts (fullwidth ones, say).
DECIMAL_TEXT = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_DECIMAL_TEXT = re.compile(DECIMAL_TEXT)


def is_decimal_text(text: str) -> bool:
    return _DECIMAL_TEXT.match(text) is not None


def _decimal_text(value: object) -> object:
    if isinstance(value, str) and not is_decimal_text(value):
        raise PydanticCustomError(
            "decimal_parsing", "Input should be a decimal number: a JSON number or a string "
            "of ASCII digits with an optional point and exponent, such as \"12.50\"")
    return value


class _DocumentedText:
    """The JSON schema says what `_decimal_text` takes: the string branch gets its pattern."""

    def __get_pydantic_json_schema__(self, core: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core)
        for branch in schema.get("anyOf", []):
            if branch.get("type") == "string":
                branch["pattern"] = DECIMAL_TEXT
        return schema


# An amount, price or rate in a request: exact, finite, and few enough digits that no
# arithmetic on it leaves the Decimal context or Postgres's numeric (1e999999999 was a 500,
# 1e-999999999 a grant of 0). A credit type's own places and range are checked after.
Amount = Annotated[Decimal, Field(max_digits=MAX_PLACES * 2, decimal_places=MAX_PLACES,
                                  allow_inf_nan=False),
                   BeforeValidator(_decimal_text), AfterValidator(_plain_zero),
                   _DocumentedText()]


_RFC3339_START = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d")


def _text(value: object) -> object:
    # a number (or a string of digits) would pass as Unix time, seconds or milliseconds as
    # pydantic guesses
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339_START.match(value)):
        return value
    raise ValueError("must be an RFC 3339 timestamp, e.g. 2026-01-01T00:00:00Z")


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp needs a UTC offset (RFC 3339), e.g. 2026-01-01T00:00:00Z")
    try:
        value = value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is in year 0 in UTC
        raise ValueError(OUT_OF_SPAN) from None
    if not EARLIEST <= value < END_OF_TIME:
        raise ValueError(OUT_OF_SPAN)
    return value


# The span of every timestamp a request may name (the dates of plans and grants share it):
# what the hot state's epoch milliseconds and every period computed from it can hold; a
# grant expiring at 9999-12-31T23:59:59.999999Z was taken by Redis, then its ledger row could
# not be written.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
END_OF_TIME = datetime(3000, 1, 1, tzinfo=UTC)
OUT_OF_SPAN = "must be from 2000-01-01T00:00:00Z to before 3000-01-01T00:00:00Z"


class _Span:
    """The JSON schema states the span a time or date must lie in, with the keywords that
    validators of `format` (ajv-formats, for one) check: JSON Schema's own bounds are for
    numbers only."""

    def __init__(self, **bounds: str) -> None:
        self.bounds = bounds

    def __get_pydantic_json_schema__(self, core: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core)
        schema.update(self.bounds)
        return schema


def _z(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


Timestamp = Annotated[datetime, BeforeValidator(_text), AfterValidator(_aware),
                      _Span(formatMinimum=_z(EARLIEST), formatExclusiveMaximum=_z(END_OF_TIME))]
# a calendar day (a plan's, a pricing's, a recurring grant's), in the same span
FIRST_DAY, LAST_DAY = EARLIEST.date(), END_OF_TIME.date() - timedelta(days=1)
Day = Annotated[date, Field(ge=FIRST_DAY, le=LAST_DAY),
                _Span(formatMinimum=FIRST_DAY.isoformat(), formatMaximum=LAST_DAY.isoformat())]
T = TypeVar("T")


class Strict(BaseModel):
    """A request body: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = Field(description="pass as `cursor` to get the next page")


class ListQuery(Strict):
    cursor: str | None = None
    limit: int = Field(default=50, ge=1, le=500)

    def after_id(self) -> int:
        return decode_cursor(self.cursor)


class BadCursor(ValidationProblem):
    def __init__(self) -> None:
        super().__init__("not a cursor this API returned", field="query.cursor")


def encode_cursor_text(text: str) -> str:
    """An opaque cursor carrying `text` (a list's position, and what a page needs from the
    pages before it)."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor_text(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadCursor() from exc


EPOCH, US = datetime(1970, 1, 1, tzinfo=UTC), timedelta(microseconds=1)


def time_cursor(at: datetime, uid: str) -> str:
    """A cursor past a row of a list ordered by a time, then a uid (newest first, say)."""
    return encode_cursor_text(f"{(at - EPOCH) // US}|{uid}")


def next_time_cursor(rows: Sequence[Any], limit: int, time_field: str) -> str | None:
    """The cursor past a full page's last row (records: its time in `time_field`, then its
    uid); None when the page is not full."""
    if len(rows) < limit or not rows:
        return None
    return time_cursor(rows[-1][time_field], rows[-1]["uid"])


def decode_time_cursor(cursor: str) -> tuple[datetime, str]:
    micros, sep, uid = decode_cursor_text(cursor).partition("|")
    if not sep or not uid or not micros.lstrip("-").isdigit():
        raise BadCursor()
    try:
        return EPOCH + int(micros) * US, uid
    except OverflowError as exc:  # beyond datetime's years: no row's
        raise BadCursor() from exc


def encode_cursor(last_id: int) -> str:
    return encode_cursor_text(str(last_id))


def cursor_id(text: str) -> int:
    """A row id carried in a cursor: a bigint (a larger one is no row's, and Postgres would
    refuse it rather than find nothing)."""
    try:
        value = int(text)
    except ValueError as exc:
        raise BadCursor() from exc
    if not 0 <= value < 2**63:
        raise BadCursor()
    return value


def decode_cursor(cursor: str | None) -> int:
    return cursor_id(decode_cursor_text(cursor)) if cursor else 0


def next_cursor(ids: list[int], limit: int) -> str | None:
    return encode_cursor(ids[-1]) if len(ids) == limit else None
