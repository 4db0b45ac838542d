"""Currencies a purchase may be priced in, with Stripe's minor units and minimum charge.

Only currencies for which Stripe publishes a minimum charge amount are accepted: for any
other, the minimum is "the equivalent of USD 0.50" at the day's rate, which we cannot check
before Stripe does. Source: https://docs.stripe.com/currencies (minimum and maximum charge
amounts; zero-decimal currencies).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from app.errors import ValidationProblem
from app.money import fmt

# Stripe takes at most eight digits of minor units in one charge
MAX_MINOR = 99_999_999


@dataclass(frozen=True)
class Currency:
    code: str  # lowercase, as the Stripe API wants it
    exponent: int  # minor units per major unit = 10 ** exponent
    minimum: Decimal

    def minor_units(self, price: Decimal) -> int:
        """The exact amount Stripe charges; a price finer than the minor unit is refused, never
        rounded."""
        scaled = price.scaleb(self.exponent)
        if scaled != scaled.to_integral_value():
            raise ValidationProblem(
                f"{self.code.upper()} has {self.exponent} decimal places; "
                f"{price} cannot be charged exactly", field="price")
        minor = int(scaled)
        if price < self.minimum:
            raise ValidationProblem(
                f"below Stripe's minimum charge of {self.render(self.minimum)} "
                f"{self.code.upper()}", field="price")
        if minor > MAX_MINOR:
            raise ValidationProblem(
                f"above Stripe's maximum charge of {self.render_minor(MAX_MINOR)} "
                f"{self.code.upper()}", field="price")
        return minor

    def render(self, amount: Decimal) -> str:
        return fmt(amount, self.exponent)

    def render_minor(self, minor: int) -> str:
        """Minor units as the amount's text (usd 1050 -> "10.50")."""
        return self.render(Decimal(minor).scaleb(-self.exponent))


def _table(rows: str) -> dict[str, Currency]:
    table = {}
    for row in rows.split():
        code, exponent, minimum = row.split(":")
        table[code] = Currency(code, int(exponent), Decimal(minimum))
    return table


CURRENCIES = _table("""
    usd:2:0.50 aed:2:2.00 aud:2:0.50 bgn:2:1.00 brl:2:0.50 cad:2:0.50 chf:2:0.50 czk:2:15.00
    dkk:2:2.50 eur:2:0.50 gbp:2:0.30 hkd:2:4.00 huf:2:175.00 inr:2:0.50 jpy:0:50 mxn:2:10.00
    myr:2:2.00 nok:2:3.00 nzd:2:0.50 pln:2:2.00 ron:2:2.00 sek:2:3.00 sgd:2:0.50 thb:2:10.00
""")


def currency(code: str) -> Currency:
    found = CURRENCIES.get(code.lower())
    if found is None:
        raise ValidationProblem(
            f"unsupported currency {code!r}; supported: {', '.join(sorted(CURRENCIES))}",
            field="currency")
    return found
