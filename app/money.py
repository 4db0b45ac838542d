"""Exact amounts. Decimal in Python, NUMERIC in Postgres, scaled integers in Redis.

Rounding happens in one place only: nowhere on the ledger path. An amount with more decimal
places than its credit type allows is rejected, never rounded.
"""

from __future__ import annotations

from decimal import Decimal

# Lua numbers are doubles: every scaled amount kept in Redis must stay an exact integer.
MAX_SCALED = 2**50


# the most decimal places any number in a request may have (app/schemas.py: Amount)
MAX_PLACES = 18


def exact_places(number: Decimal) -> int:
    """Decimal places a finite number needs (trailing zeros dropped), worked out from its
    digits and exponent alone: no context, so 1e-999999999 neither underflows nor raises."""
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    if not any(digits):
        return 0
    end = len(digits)
    while end > 1 and digits[end - 1] == 0:
        end -= 1
    return max(0, -(exponent + len(digits) - end))


class AmountError(ValueError):
    pass


def to_scaled(amount: Decimal, decimal_places: int) -> int:
    """Decimal credits -> integer minor units; rejects excess precision and oversize amounts."""
    if not amount.is_finite():
        raise AmountError("must be a finite number")
    if amount and amount.adjusted() >= 18:  # before any arithmetic: 1e999999999 overflows it
        raise AmountError("is too large")
    scaled = amount.scaleb(decimal_places)
    # (1e-999999999 scaled underflows to 0: a zero scaled from a non-zero amount)
    if scaled != scaled.to_integral_value() or (amount and not scaled):
        raise AmountError(f"has more than {decimal_places} decimal places")
    value = int(scaled)
    if abs(value) >= MAX_SCALED:
        raise AmountError("is too large")
    return value


def from_scaled(value: int, decimal_places: int) -> Decimal:
    return Decimal(value).scaleb(-decimal_places)


def fmt(amount: Decimal, decimal_places: int) -> str:
    """Render with exactly the credit type's decimal places (amounts are strings in JSON)."""
    return f"{amount.quantize(Decimal(1).scaleb(-decimal_places)):f}"


def scaled_text(value: int, decimal_places: int) -> str:
    """Minor units as an exact decimal with exactly `decimal_places` places ("-1234", 2 ->
    "-12.34"): for Postgres, and for answers (what fmt(from_scaled(..)) gives, without Decimal)."""
    if decimal_places == 0:
        return str(value)
    digits = str(abs(value)).rjust(decimal_places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-decimal_places]}.{digits[-decimal_places:]}"
