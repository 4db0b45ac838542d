"""Pure rating functions: expressions, aggregation, quantities and pricing types."""

from __future__ import annotations

from datetime import date
from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.rating.expressions import ExpressionError, evaluate, fields, parse
from app.rating.pricing import (
    AggState,
    Band,
    aggregate,
    charge,
    check_bands,
    counter_charge,
    counter_levels,
    price,
    quantity,
    to_minor,
)

STORAGE = [Band(D(100), D("0.50")), Band(None, D("0.40"))]


def test_expression_reads_fields_and_keeps_precedence() -> None:
    node = parse("(seconds + 1) * 2 / files - -1")
    assert fields(node) == {"seconds", "files"}
    assert evaluate(node, {"seconds": D(29), "files": D(4)}) == D(16)


def test_division_by_zero_makes_the_derived_field_absent() -> None:
    assert evaluate(parse("seconds / files"), {"seconds": D(29), "files": D(0)}) is None


@pytest.mark.parametrize("text", ["", "1 +", "(a", "a b", "2**3", "__import__('os')", "a.b",
                                  "x" * 501, "(" * 40 + "1" + ")" * 40, "1e5", "a ^ 2"])
def test_bad_expressions_are_refused(text: str) -> None:
    with pytest.raises(ExpressionError):
        parse(text)


def test_tiered_prices_each_band_at_its_own_rate() -> None:
    assert price("tiered", STORAGE, D(70)) == D("35.00")
    assert price("tiered", STORAGE, D(150)) == D(50) + D(20)


def test_volume_prices_every_unit_at_the_band_reached() -> None:
    assert price("volume", STORAGE, D(150)) == D(60)
    assert price("volume", STORAGE, D(100)) == D(50)


def test_stair_step_charges_the_amount_of_the_band_reached() -> None:
    steps = [Band(D(10), D(5)), Band(D(20), D(8)), Band(None, D(12))]
    assert [price("stair_step", steps, D(q)) for q in (0, 1, 10, D("10.5"), 99)] == \
        [0, 5, 5, 8, 12]


def test_fixed_fee_only_with_usage() -> None:
    per_unit = [Band(None, D("0.1"))]
    assert charge("per_unit", per_unit, D(3), D(0), used=False) == 0
    assert charge("per_unit", per_unit, D(3), D(5), used=True) == D("3.5")


def test_bands_must_ascend_and_end_open() -> None:
    assert check_bands([Band(D(10), D(1)), Band(D(5), D(1)), Band(None, D(1))])
    assert check_bands([Band(D(10), D(1))])
    assert check_bands([Band(None, D(1)), Band(None, D(1))])
    assert check_bands(STORAGE) is None


def test_aggregations_and_rounding() -> None:
    state = AggState()
    for i, value in enumerate([D(5), D(2), D(9)]):
        state.add(value, f"{1000 - i:015d}:x", new_unique=i < 2)
    assert [aggregate(f, state) for f in ("SUM", "COUNT", "MIN", "MAX", "LATEST", "UNIQUE")] == \
        [16, 3, 2, 9, 5, 2]
    assert aggregate("MEAN", state) == D("5." + "3" * 39)  # PRECISION significant digits
    assert quantity(D(16), D(5), "up") == 4 and quantity(D(16), D(5), "down") == 3
    assert quantity(D("17.5"), D(5), "nearest") == 4 and quantity(D(16), D(5), "none") == D("3.2")


def test_counter_prorated_by_day_and_at_peak() -> None:
    levels = [(date(2024, 7, 1), D(10)), (date(2024, 7, 16), D(20)), (date(2024, 7, 26), D(5))]
    spans = counter_levels(levels, date(2024, 7, 1), date(2024, 8, 1))
    assert spans == [(D(10), 15), (D(20), 10), (D(5), 6)]
    per_unit = [Band(None, D(31))]
    assert counter_charge("per_unit", per_unit, D(0), spans, 31, "prorate") == \
        10 * 15 + 20 * 10 + 5 * 6
    assert counter_charge("per_unit", per_unit, D(0), spans, 31, "peak") == 20 * 31


def test_long_levels_and_prices_are_priced_without_rounding() -> None:
    """The longest a level and a price may be (30 digits each) multiply exactly (at the peak);
    only the proration's quotient has a precision, PRECISION (40) significant digits."""
    level, unit = D("123456789012345678.123456789012"), D("987654321098765432.987654321098")
    spans = [(level, 31)]
    exact = D("121932631137021794566377074494610576.619620178764585886175176")
    assert counter_charge("per_unit", [Band(None, unit)], D(0), spans, 31, "peak") == exact
    assert counter_charge("per_unit", [Band(None, unit)], D(0), spans, 31, "prorate") == \
        D("121932631137021794566377074494610576.6196")  # exact, to 40 digits


def test_round_once_half_up() -> None:
    assert to_minor(D("1.005"), 2) == 101 and to_minor(D("0.004"), 2) == 0


amounts = st.decimals(min_value=0, max_value=10_000, places=3, allow_nan=False)


@given(st.lists(amounts, max_size=30), st.sampled_from(["tiered", "volume", "stair_step"]))
def test_rounded_deltas_add_up_to_the_rounded_total(values: list[D], kind: str) -> None:
    """Carrying the cumulative charge: the debits add up to round(charge of the final state)."""
    state, drawn_minor, debits = AggState(), 0, 0
    for i, value in enumerate(values):
        state.add(value, f"{i:015d}", new_unique=True)
        after = to_minor(price(kind, STORAGE, aggregate("SUM", state)), 2)
        debits += after - drawn_minor
        drawn_minor = after
    assert debits == to_minor(price(kind, STORAGE, sum(values, D(0))), 2)
