"""Amounts to minor units: exact or refused with AmountError, whatever the number's exponent."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from app.money import (
    MAX_SCALED,
    AmountError,
    exact_places,
    fmt,
    from_scaled,
    scaled_text,
    to_scaled,
)

# any finite decimal: a few digits under any exponent the Decimal type allows
DECIMALS = st.builds(
    lambda sign, digits, exponent: Decimal((sign, tuple(int(d) for d in str(digits)), exponent)),
    st.integers(0, 1), st.integers(0, 10**20), st.integers(-999_999_999, 999_999_999)
    | st.integers(-30, 30))


@given(DECIMALS, st.integers(0, 9))
def test_an_amount_is_scaled_exactly_or_refused(amount: Decimal, places: int) -> None:
    try:
        value = to_scaled(amount, places)
    except AmountError:
        # refused only when it is too precise for the credit type or out of range
        assert exact_places(amount) > places or amount.copy_abs() >= Decimal(MAX_SCALED).scaleb(
            -places)
        return
    assert from_scaled(value, places) == amount and abs(value) < MAX_SCALED


@given(DECIMALS)
def test_exact_places_are_the_places_of_the_number_without_trailing_zeros(
        amount: Decimal) -> None:
    places = exact_places(amount)
    text = f"{amount.normalize():f}" if abs(amount.adjusted()) < 20 else None
    if text is not None:  # small enough to write out: count its digits after the point
        assert places == (len(text.split(".")[1]) if "." in text else 0)
    assert places >= 0 and (places == 0 or -amount.as_tuple().exponent >= places)


@given(st.integers(-MAX_SCALED + 1, MAX_SCALED - 1) | st.integers(-1000, 1000), st.integers(0, 18))
def test_minor_units_are_written_with_exactly_the_credit_types_places(value: int,
                                                                       places: int) -> None:
    # what every answer shows of an amount kept in minor units (Redis, the journal)
    text = scaled_text(value, places)
    assert Decimal(text) == from_scaled(value, places)
    assert text == fmt(from_scaled(value, places), places)
    assert len(text.partition(".")[2]) == places
