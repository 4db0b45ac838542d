"""A billing period cut short by its account plan's end (a plan change, a cancellation) is
charged for the days the plan covers: the standing charge, the minimum spend and a prorated
counter; drawn at once when the end is known, settled again when it moves, and the bill run
gives back what was drawn beyond it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP
from decimal import Decimal as D
from typing import Any

import asyncpg
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.rating import bills
from app.rating.periods import billing_anchor, period_of
from app.rating.service import earliest_end
from app.settings import Settings
from tests.conftest import Api
from tests.procs import account_id, run_apps
from tests.test_account_plan_end import end_path
from tests.test_bill_overage import landed
from tests.test_rating_bills import measure_on, run_bills
from tests.test_rating_config import meter, plan
from tests.test_rating_counters_realtime import JULY, adjust, amounts, attach, counter
from tests.test_rating_drawdown import aggregation, price
from tests.webhook_receiver import eventually


async def _plan(api: Api, names: dict[str, str], standing: str, minimum: str = "0",
                licenses: str | None = None, price: str = "31") -> str:
    """A monthly plan; with `licenses`, the counter priced per unit at `price` a
    license-month, prorated by day (31: 1 a license-day in July)."""
    code = await plan(api, names["storage"], names["credit_type"], standing_charge=standing,
                      minimum_spend=minimum)
    if licenses is not None:
        await api.call("POST", "/v1/pricings", expect=201, json={
            "plan": code, "counter": licenses, "type": "per_unit", "counter_mode": "prorate",
            "bands": [{"up_to": None, "price": price}], "start_date": JULY})
    return code


async def test_a_plan_ending_within_a_period_is_charged_for_its_days(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "2000")
    licenses = await counter(api)
    code = await _plan(api, names, standing="31", minimum="620", licenses=licenses)
    # ten of July's 31 days: the standing charge is 10, drawn when attached
    attached = await attach(api, account, code, JULY, "2024-07-11")
    assert amounts(attached) == [D(10)]
    # 10 licenses from the 1st: 10 license-days a day for the 10 days the plan covers
    assert amounts(await adjust(api, account, licenses, "2024-07-01", 10)) == [D(100)]
    # (a level from a day past the plan's end changes nothing)
    assert (await adjust(api, account, licenses, "2024-07-20", 50))["debits"] == []
    [july] = (await api.call("GET", f"/v1/accounts/{account}/usage",
                             params={"at": "2024-07-05"}))["plans"]
    assert (july["period_start"], july["period_end"], july["covered_until"]) == (
        "2024-07-01", "2024-08-01", "2024-07-11")
    assert (D(july["standing_charge"]), D(july["minimum_spend"]), D(july["total"])) == (
        D(10), D(200), D(110))
    assert D(july["drawn"]) == 110
    assert D(await api.available(account)) == 2000 - 110

    # the bill: the minimum spend is the covered days' share too (620 x 10 / 31 = 200)
    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await api.call("GET", f"/v1/bills/{bill_id}")
    assert bill["covered_until"] == "2024-07-11" and bill["period_end"] == "2024-08-01"
    assert (D(bill["standing_charge"]), D(bill["subtotal"]), D(bill["minimum_spend"]),
            D(bill["minimum_spend_topup"]), bill["total"]) == (D(10), D(110), D(200), D(90),
                                                                "200.00")
    assert (bill["drawn"], bill["settled"]) == ("200.00", "90.00")
    assert D(await api.available(account)) == 2000 - 200
    payload = await db.fetchval("SELECT payload FROM webhook_events WHERE type = "
                                "'bill.finalized' AND payload->'data'->>'bill' = $1",
                                str(bill_id))
    assert '"covered_until": "2024-07-11"' in payload


async def test_the_bill_draws_the_period_total_rounded_once_not_each_charge_rounded(
        api: Api) -> None:
    """10 days of July at 10 a month, twice (standing charge and one license): each charge is
    3.2258…, drawn in real time as 3.23, but the period comes to 6.4516… = 6.45: the bill run
    gives the cent back from the larger charge, so what stays drawn is the bill's total."""
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "100")
    licenses = await counter(api)
    code = await _plan(api, names, standing="10", licenses=licenses, price="10")
    assert amounts(await attach(api, account, code, JULY, "2024-07-11")) == [D("3.23")]
    assert amounts(await adjust(api, account, licenses, JULY, 1)) == [D("3.23")]
    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await api.call("GET", f"/v1/bills/{bill_id}")
    assert (bill["total"], bill["drawn"], bill["settled"]) == ("6.45", "6.45", "-0.01")
    assert await _available_becomes(api, account, D("93.55")) == D("93.55")


async def test_a_period_the_plan_covers_whole_is_charged_whole(api: Api) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "2000")
    code = await _plan(api, names, standing="31", minimum="40")
    # ends on the period's own end: nothing is cut short
    assert amounts(await attach(api, account, code, JULY, "2024-08-01")) == [D(31)]
    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await api.call("GET", f"/v1/bills/{bill_id}")
    assert bill["covered_until"] == bill["period_end"] == "2024-08-01"
    assert (D(bill["standing_charge"]), D(bill["minimum_spend"]), bill["total"]) == (
        D(31), D(40), "40.00")


def _share(amount: D, period: tuple[date, date], until: date) -> D:
    """amount x covered days / period days, rounded once at 2 places (half up)."""
    days, whole = (until - period[0]).days, (period[1] - period[0]).days
    return (amount * days / whole).quantize(D("0.01"), rounding=ROUND_HALF_UP)


async def _available_becomes(api: Api, account: str, expected: D) -> D:
    """The account's available credit once it is `expected` or 5 s have passed (debits sent
    by a settlement travel through the journal's group commit behind the answer)."""
    deadline = time.monotonic() + 5.0
    while True:
        now = D(await api.available(account))
        if now == expected or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.05)


async def test_moving_the_end_settles_the_current_period_and_the_bill_gives_back_the_rest(
        api: Api, app: Any, db: asyncpg.Connection, settings: Settings) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    code = await _plan(api, names, standing="31")
    start = datetime.now(UTC).date() - timedelta(days=1)  # a period with room after tomorrow
    period = period_of(start, "monthly", 1, start)
    first_end = earliest_end(settings) + timedelta(days=1)
    attached = await attach(api, account, code, str(start), str(first_end))
    assert amounts(attached) == [_share(D(31), period, first_end)]

    # moved later: the current period is settled again at once, the difference drawn
    later = first_end + timedelta(days=5)
    await api.call("POST", end_path(account, attached["id"]), json={"end_date": str(later)})
    high = _share(D(31), period, later)
    assert await _available_becomes(api, account, 1000 - high) == 1000 - high
    [now] = (await api.call("GET", f"/v1/accounts/{account}/usage"))["plans"]
    assert now["covered_until"] == str(later) and D(now["standing_charge_drawn"]) == high

    # moved earlier: the cut-off days are given back at once
    end = earliest_end(settings)
    await api.call("POST", end_path(account, attached["id"]), json={"end_date": str(end)})
    low = _share(D(31), period, end)
    assert await _available_becomes(api, account, 1000 - low) == 1000 - low
    [now] = (await api.call("GET", f"/v1/accounts/{account}/usage"))["plans"]
    assert now["covered_until"] == str(end) and D(now["standing_charge_drawn"]) == low
    exact = D(31) * (end - start).days / (period[1] - start).days
    assert abs(D(now["standing_charge"]) - exact) < D("1e-30")  # (a quotient: 40 digits)

    # and back and forth again: each move draws or gives back once more (no uid used twice)
    for moved, expected in ((later, high), (end, low), (later, high), (end, low)):
        await api.call("POST", end_path(account, attached["id"]), json={"end_date": str(moved)})
        assert await _available_becomes(api, account, 1000 - expected) == 1000 - expected
    acct = await account_id(db, account)
    debits = await db.fetch("SELECT uid, amount FROM usage_events WHERE account_id = $1 "
                            "AND uid LIKE 's%' ORDER BY recorded_at", acct)
    assert len(debits) == 4 and len({d["uid"] for d in debits}) == 4
    credits = await db.fetch("SELECT uid, amount, settled_at FROM rated_credits "
                             "WHERE account_id = $1", acct)
    assert len(credits) == 3 and all(c["settled_at"] is not None for c in credits)
    assert sum(d["amount"] for d in debits) - sum(c["amount"] for c in credits) == low

    # the bill run (here for the period not yet over) finds it drawn right: nothing to settle
    outcome = await bills.run(app.state.ctx, period[1], [acct])
    [bill] = [await bills.bill(db, i) for i in outcome.bills]
    assert (bill.covered_until, D(bill.standing_charge).quantize(D("0.01"), ROUND_HALF_UP)) == (
        end, low)
    assert (bill.drawn, bill.settled) == (f"{low:f}", "0.00")
    assert D(await api.available(account)) == 1000 - low


async def test_a_counter_price_change_within_a_period_charges_each_price_for_its_days(
        api: Api) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "2000")
    licenses = await counter(api)
    code = await _plan(api, names, standing="0")
    for start, end, per_month in ((JULY, "2024-07-16", "31"), ("2024-07-16", None, "62")):
        await api.call("POST", "/v1/pricings", expect=201, json={
            "plan": code, "counter": licenses, "type": "per_unit", "counter_mode": "prorate",
            "bands": [{"up_to": None, "price": per_month}], "start_date": start,
            "end_date": end})
    await attach(api, account, code, JULY, "2024-08-01")
    # 10 licenses all month: 15 days at 1 a license-day, 16 at 2
    await adjust(api, account, licenses, JULY, 10)
    [july] = (await api.call("GET", f"/v1/accounts/{account}/usage",
                             params={"at": "2024-07-20"}))["plans"]
    assert sorted(D(line["amount"]) for line in july["pricings"]) == [D(150), D(320)]
    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await api.call("GET", f"/v1/bills/{bill_id}")
    assert (bill["total"], bill["drawn"]) == ("470.00", "470.00")
    assert D(await api.available(account)) == 2000 - 470


async def test_ending_a_plan_gives_back_its_counter_days_too(
        api: Api, settings: Settings) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "5000")
    licenses = await counter(api)
    code = await _plan(api, names, standing="0", licenses=licenses)
    start = datetime.now(UTC).date() - timedelta(days=1)
    period = period_of(start, "monthly", 1, start)
    attached = await attach(api, account, code, str(start), None)
    # 10 licenses from the start, priced 31 a license-month: 310 for the whole period
    assert amounts(await adjust(api, account, licenses, str(start), 10)) == [D(310)]
    end = earliest_end(settings)
    await api.call("POST", end_path(account, attached["id"]), json={"end_date": str(end)})
    kept = _share(D(310), period, end)
    assert await _available_becomes(api, account, 5000 - kept) == 5000 - kept
    [now] = (await api.call("GET", f"/v1/accounts/{account}/usage"))["plans"]
    assert D(now["drawn"]) == kept


async def test_ends_moved_back_and_forth_from_two_processes_leave_the_final_days_drawn(
        api: Api, db: asyncpg.Connection, settings: Settings, keys: dict[str, str]) -> None:
    """Each move settles the period under the account's row lock, whichever process takes it;
    whatever order they land in, what stays drawn is the share of the end that won."""
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    code = await _plan(api, names, standing="31")
    start = datetime.now(UTC).date() - timedelta(days=1)
    period = period_of(start, "monthly", 1, start)
    attached = await attach(api, account, code, str(start), None)
    ends = [earliest_end(settings) + timedelta(days=n) for n in (0, 4, 9)]
    async with run_apps(settings, 2) as apps:
        clients = [a.client() for a in apps]
        try:
            answers = await asyncio.gather(*(
                clients[i % 2].post(end_path(account, attached["id"]),
                                    json={"end_date": str(ends[i % 3])},
                                    headers={"Authorization": f"Bearer {keys['admin']}"})
                for i in range(12)))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
    assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers]
    final = date.fromisoformat((await api.call("GET", f"/v1/accounts/{account}/plans"))
                               ["data"][0]["end_date"])
    kept = _share(D(31), period, final)
    acct = await account_id(db, account)

    async def paid() -> bool:
        return not await db.fetchval("SELECT count(*) FROM rated_credits WHERE account_id = $1 "
                                     "AND settled_at IS NULL", acct)

    # (the processes keep a hot copy of their own: read the ledger, once the give-backs are paid)
    await eventually(paid, within=5.0)
    [balance] = (await api.call("GET", "/v1/balances", params={"account": account}))["data"]
    assert D(balance["remaining"]) == 1000 - kept
    debits = await db.fetch("SELECT uid, amount FROM usage_events WHERE account_id = $1 "
                            "AND uid LIKE 's%'", acct)
    credits = await db.fetch("SELECT amount FROM rated_credits WHERE account_id = $1", acct)
    assert sum(d["amount"] for d in debits) - sum(c["amount"] for c in credits) == kept
    [charge] = await db.fetch("SELECT drawn_minor FROM rated_charges WHERE account_id = $1", acct)
    assert D(charge["drawn_minor"]) / 100 == kept


ops = st.lists(st.one_of(
    st.tuples(st.just("level"), st.integers(0, 20), st.integers(0, 20)),
    st.tuples(st.just("end"), st.integers(0, 40)),
), min_size=1, max_size=8)


@hypothesis_settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=ops, billing=st.sampled_from(["anniversary", "calendar"]),
       credit=st.sampled_from([D(10000), D(40)]))
# a counter raised, the end cut short, the counter raised again within the cover, the end moved
# past the period and back: give-backs and draws of both charges in turn
@example(steps=[("level", 0, 5), ("end", 0), ("level", 10, 20), ("end", 40), ("end", 2)],
         billing="anniversary", credit=D(10000))
@example(steps=[("level", 0, 5), ("end", 0), ("level", 1, 20), ("end", 40)], billing="calendar",
         credit=D(40))
# the standing charge given back right after a counter's debit that owes (the give-back waits
# for that debit's ledger entries, so it reverses their overage before any credit)
@example(steps=[("level", 3, 3), ("end", 10)], billing="calendar", credit=D(40))
async def test_what_stays_drawn_is_the_bill_of_the_final_levels_and_end(
        steps: list[tuple[Any, ...]], billing: str, credit: D, api: Api, app: Any,
        db: asyncpg.Connection, settings: Settings) -> None:
    """Invariant 8 with a period cut short at either end: whatever the order of counter
    changes and end moves, the bill run finds the period drawn (after its own settling) at
    what a model of the final levels, start and end charges: 31 a month standing, 31 a
    license-month prorated. Calendar billing starts the plan within its first period (the
    month under way, a few days ago), anniversary billing 20 days ago. With little credit,
    credit covers the bill as far as it goes and the rest is its overage, though give-backs
    of one charge met another's overage on the way (they reverse overage first)."""
    names = await api.setup()
    account = names["account"]
    await api.grant(account, f"{credit:f}")
    licenses = await counter(api)
    code = await _plan(api, names, standing="31", licenses=licenses)
    today = datetime.now(UTC).date()
    # (calendar: after the 1st unless today is the 1st, so the first period is cut short)
    back = 20 if billing == "anniversary" else max(0, min(3, today.day - 2))
    start = today - timedelta(days=back)
    period = period_of(billing_anchor(billing, "monthly", start), "monthly", 1, start)
    attached = await api.call("POST", f"/v1/accounts/{account}/plans", expect=201, json={
        "plan": code, "start_date": str(start), "billing": billing})
    earliest = earliest_end(settings)
    levels: dict[date, int] = {}
    end: date | None = None
    for step in steps:
        if step[0] == "level":
            day = start + timedelta(days=step[1])
            await adjust(api, account, licenses, str(day), step[2])
            levels[day] = step[2]
        else:
            end = earliest + timedelta(days=step[1])
            await api.call("POST", end_path(account, attached["id"]),
                           json={"end_date": str(end)})
    until = period[1] if end is None else min(end, period[1])
    days = (period[1] - period[0]).days

    def level_on(day: date) -> int:
        known = [d for d in levels if d <= day]
        return levels[max(known)] if known else 0

    counted = sum(level_on(start + timedelta(days=i)) for i in range((until - start).days))
    model = (D(31) * (until - start).days + D(31) * counted) / days
    total = model.quantize(D("0.01"), rounding=ROUND_HALF_UP)

    acct = await account_id(db, account)
    outcome = await bills.run(app.state.ctx, period[1], [acct])
    [bill] = [await bills.bill(db, i) for i in outcome.bills]
    assert (bill.covered_from, bill.covered_until, bill.total) == (start, until, f"{total:f}")
    assert bill.drawn == f"{total:f}"
    if credit > total:
        assert await _available_becomes(api, account, credit - total) == credit - total
    # credit covers what it can, whatever gave back what in between: what the bill drew
    # beyond it is the overage, and none of the credit is left while any is owed
    split = await landed(api, int(bill.id))  # (the bill run's own debits, behind its answer)
    covered = min(credit, total)
    assert (D(split["covered"]), D(split["overage"])) == (covered, total - covered)
    assert await _available_becomes(api, account, credit - covered) == credit - covered


def test_calendar_billing_counts_periods_from_the_first_of_the_month_quarter_or_year() -> None:
    start = date(2024, 8, 17)
    assert billing_anchor("anniversary", "monthly", start) == start
    assert billing_anchor("calendar", "monthly", start) == date(2024, 8, 1)
    assert billing_anchor("calendar", "quarterly", start) == date(2024, 7, 1)
    assert billing_anchor("calendar", "quarterly", date(2024, 12, 31)) == date(2024, 10, 1)
    assert billing_anchor("calendar", "annual", start) == date(2024, 1, 1)
    assert billing_anchor("calendar", "daily", start) == start


async def test_calendar_billing_prorates_a_first_period_the_plan_starts_within(api: Api) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "2000")
    licenses = await counter(api)
    code = await _plan(api, names, standing="31", licenses=licenses)
    meter_code = await meter(api, names["storage"])
    await price(api, code, "per_unit", [(None, "1")], start_date=JULY,
                aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    refused = await api.call("POST", f"/v1/accounts/{account}/plans", expect=422, json={
        "plan": code, "start_date": "2024-07-16", "billing": "weekly"})
    assert refused["field"] == "billing"
    # from July 16th to August 20th, billed by calendar month: 16 days of July, 19 of August
    attached = await api.call("POST", f"/v1/accounts/{account}/plans", expect=201, json={
        "plan": code, "start_date": "2024-07-16", "end_date": "2024-08-20",
        "billing": "calendar"})
    assert attached["billing_anchor"] == JULY
    assert amounts(attached) == [D(16), D(19)]
    # 10 licenses from the 16th: a license-day is 1 in July and August alike (31 days each)
    assert amounts(await adjust(api, account, licenses, "2024-07-16", 10)) == [D(160), D(190)]
    # usage rates into the calendar month's aggregate: 5 GB at 1
    rated = await measure_on(api, account, meter_code, date(2024, 7, 20), gb=5)
    assert [d["amount"] for d in rated["debits"]] == ["5.00"]
    [july] = (await api.call("GET", f"/v1/accounts/{account}/usage",
                             params={"at": "2024-07-20"}))["plans"]
    assert (july["period_start"], july["covered_from"], july["covered_until"]) == (
        JULY, "2024-07-16", "2024-08-01")
    assert (D(july["standing_charge"]), D(july["total"]), D(july["drawn"])) == (
        D(16), D(181), D(181))
    made = (await run_bills(api, account, "2024-09-01"))["bills"]
    bills_ = [await api.call("GET", f"/v1/bills/{i}") for i in made]
    assert [(b["period_start"], b["covered_from"], b["covered_until"], b["total"], b["drawn"])
            for b in bills_] == [(JULY, "2024-07-16", "2024-08-01", "181.00", "181.00"),
                                 ("2024-08-01", "2024-08-01", "2024-08-20", "209.00", "209.00")]
    assert D(await api.available(account)) == 2000 - 181 - 209


async def test_anniversary_billing_is_the_default(api: Api) -> None:
    names = await api.setup()
    code = await _plan(api, names, standing="0")
    attached = await attach(api, names["account"], code, "2024-07-16", None)
    assert attached["billing_anchor"] == "2024-07-16"


async def test_a_plan_attached_again_may_not_share_a_billing_period_with_its_last_attachment(
        api: Api) -> None:
    """Usage rates into an aggregation state per pricing and period start: two attachments of
    one plan to an account with a period starting on the same day (the plan ended within a
    calendar month and attached again within it) would both bill that month's usage. Refused
    when attaching, and when an end would move into such a period."""
    names = await api.setup()
    account = names["account"]
    code = await _plan(api, names, standing="0")
    url = f"/v1/accounts/{account}/plans"
    await api.call("POST", url, expect=201, json={
        "plan": code, "start_date": JULY, "end_date": "2024-07-10", "billing": "calendar"})
    refused = await api.call("POST", url, expect=409, json={
        "plan": code, "start_date": "2024-07-10", "billing": "calendar"})
    assert refused["field"] == "start_date" and "2024-07-01" in refused["detail"]
    # from the next calendar period, or by anniversary (its periods start on the 10th): fine
    await api.call("POST", url, expect=201, json={
        "plan": code, "start_date": "2024-07-10", "end_date": "2024-07-20"})
    assert len((await api.call("GET", url))["data"]) == 2

    # a later pair: the first ends within one month, the second starts within the next
    today = datetime.now(UTC).date()
    next_month = period_of(today.replace(day=1), "monthly", 1, today)[1]
    month_after = period_of(next_month, "monthly", 1, next_month)[1]
    first = await api.call("POST", url, expect=201, json={
        "plan": code, "start_date": str(next_month),
        "end_date": str(next_month + timedelta(days=10)), "billing": "calendar"})
    await api.call("POST", url, expect=201, json={
        "plan": code, "start_date": str(month_after + timedelta(days=5)), "billing": "calendar"})
    refused = await api.call("POST", end_path(account, first["id"]), expect=409,
                             json={"end_date": str(month_after + timedelta(days=5))})
    assert refused["field"] == "end_date"
    moved = await api.call("POST", end_path(account, first["id"]),
                           json={"end_date": str(month_after)})
    assert moved["end_date"] == str(month_after)
