"""SQL of the rating domain: configuration, measurements and aggregation state."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg

from app.config.catalog import CreditTypeRef
from app.db import Conn, Connection, Where
from app.errors import ValidationProblem

METER = """SELECT m.*, p.code AS product FROM meters m LEFT JOIN products p ON p.id = m.product_id"""
AGGREGATION = """SELECT g.*, m.code AS meter FROM aggregations g JOIN meters m ON m.id = g.meter_id"""
COUNTER = """SELECT c.*, p.code AS product FROM counters c LEFT JOIN products p ON p.id = c.product_id"""
TEMPLATE = """SELECT t.*, p.code AS product, ct.code AS currency FROM plan_templates t
              JOIN products p ON p.id = t.product_id JOIN credit_types ct ON ct.id = t.currency_id"""
PLAN = """SELECT pl.id, pl.code, pl.name, pl.created_at, t.code AS template,
                 COALESCE(pl.standing_charge, t.standing_charge) AS standing_charge,
                 COALESCE(pl.minimum_spend, t.minimum_spend) AS minimum_spend,
                 t.bill_frequency, t.bill_interval, t.currency_id, cur.code AS currency,
                 cur.decimal_places AS currency_places, p.code AS product
          FROM plans pl JOIN plan_templates t ON t.id = pl.template_id
          JOIN products p ON p.id = t.product_id JOIN credit_types cur ON cur.id = t.currency_id"""
PRICING = """SELECT pr.*, pl.code AS plan, g.code AS aggregation, c.code AS counter
             FROM pricings pr JOIN plans pl ON pl.id = pr.plan_id
             LEFT JOIN aggregations g ON g.id = pr.aggregation_id
             LEFT JOIN counters c ON c.id = pr.counter_id"""
_WITH_AGGREGATION = PRICING.replace("SELECT pr.*,", "SELECT pr.*, g2.*,")
# a plan as read (and attached): with its included credits, [{...}] as JSON text
PLAN_CREDITS = PLAN.replace("SELECT pl.id,", """SELECT (
    SELECT coalesce(json_agg(json_build_object(
             'id', pc.id, 'credit_type', ct.code, 'credit_type_id', ct.id,
             'amount', pc.amount::text, 'products', pc.product_codes, 'priority', pc.priority,
             'description', pc.description, 'rollover_percent', pc.rollover_percent::text,
             'rollover_max', pc.rollover_max::text) ORDER BY pc.id), '[]')
    FROM plan_credits pc JOIN credit_types ct ON ct.id = pc.credit_type_id
    WHERE pc.plan_id = pl.id) AS credits, pl.id,""")
TABLES = {"meters": METER, "aggregations": AGGREGATION, "counters": COUNTER,
          "plan_templates": TEMPLATE, "plans": PLAN_CREDITS}
ALIAS = {"meters": "m", "aggregations": "g", "counters": "c", "plan_templates": "t", "plans": "pl"}


async def by_code(conn: Conn, table: str, code: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"{TABLES[table]} WHERE {ALIAS[table]}.code = $1", code)


async def page(conn: Conn, table: str, after_id: int, limit: int) -> list[asyncpg.Record]:
    alias = ALIAS[table]
    return await conn.fetch(f"{TABLES[table]} WHERE {alias}.id > $1 ORDER BY {alias}.id LIMIT $2",
                            after_id, limit)


async def id_of(conn: Conn, table: str, code: str) -> int | None:
    assert table in ("products", "credit_types", "accounts", *TABLES)
    found = await conn.fetchval(f"SELECT id FROM {table} WHERE code = $1", code)
    return int(found) if found is not None else None


async def insert_meter(conn: Conn, code: str, name: str, product_id: int | None,
                       data_fields: list[dict[str, str]], derived: list[dict[str, str]]) -> None:
    await conn.execute(
        """INSERT INTO meters (code, name, product_id, data_fields, derived_fields)
           VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)""",
        code, name, product_id, json.dumps(data_fields), json.dumps(derived))


async def insert_aggregation(conn: Conn, values: dict[str, Any]) -> None:
    await conn.execute(
        """INSERT INTO aggregations (code, name, meter_id, target_field, function,
                                     quantity_per_unit, rounding, segment_field)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        values["code"], values["name"], values["meter_id"], values["target_field"],
        values["function"], values["quantity_per_unit"], values["rounding"],
        values["segment_field"])


async def insert_counter(conn: Conn, code: str, name: str, unit: str,
                         product_id: int | None) -> None:
    await conn.execute("INSERT INTO counters (code, name, unit, product_id) VALUES ($1, $2, $3, $4)",
                       code, name, unit, product_id)


async def insert_template(conn: Conn, v: dict[str, Any]) -> None:
    await conn.execute(
        """INSERT INTO plan_templates (code, name, product_id, bill_frequency, bill_interval,
                                       currency_id, standing_charge, minimum_spend)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        v["code"], v["name"], v["product_id"], v["bill_frequency"], v["bill_interval"],
        v["currency_id"], v["standing_charge"], v["minimum_spend"])


async def insert_plan(conn: Conn, code: str, name: str, template_id: int,
                      standing: Decimal | None, minimum: Decimal | None) -> int:
    return int(await conn.fetchval(
        """INSERT INTO plans (code, name, template_id, standing_charge, minimum_spend)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""", code, name, template_id, standing,
        minimum))


async def insert_plan_credits(conn: Conn, plan_id: int, rows: list[tuple[Any, ...]]) -> None:
    """A plan's included credits: (credit_type_id, amount, products, priority, description,
    rollover_percent, rollover_max) each."""
    await conn.executemany(
        """INSERT INTO plan_credits (plan_id, credit_type_id, amount, product_codes, priority,
                                     description, rollover_percent, rollover_max)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""", [(plan_id, *row) for row in rows])


async def lock_plan(conn: Connection, plan_id: int) -> None:
    await conn.execute("SELECT 1 FROM plans WHERE id = $1 FOR UPDATE", plan_id)


async def overlapping_pricing(conn: Conn, plan_id: int, aggregation_id: int | None,
                              counter_id: int | None, start: date, end: date | None,
                              other_than: int = 0) -> bool:
    """Whether another pricing of the plan for this aggregation or counter (not `other_than`)
    overlaps [start, end); one ended on its start date (cancelled) overlaps nothing."""
    found = await conn.fetchval(
        """SELECT 1 FROM pricings WHERE plan_id = $1 AND id <> $6
             AND aggregation_id IS NOT DISTINCT FROM $2 AND counter_id IS NOT DISTINCT FROM $3
             AND start_date < COALESCE($5::date, 'infinity'::date)
             AND COALESCE(end_date, 'infinity'::date) > $4
             AND start_date < COALESCE(end_date, 'infinity'::date) LIMIT 1""",
        plan_id, aggregation_id, counter_id, start, end, other_than)
    return found is not None


async def set_pricing_end(conn: Conn, pricing_id: int, end: date) -> None:
    await conn.execute("UPDATE pricings SET end_date = $2 WHERE id = $1", pricing_id, end)


async def insert_pricing(conn: Conn, v: dict[str, Any]) -> int:
    pricing_id: int = await conn.fetchval(
        """INSERT INTO pricings (plan_id, aggregation_id, counter_id, start_date, end_date,
                                 pricing_type, bands, fixed_fee, counter_mode)
           VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9) RETURNING id""",
        v["plan_id"], v["aggregation_id"], v["counter_id"], v["start_date"], v["end_date"],
        v["pricing_type"], v["bands"], v["fixed_fee"], v["counter_mode"])
    return pricing_id


async def pricing(conn: Conn, pricing_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(PRICING + " WHERE pr.id = $1", pricing_id)


async def pricings_of_plan(conn: Conn, plan_id: int, after_id: int,
                           limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(PRICING + " WHERE pr.plan_id = $1 AND pr.id > $2 ORDER BY pr.id LIMIT $3",
                            plan_id, after_id, limit)


async def lock_account(conn: Connection, account_id: int) -> None:
    await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id)


async def overlapping_account_plan(conn: Conn, account_id: int, product: str, start: date,
                                   end: date | None, other_than: int = 0) -> bool:
    """Whether another plan of the account for this product (not `other_than`) overlaps
    [start, end); a plan ended on its start date (cancelled) overlaps nothing."""
    found = await conn.fetchval(
        f"""SELECT 1 FROM account_plans ap JOIN ({PLAN}) pl ON pl.id = ap.plan_id
            WHERE ap.account_id = $1 AND pl.product = $2 AND ap.id <> $5
              AND ap.start_date < COALESCE($4::date, 'infinity'::date)
              AND COALESCE(ap.end_date, 'infinity'::date) > $3
              AND ap.start_date < COALESCE(ap.end_date, 'infinity'::date) LIMIT 1""",
        account_id, product, start, end, other_than)
    return found is not None


async def plan_attachments(conn: Conn, account_id: int, plan_id: int) -> list[asyncpg.Record]:
    """The account's attachments of one plan that apply (not cancelled), with the plan's
    billing frequency and interval."""
    return await conn.fetch(
        """SELECT ap.id, ap.start_date, ap.end_date, ap.billing_anchor, t.bill_frequency,
                  t.bill_interval
           FROM account_plans ap JOIN plans pl ON pl.id = ap.plan_id
           JOIN plan_templates t ON t.id = pl.template_id
           WHERE ap.account_id = $1 AND ap.plan_id = $2
             AND (ap.end_date IS NULL OR ap.end_date > ap.start_date)""", account_id, plan_id)


async def account_plan_of(conn: Conn, account_id: int, account_plan_id: int
                          ) -> asyncpg.Record | None:
    """One of the account's plans, as `account_plans` lists it, with its plan's product (None:
    not the account's)."""
    return await conn.fetchrow(
        f"""SELECT ap.*, a.code AS account, pl.code AS plan, pl.product
            FROM account_plans ap JOIN accounts a ON a.id = ap.account_id
            JOIN ({PLAN}) pl ON pl.id = ap.plan_id
            WHERE ap.account_id = $1 AND ap.id = $2""", account_id, account_plan_id)


async def set_account_plan_end(conn: Conn, account_plan_id: int, end: date) -> None:
    await conn.execute("UPDATE account_plans SET end_date = $2 WHERE id = $1",
                       account_plan_id, end)


async def insert_account_plan(conn: Conn, account_id: int, plan_id: int, start: date,
                              end: date | None, anchor: date) -> int:
    ap_id: int = await conn.fetchval(
        """INSERT INTO account_plans (account_id, plan_id, start_date, end_date, billing_anchor)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""", account_id, plan_id, start, end, anchor)
    return ap_id


async def account_plans(conn: Conn, account_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT ap.*, a.code AS account, pl.code AS plan FROM account_plans ap
           JOIN accounts a ON a.id = ap.account_id JOIN plans pl ON pl.id = ap.plan_id
           WHERE ap.account_id = $1 ORDER BY ap.start_date, ap.id""", account_id)


async def upsert_counter_level(conn: Conn, account_id: int, counter_id: int, effective: date,
                               level: Decimal) -> None:
    await conn.execute(
        """INSERT INTO counter_adjustments (account_id, counter_id, effective, level)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (account_id, counter_id, effective) DO UPDATE SET level = EXCLUDED.level""",
        account_id, counter_id, effective, level)


async def counter_levels(conn: Conn, account_id: int, counter_id: int) -> list[tuple[date, Decimal]]:
    rows = await conn.fetch(
        """SELECT effective, level FROM counter_adjustments WHERE account_id = $1
           AND counter_id = $2 ORDER BY effective""", account_id, counter_id)
    return [(r["effective"], Decimal(r["level"])) for r in rows]


async def upsert_rate(conn: Conn, credit_type_id: int, fiat_id: int, effective: date,
                      rate: Decimal) -> None:
    await conn.execute(
        """INSERT INTO conversion_rates (credit_type_id, fiat_id, effective, rate)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (credit_type_id, fiat_id, effective) DO UPDATE SET rate = EXCLUDED.rate""",
        credit_type_id, fiat_id, effective, rate)


async def rate_on(conn: Conn, credit_type_id: int, fiat_id: int, day: date) -> Decimal | None:
    found = await conn.fetchval(
        """SELECT rate FROM conversion_rates WHERE credit_type_id = $1 AND fiat_id = $2
           AND effective <= $3 ORDER BY effective DESC LIMIT 1""", credit_type_id, fiat_id, day)
    return Decimal(found) if found is not None else None


async def factor_on(conn: Conn, currency_id: int, credit_type: CreditTypeRef, day: date,
                    account_code: str) -> tuple[Decimal, bool]:
    """(rate, multiply) from a plan's currency to an account's credit type on a day: multiply
    when the rate is "1 unit of the plan's currency = rate credits", divide when credits are
    priced in the plan's currency. A 422 on `account` when neither rate exists."""
    if currency_id == credit_type.id:
        return Decimal(1), True
    rate = await rate_on(conn, credit_type.id, currency_id, day)
    if rate is not None:  # prices in fiat, balance in credits worth `rate` fiat each
        return rate, False
    rate = await rate_on(conn, currency_id, credit_type.id, day)
    if rate is None:
        raise ValidationProblem(f"no conversion rate between the plan's currency and credit "
                                f"type {credit_type.code!r} of account {account_code!r} on "
                                f"{day}", field="account")
    return rate, True


# --- measurements, aggregation state and rated charges (real-time drawdown) -----------------

async def meter_by_code(conn: Conn, code: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT id, data_fields, derived_fields FROM meters WHERE code = $1",
                               code)


async def active_pricings_many(conn: Conn, keys: list[tuple[int, int, date]]
                               ) -> tuple[dict[tuple[int, int, date], list[asyncpg.Record]], int]:
    """The pricings that rate each (account, meter, day) of a batch, and the
    rating_config_version they were read at, in one query (one snapshot: a pricing or account
    plan is among them exactly when its `visible_from` is at most that version; migration
    016). Each pricing's `visible_from` is the later of its own version and its account
    plan's.

    The version row is share-locked until the caller's transaction ends: an insert of a
    pricing or account plan (which updates it) waits for the transaction to commit, and the
    transaction waits for one already under way. So the version a measurement is stored with
    stays true until it is visible, and the re-rating that a new pricing or plan requests
    (after its commit) finds every measurement its rating missed. A lock that had to wait
    returns the row as the other transaction committed it while the rest of the statement
    still read the older snapshot (READ COMMITTED rechecks only the locked row): then the
    versions differ and the query runs again, now holding the lock.

    A period already billed rates nothing (its measurements are stored unrated): the bill run
    moves the version in its transaction before it reads the period's states, so it waits for
    rating transactions under way, and the ones after it see its bill."""
    columns = [list(c) for c in zip(*keys, strict=True)]
    while True:
        rows = await conn.fetch(_PRICINGS_SQL, *columns)
        if rows[0]["config_version"] == rows[0]["read_version"]:
            break
    found: dict[tuple[int, int, date], list[asyncpg.Record]] = {}
    for row in rows:
        if row["id"] is not None:
            found.setdefault((row["key_account"], row["key_meter"], row["key_day"]),
                             []).append(row)
    return found, rows[0]["config_version"]


_PRICINGS_SQL = """
    SELECT v.version AS config_version, (SELECT version FROM rating_config_version) AS read_version,
           x.*
    FROM rating_config_version v LEFT JOIN (
      SELECT k.a AS key_account, k.m AS key_meter, k.d AS key_day,
             pr.id, pr.pricing_type, pr.bands, pr.fixed_fee, g.function, g.target_field,
             g.quantity_per_unit, g.rounding, g.segment_field, ap.billing_anchor AS anchor,
             t.bill_frequency, t.bill_interval, t.currency_id, p.code AS product,
             greatest(pr.config_version, ap.config_version) AS visible_from
      FROM unnest($1::int8[], $2::int8[], $3::date[]) AS k(a, m, d)
      JOIN account_plans ap ON ap.account_id = k.a
      JOIN plans pl ON pl.id = ap.plan_id
      JOIN plan_templates t ON t.id = pl.template_id
      JOIN products p ON p.id = t.product_id
      JOIN pricings pr ON pr.plan_id = pl.id
      JOIN aggregations g ON g.id = pr.aggregation_id
      WHERE g.meter_id = k.m
        AND ap.start_date <= k.d AND (ap.end_date IS NULL OR ap.end_date > k.d)
        AND pr.start_date <= k.d AND (pr.end_date IS NULL OR pr.end_date > k.d)
        AND NOT EXISTS (SELECT 1 FROM bills b WHERE b.account_plan_id = ap.id
                          AND b.period_end > k.d AND b.period_start <= k.d)
    ) x ON true
    ORDER BY x.id FOR SHARE OF v"""


StateKey = tuple[int, int, date, str]


ChargeKey = tuple[int, str, date]


async def lock_and_insert(conn: Connection, state_keys: list[StateKey],
                          charge_keys: list[tuple[int, str, date, int]],
                          measurements: list[tuple[Any, ...]]
                          ) -> tuple[list[asyncpg.Record], list[asyncpg.Record], set[tuple[int, str]]]:
    """Store the measurements, then create-and-lock the aggregation states and the rated
    charges, in one statement (the UNION ALL runs its parts in this order). Each set goes in one
    fixed order, so two transactions cannot deadlock: measurements by (account, uid), states and
    charges by key; a state is locked only once the measurements are in, which keeps the lock
    (the point where concurrent groups serialise) as short as possible. The no-op DO UPDATE
    locks an existing row and returns it as it is. Returns (states, charges, new (account,
    uid))."""
    rows = await conn.fetch(
        """WITH st AS (
             INSERT INTO aggregation_states AS s (account_id, pricing_id, period_start, segment)
             SELECT * FROM unnest($1::text::int8[], $2::text::int8[], $3::text::date[],
                                  $4::text::text[])
             ORDER BY 1, 2, 3, 4
             ON CONFLICT (account_id, pricing_id, period_start, segment)
             DO UPDATE SET count = s.count RETURNING s.*),
           ch AS (
             INSERT INTO rated_charges AS c (account_id, charge_key, period_start, credit_type_id)
             SELECT * FROM unnest($5::text::int8[], $6::text::text[], $7::text::date[],
                                  $8::text::int8[]) ORDER BY 1, 2, 3
             ON CONFLICT (account_id, charge_key, period_start)
             DO UPDATE SET drawn_minor = c.drawn_minor RETURNING c.*),
           ms AS (
             INSERT INTO measurements (account_id, uid, meter_id, ts, data, rated,
                                       config_version)
             SELECT a, u, m, t, d::jsonb, r, v
             FROM unnest($9::text::int8[], $10::text::text[], $11::text::int8[],
                         $12::text::timestamptz[], $13::text::text[], $14::text::bool[],
                         $15::text::int8[])
                  AS x(a, u, m, t, d, r, v)
             ORDER BY 1, 2
             ON CONFLICT DO NOTHING RETURNING account_id, uid)
         SELECT 3 AS kind, account_id, uid AS key, NULL::int8 AS pricing_id,
                NULL::date AS period_start, NULL::int8 AS count, NULL::numeric AS total,
                NULL::numeric AS low, NULL::numeric AS high, NULL::numeric AS latest,
                NULL::text AS latest_key, NULL::int8 AS uniques, NULL::numeric AS exact,
                NULL::int8 AS drawn_minor FROM ms
         UNION ALL
         SELECT 1, account_id, segment, pricing_id, period_start, count, total, low, high, latest,
                latest_key, uniques, NULL, NULL FROM st
         UNION ALL
         SELECT 2, account_id, charge_key, NULL, period_start, NULL, NULL, NULL, NULL, NULL, NULL,
                NULL, exact, drawn_minor FROM ch""",
        *_columns(sorted(state_keys), "iidt"), *_columns(sorted(charge_keys), "itdi"),
        *_columns(measurements, "itistbi"))
    states = [r for r in rows if r["kind"] == 1]
    charges = [r for r in rows if r["kind"] == 2]
    return states, charges, {(r["account_id"], r["key"]) for r in rows if r["kind"] == 3}


def _text(value: str) -> str:
    if "\\" in value or '"' in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{value}"'


_LITERAL: dict[str, Callable[[Any], str]] = {
    "i": str,  # int8
    "n": lambda v: "NULL" if v is None else str(v),  # numeric (exact: Decimal's own text)
    "d": date.isoformat,  # date
    "s": lambda v: f'"{v.isoformat()}"',  # timestamptz (aware datetimes)
    "t": _text,  # text, quoted and escaped
    "b": lambda v: "t" if v else "f",  # bool
}


def _columns(rows: list[tuple[Any, ...]], kinds: str) -> list[str]:
    """Each column as a Postgres array literal (`$n::text::T[]` in the SQL): one text
    parameter per column is far cheaper for asyncpg to send than a Python list, whose every
    element is checked and encoded on its own."""
    if not rows:
        return ["{}"] * len(kinds)
    return ["{" + ",".join(map(_LITERAL[kind], column)) + "}"
            for kind, column in zip(kinds, zip(*rows, strict=True), strict=True)]


async def save_rating(conn: Connection, states: list[tuple[Any, ...]],
                      charges: list[tuple[Any, ...]], debits: list[tuple[Any, ...]],
                      credits: list[tuple[Any, ...]]) -> None:
    """Write back the locked states and charges and insert the debits and give-backs, in one
    statement."""
    await conn.execute(
        """WITH st AS (
             UPDATE aggregation_states s SET count = k.n, total = k.total, low = k.low,
                    high = k.high, latest = k.latest, latest_key = k.lk, uniques = k.u
             FROM unnest($1::text::int8[], $2::text::int8[], $3::text::date[], $4::text::text[],
                         $5::text::int8[], $6::text::numeric[], $7::text::numeric[],
                         $8::text::numeric[], $9::text::numeric[], $10::text::text[],
                         $11::text::int8[]) AS k(a, p, d, g, n, total, low, high, latest, lk, u)
             WHERE s.account_id = k.a AND s.pricing_id = k.p AND s.period_start = k.d
               AND s.segment = k.g),
           ch AS (
             UPDATE rated_charges c SET exact = k.e, drawn_minor = k.m
             FROM unnest($12::text::int8[], $13::text::text[], $14::text::date[],
                         $15::text::numeric[], $16::text::int8[])
                  AS k(a, ck, d, e, m)
             WHERE c.account_id = k.a AND c.charge_key = k.ck AND c.period_start = k.d),
           cr AS (
             INSERT INTO rated_credits (account_id, uid, charge_key, period_start, product_code,
                                        credit_type, amount, ts)
             SELECT * FROM unnest($25::text::int8[], $26::text::text[], $27::text::text[],
                                  $28::text::date[], $29::text::text[], $30::text::text[],
                                  $31::text::numeric[], $32::text::timestamptz[])
             ON CONFLICT DO NOTHING)
           INSERT INTO rated_debits (account_id, uid, product_code, credit_type, amount, ts,
                                     charge_key, period_start)
           SELECT * FROM unnest($17::text::int8[], $18::text::text[], $19::text::text[],
                                $20::text::text[], $21::text::numeric[],
                                $22::text::timestamptz[], $23::text::text[], $24::text::date[])
           ON CONFLICT DO NOTHING""",
        *_columns(states, "iidtinnnnti"), *_columns(charges, "itdni"),
        *_columns(debits, "itttnstd"), *_columns(credits, "ittdttns"))


async def insert_measurements(conn: Connection, rows: list[tuple[Any, ...]]) -> set[tuple[int, str]]:
    """Store new measurements; returns the (account, uid) that were new (not duplicates)."""
    columns = [list(c) for c in zip(*rows, strict=True)]
    found = await conn.fetch(
        """INSERT INTO measurements (account_id, uid, meter_id, ts, data, rated, config_version)
           SELECT a, u, m, t, d::jsonb, r, v
           FROM unnest($1::int8[], $2::text[], $3::int8[], $4::timestamptz[], $5::text[],
                       $6::bool[], $7::int8[]) AS x(a, u, m, t, d, r, v)
           ON CONFLICT DO NOTHING RETURNING account_id, uid""", *columns)
    return {(r["account_id"], r["uid"]) for r in found}


async def new_uniques(conn: Connection, rows: list[tuple[int, int, date, str, str]]) -> set[tuple[Any, ...]]:
    if not rows:
        return set()
    columns = [list(c) for c in zip(*sorted(set(rows)), strict=True)]
    found = await conn.fetch(
        """INSERT INTO aggregation_uniques (account_id, pricing_id, period_start, segment, value)
           SELECT * FROM unnest($1::int8[], $2::int8[], $3::date[], $4::text[], $5::text[])
           ON CONFLICT DO NOTHING RETURNING *""", *columns)
    return {tuple(r.values()) for r in found}


async def insert_debits(conn: Connection, rows: list[tuple[Any, ...]]) -> list[asyncpg.Record]:
    columns = [list(c) for c in zip(*rows, strict=True)]
    return await conn.fetch(
        """INSERT INTO rated_debits (account_id, uid, product_code, credit_type, amount, ts)
           SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::numeric[],
                                $6::timestamptz[])
           ON CONFLICT DO NOTHING RETURNING *""", *columns)


UnsentKey = tuple[datetime, int, str]  # (created_at, account_id, uid): the scan's order


async def unsent_debits(conn: Conn, older_than_s: float,  # float-ok: seconds
                        limit: int, after: UnsentKey | None = None
                        ) -> tuple[list[asyncpg.Record], datetime]:
    """Rated debits a crash left before they reached the usage path, of the last 7 days, in
    (created_at, account, uid) order after `after`; and the instant before which every rated
    debit is committed or never will be (rows take their transaction's start as created_at:
    none still running started earlier), where the scan stopped (older_than_s before now at
    the latest)."""
    upper = await conn.fetchval(
        """SELECT least(now() - make_interval(secs => $1),
                        (SELECT min(xact_start) FROM pg_stat_activity
                         WHERE datname = current_database() AND pid <> pg_backend_pid()))""",
        older_than_s)
    since, account, uid = after or (datetime.min.replace(tzinfo=UTC), 0, "")
    rows = await conn.fetch(
        """SELECT d.*, a.code AS account FROM rated_debits d JOIN accounts a ON a.id = d.account_id
           WHERE d.created_at < $1 AND d.created_at >= $2
             AND (d.created_at, d.account_id, d.uid) > ($2, $3, $4)
             AND d.created_at > now() - interval '7 days'
             AND NOT EXISTS (SELECT 1 FROM usage_events u
                             WHERE u.account_id = d.account_id AND u.uid = d.uid)
           ORDER BY d.created_at, d.account_id, d.uid LIMIT $5""",
        upper, since, account, uid, limit)
    return rows, upper


async def stored_cursor(conn: Conn, name: str) -> UnsentKey | None:
    row = await conn.fetchrow(
        "SELECT created_at, account_id, uid FROM worker_cursors WHERE name = $1", name)
    return None if row is None else (row["created_at"], row["account_id"], row["uid"])


async def store_cursor(conn: Conn, name: str, position: UnsentKey) -> None:
    """Keep a worker's position for every process and the next start; never moves back (the
    later of two processes' positions wins, and both compare in the database's own order)."""
    await conn.execute(
        """INSERT INTO worker_cursors AS w (name, created_at, account_id, uid)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (name) DO UPDATE SET created_at = EXCLUDED.created_at,
               account_id = EXCLUDED.account_id, uid = EXCLUDED.uid, updated_at = now()
           WHERE (w.created_at, w.account_id, w.uid)
                 < (EXCLUDED.created_at, EXCLUDED.account_id, EXCLUDED.uid)""",
        name, *position)


async def states_of(conn: Conn, account_id: int, pricing_id: int,
                    period_start: date) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT * FROM aggregation_states WHERE account_id = $1 AND pricing_id = $2
           AND period_start = $3 ORDER BY segment""", account_id, pricing_id, period_start)


def charge_keys_sql(plan: str, account_plan: str) -> str:
    """The charge keys of an account plan's charges (SQL expressions in, a text[] out): its
    plan's pricings', its standing charge's and its minimum-spend top-up's."""
    return (f"ARRAY(SELECT 'p' || pr.id FROM pricings pr WHERE pr.plan_id = {plan}) "
            f"|| ARRAY['s' || {account_plan}, 'm' || {account_plan}]")


def split_sql(account: str, period_start: str, plan: str, account_plan: str) -> str:
    """A subquery of (covered, overage): what an account plan's charges of a period took, by
    balance and as overage, as the ledger has it now, less what give-backs have returned of
    each. The arguments are SQL expressions."""
    return f"""(
        WITH d AS (SELECT d.account_id, d.uid FROM rated_debits d
                   WHERE d.account_id = {account} AND d.period_start = {period_start}
                     AND d.charge_key = ANY({charge_keys_sql(plan, account_plan)})),
             taken AS (SELECT e.kind = 'overage' AS owed, -e.amount AS amount
                       FROM d JOIN ledger_entries e
                       ON e.op_key = 'u:' || d.account_id || ':' || d.uid
                       WHERE e.amount < 0
                       UNION ALL
                       SELECT p.source = 'overage', -p.amount
                       FROM d JOIN rated_credit_parts p
                       ON p.account_id = d.account_id AND p.debit_uid = d.uid
                       WHERE p.applied_at IS NOT NULL AND p.source IN ('balance', 'overage'))
        SELECT COALESCE(sum(amount) FILTER (WHERE NOT owed), 0) AS covered,
               COALESCE(sum(amount) FILTER (WHERE owed), 0) AS overage FROM taken)"""


# charges (`account_charges c`) as JSON text, for a bill and a period (app/rating/charges.py)
CHARGE_LINES = """coalesce(json_agg(json_build_object(
    'id', c.id, 'day', c.day, 'description', c.description, 'amount', c.amount::text)
    ORDER BY c.day, c.id), '[]')"""


async def period_drawn(conn: Conn, account_id: int, start: date, end: date, plan_id: int,
                       account_plan_id: int) -> asyncpg.Record:
    """Bill-to-date's one read of an account plan's period beyond its lines: what its charges
    drew (`drawn`, minor units), of which the standing charge (`standing`), `covered` and
    `overage` (`split_sql`), and the period's charges (`charge_lines`, `CHARGE_LINES`)."""
    row = await conn.fetchrow(
        f"""SELECT (SELECT COALESCE(sum(drawn_minor), 0) FROM rated_charges
                    WHERE account_id = $1 AND period_start = $2
                      AND charge_key = ANY({charge_keys_sql('$4::int8', '$5::int8')})) AS drawn,
                   (SELECT COALESCE(sum(drawn_minor), 0) FROM rated_charges
                    WHERE account_id = $1 AND period_start = $2
                      AND charge_key = 's' || $5::int8) AS standing,
                   s.covered, s.overage,
                   (SELECT {CHARGE_LINES} FROM account_charges c WHERE c.account_plan_id = $5
                      AND c.day >= $2 AND c.day < $3 AND c.voided_at IS NULL) AS charge_lines
            FROM {split_sql('$1::int8', '$2::date', '$4::int8', '$5::int8')} s""",
        account_id, start, end, plan_id, account_plan_id)
    assert row is not None
    return row


async def plans_at(conn: Conn, account_id: int, day: date) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT ap.billing_anchor AS anchor, ap.id AS account_plan_id, ap.start_date AS plan_start,
                   ap.end_date AS plan_end, pl.*
            FROM account_plans ap JOIN ({PLAN}) pl
            ON pl.id = ap.plan_id WHERE ap.account_id = $1 AND ap.start_date <= $2
            AND (ap.end_date IS NULL OR ap.end_date > $2) ORDER BY ap.id""", account_id, day)


async def pricings_in(conn: Conn, plan_id: int, start: date, end: date) -> list[asyncpg.Record]:
    """The plan's pricings whose date range touches the period [start, end): one that ended or
    began within it has rated some of the period's usage (or, for a counter, charges the
    period: `recurring.overlaps`)."""
    return await conn.fetch(
        _WITH_AGGREGATION + """ LEFT JOIN LATERAL (SELECT function, quantity_per_unit, rounding, segment_field
                                FROM aggregations WHERE id = pr.aggregation_id) g2 ON true
        WHERE pr.plan_id = $1 AND pr.start_date < $3 AND (pr.end_date IS NULL OR pr.end_date > $2)
          AND pr.start_date < COALESCE(pr.end_date, 'infinity'::date)  -- (not a cancelled one)
        ORDER BY pr.id""", plan_id, start, end)


# --- give-backs (a running charge that went down) -------------------------------------------

GIVEBACK_LOCK = 0x67697665  # "give": advisory lock class of give-back planning (per period)
LEASE_S = 30


async def lock_period_giveback(conn: Connection, account_id: int, period_start: date) -> None:
    """Serialise give-back planning per account and period (a give-back may reverse what the
    period's other charges left owing: `reversible`); never held while a part is applied."""
    await conn.execute("SELECT pg_advisory_xact_lock($1::int4, hashtext($2))", GIVEBACK_LOCK,
                       f"{account_id}:{period_start}")


async def open_credits(conn: Conn, account_id: int, charge_key: str,
                       period_start: date) -> list[asyncpg.Record]:
    """A charge's unsettled give-backs, oldest first, with what their parts already cover."""
    return await conn.fetch(
        """SELECT c.uid, c.amount,
                  COALESCE(sum(p.amount), 0) AS planned, COALESCE(max(p.seq) + 1, 0) AS next_seq
           FROM rated_credits c LEFT JOIN rated_credit_parts p
                ON p.account_id = c.account_id AND p.credit_uid = c.uid
           WHERE c.account_id = $1 AND c.charge_key = $2 AND c.period_start = $3
             AND c.settled_at IS NULL
           GROUP BY c.uid, c.amount, c.created_at ORDER BY c.created_at, c.uid""",
        account_id, charge_key, period_start)


def _pool_sql() -> str:
    """CTEs of a charge's give-back pool ($1 account, $2 charge key, $3 period start): `pool`,
    the rated debits of the period of every charge of the account plans the charge is of
    (found by its key: `s`/`m` + account plan, or `p` + a pricing of their plan), with `own`
    marking the charge's own."""
    return f"""plans AS (
                 SELECT ap.id, ap.plan_id FROM account_plans ap
                 WHERE ap.account_id = $1 AND ($2 IN ('s' || ap.id, 'm' || ap.id)
                       OR ap.plan_id = (SELECT pr.plan_id FROM pricings pr
                                        WHERE left($2, 1) = 'p' AND pr.id = substr($2, 2)::int8))),
               pool AS (SELECT uid, charge_key = $2 AS own FROM rated_debits
                        WHERE account_id = $1 AND period_start = $3
                          AND (charge_key = $2 OR charge_key IN (
                               SELECT unnest({charge_keys_sql('p.plan_id', 'p.id')})
                               FROM plans p)))"""


async def reversible(conn: Conn, account_id: int, charge_key: str,
                     period_start: date) -> list[asyncpg.Record]:
    """What a give-back of a charge may reverse, less what give-backs have planned to reverse
    already, in the order it reverses them: what the debits of its account plan's charges of
    the period took, first what they left owing (the charge's own debits' overage, then that
    of the other charges' debits: credit goes back only once the period owes nothing), then
    the balances they drew (the charge's own debits first); each newest ledger entry first
    (within a debit in the reverse of the order it drew them). The period's give-backs so
    draw on one pool, what its charges' debits took, and their split of it between credit
    and overage stays that of credit drawn before overage."""
    return await conn.fetch(
        f"""WITH {_pool_sql()},
                 e AS (SELECT e.id, d.uid AS debit_uid, e.account_id AS owner_id, e.balance_id,
                              -e.amount AS amount,
                              (CASE WHEN e.balance_id IS NULL THEN 0 ELSE 2 END
                               + CASE WHEN d.own THEN 0 ELSE 1 END) AS rank
                       FROM pool d JOIN ledger_entries e
                            ON e.op_key = 'u:' || $1::text || ':' || d.uid
                       WHERE e.kind IN ('debit', 'overage') AND e.amount < 0),
                 t AS (SELECT p.debit_uid, p.balance_id, sum(p.amount) AS taken
                       FROM rated_credit_parts p
                       WHERE p.account_id = $1 AND p.debit_uid IN (SELECT uid FROM pool)
                       GROUP BY p.debit_uid, p.balance_id)
            SELECT e.debit_uid, e.owner_id, e.balance_id, e.amount - COALESCE(t.taken, 0) AS left
            FROM e LEFT JOIN t ON t.debit_uid = e.debit_uid
                              AND t.balance_id IS NOT DISTINCT FROM e.balance_id
            WHERE e.amount > COALESCE(t.taken, 0)
            ORDER BY e.rank, e.id DESC""", account_id, charge_key, period_start)


async def unsent_period_debits(conn: Conn, account_id: int, charge_key: str,
                               period_start: date) -> list[asyncpg.Record]:
    """The rated debits of a charge's give-back pool (`_pool_sql`) not (yet) in usage_events."""
    return await conn.fetch(
        f"""WITH {_pool_sql()}
            SELECT d.*, a.code AS account FROM rated_debits d
            JOIN accounts a ON a.id = d.account_id
            WHERE d.account_id = $1 AND d.uid IN (SELECT uid FROM pool)
              AND NOT EXISTS (SELECT 1 FROM usage_events u
                              WHERE u.account_id = d.account_id AND u.uid = d.uid)""",
        account_id, charge_key, period_start)


async def insert_credit_parts(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    if not rows:
        return
    columns = [list(c) for c in zip(*rows, strict=True)]
    await conn.execute(
        """INSERT INTO rated_credit_parts (account_id, credit_uid, seq, source, debit_uid,
                                           owner_id, balance_id, amount)
           SELECT * FROM unnest($1::int8[], $2::text[], $3::int4[], $4::text[], $5::text[],
                                $6::int8[], $7::int8[], $8::numeric[])""", *columns)


async def claim_credit_parts(conn: Connection, account_id: int, charge_key: str,
                             period_start: date) -> list[asyncpg.Record]:
    """Lease a charge's unapplied give-back parts (to the caller, for LEASE_S: a crashed
    applier's parts are taken over once the lease runs out), with what applying them needs."""
    return await conn.fetch(
        f"""UPDATE rated_credit_parts p SET lease_until = now() + interval '{LEASE_S} seconds'
            FROM rated_credits c JOIN accounts a ON a.id = c.account_id
            WHERE c.account_id = $1 AND c.charge_key = $2 AND c.period_start = $3
              AND c.settled_at IS NULL AND p.account_id = c.account_id
              AND p.credit_uid = c.uid AND p.applied_at IS NULL
              AND (p.lease_until IS NULL OR p.lease_until < now())
            RETURNING p.*, c.product_code, c.credit_type, a.code AS account,
                      (SELECT code FROM accounts o WHERE o.id = p.owner_id) AS owner,
                      (SELECT product_codes FROM balances b WHERE b.id = p.balance_id)
                          AS product_codes,
                      (SELECT priority FROM balances b WHERE b.id = p.balance_id) AS priority""",
        account_id, charge_key, period_start)


async def part_applied(conn: Conn, account_id: int, credit_uid: str, seq: int) -> None:
    await conn.execute(
        """UPDATE rated_credit_parts SET applied_at = now(), lease_until = NULL
           WHERE account_id = $1 AND credit_uid = $2 AND seq = $3""", account_id, credit_uid, seq)


async def release_credit_parts(conn: Conn, account_id: int, credit_uids: list[str]) -> None:
    await conn.execute(
        """UPDATE rated_credit_parts SET lease_until = NULL
           WHERE account_id = $1 AND credit_uid = ANY($2::text[]) AND applied_at IS NULL""",
        account_id, credit_uids)


async def fallback_balance(conn: Conn, account_id: int, credit_uid: str, seq: int) -> int:
    """The balance id a part is granted under instead (reserved once, then always the same)."""
    found: int = await conn.fetchval(
        """UPDATE rated_credit_parts
           SET fallback_balance_id = COALESCE(fallback_balance_id, nextval('balances_id_seq'))
           WHERE account_id = $1 AND credit_uid = $2 AND seq = $3
           RETURNING fallback_balance_id""", account_id, credit_uid, seq)
    return found


async def settle_credits(conn: Conn, account_id: int, charge_key: str,
                         period_start: date) -> None:
    """Mark settled the give-backs whose parts cover them and are all applied."""
    await conn.execute(
        """UPDATE rated_credits c SET settled_at = now()
           WHERE c.account_id = $1 AND c.charge_key = $2 AND c.period_start = $3
             AND c.settled_at IS NULL
             AND c.amount = (SELECT COALESCE(sum(p.amount), 0) FROM rated_credit_parts p
                             WHERE p.account_id = c.account_id AND p.credit_uid = c.uid)
             AND NOT EXISTS (SELECT 1 FROM rated_credit_parts p
                             WHERE p.account_id = c.account_id AND p.credit_uid = c.uid
                               AND p.applied_at IS NULL)""",
        account_id, charge_key, period_start)


async def unsettled_charges(conn: Conn, older_than_s: float,  # float-ok: seconds
                            limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT DISTINCT account_id, charge_key, period_start FROM rated_credits
           WHERE settled_at IS NULL AND created_at < now() - make_interval(secs => $1)
           LIMIT $2""", older_than_s, limit)


# --- re-rating measurements stored unrated ----------------------------------------------------

async def request_rerate(conn: Conn, account_ids: list[int],
                         table: Literal["pricings", "account_plans"], row_id: int) -> None:
    """Ask for re-rating, in the transaction that inserted a pricing or account plan (`table`,
    `row_id`): the version that row took is where the request's new pricings start (migration
    018); a request already waiting keeps the lower of the two."""
    if table not in ("pricings", "account_plans"):  # (a table name in the SQL: never input)
        raise ValueError(table)
    await conn.execute(
        f"""INSERT INTO rerate_requests AS r (account_id, from_version)
            SELECT a, (SELECT config_version FROM {table} WHERE id = $2)
            FROM unnest($1::int8[]) AS a
            ON CONFLICT (account_id) DO UPDATE SET requested_at = now(),
                from_version = CASE WHEN r.from_version IS NULL THEN NULL
                                    ELSE least(r.from_version, EXCLUDED.from_version) END""",
        account_ids, row_id)


async def accounts_on_plan(conn: Conn, plan_id: int) -> list[int]:
    rows = await conn.fetch("SELECT DISTINCT account_id FROM account_plans WHERE plan_id = $1",
                            plan_id)
    return [r["account_id"] for r in rows]


async def rerate_requests(conn: Conn, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT account_id, requested_at, from_version FROM rerate_requests
           ORDER BY requested_at DESC LIMIT $1""", limit)


async def drop_rerate_request(conn: Conn, account_id: int, requested_at: Any) -> None:
    """Forget a request, unless it was renewed since it was read."""
    await conn.execute("DELETE FROM rerate_requests WHERE account_id = $1 AND requested_at = $2",
                       account_id, requested_at)


async def account_plan_anchors(conn: Conn, account_id: int) -> list[asyncpg.Record]:
    """The account's plans' period anchors and frequencies (for their current periods)."""
    return await conn.fetch(
        """SELECT ap.billing_anchor AS anchor, t.bill_frequency, t.bill_interval,
                  (SELECT max(b.period_end) FROM bills b
                   WHERE b.account_plan_id = ap.id) AS billed_through
           FROM account_plans ap JOIN plans pl ON pl.id = ap.plan_id
           JOIN plan_templates t ON t.id = pl.template_id WHERE ap.account_id = $1""",
        account_id)


async def claim_unplaced(conn: Connection, account_id: int, since: datetime,
                         limit: int, from_version: int | None = None) -> list[asyncpg.Record]:
    """Lock an account's measurements from `since` on that a pricing covers which their rating
    did not see (its `visible_from` is above the version the measurement was rated at), newest
    first, skipping those another re-rater holds. FOR UPDATE re-checks the condition on the
    latest row version, so a measurement re-rated meanwhile is never taken twice. Only the
    meters of the account's pricings visible from `from_version` on are read (None: every
    meter); the (account_id, meter_id, ts) index leaves the others' measurements unread."""
    meters = [r["meter_id"] for r in await conn.fetch(
        """SELECT DISTINCT g.meter_id FROM account_plans ap
           JOIN pricings pr ON pr.plan_id = ap.plan_id
           JOIN aggregations g ON g.id = pr.aggregation_id
           WHERE ap.account_id = $1
             AND ($2::int8 IS NULL OR greatest(pr.config_version, ap.config_version) >= $2)""",
        account_id, from_version)]
    if not meters:
        return []
    return await conn.fetch(
        """SELECT m.uid, m.ts, m.data, m.config_version, mt.code AS meter, a.code AS account
           FROM measurements m
           JOIN meters mt ON mt.id = m.meter_id JOIN accounts a ON a.id = m.account_id
           WHERE m.account_id = $1 AND m.meter_id = ANY($4::int8[]) AND m.ts >= $3
             AND EXISTS (
               SELECT 1 FROM account_plans ap JOIN pricings pr ON pr.plan_id = ap.plan_id
               JOIN aggregations g ON g.id = pr.aggregation_id
               WHERE ap.account_id = m.account_id AND g.meter_id = m.meter_id
                 AND greatest(pr.config_version, ap.config_version) > m.config_version
                 AND ap.start_date <= (m.ts AT TIME ZONE 'UTC')::date
                 AND (ap.end_date IS NULL OR ap.end_date > (m.ts AT TIME ZONE 'UTC')::date)
                 AND pr.start_date <= (m.ts AT TIME ZONE 'UTC')::date
                 AND (pr.end_date IS NULL OR pr.end_date > (m.ts AT TIME ZONE 'UTC')::date))
           ORDER BY m.ts DESC, m.uid LIMIT $2
           FOR UPDATE OF m SKIP LOCKED""", account_id, limit, since, meters)


async def mark_placed(conn: Connection, account_id: int, uids: list[str], placed: list[str],
                      version: int) -> None:
    """The claimed measurements were rated for every pricing visible at `version` (except in
    a billed period, which nothing reopens); the `placed` ones are rated now if they were
    not."""
    await conn.execute(
        """UPDATE measurements SET config_version = $4, rated = rated OR uid = ANY($3::text[])
           WHERE account_id = $1 AND uid = ANY($2::text[])""",
        account_id, uids, placed, version)


async def measurements(conn: Conn, account_id: int, meter_id: int | None, start: datetime | None,
                       end: datetime | None, rated: bool | None,
                       before: tuple[datetime, str] | None, limit: int) -> list[asyncpg.Record]:
    """An account's measurements, newest timestamp first (then uid), from `before` on. Each
    meter's newest `limit` come straight from the (account, meter, ts) index (with the rows
    that tie with the last on ts: ordering by uid there too would sort every row in range),
    and the meters' are merged: a page reads about `limit` rows per meter, however long the
    history (with `rated`, also the rows of the other kind it passes over: no index holds
    the flag). Only the filters given are in the statement (`Where`): one that is always true
    for the rows (`rated = COALESCE($5, rated)`, say) is estimated to keep almost none, and
    the planner then sorts the account's whole history rather than read the index in order."""
    where = Where(account_id, limit)
    where.add("m.account_id = $1 AND m.meter_id = mt.id")
    if start is not None:
        where.add("m.ts >= {}", start)
    if end is not None:
        where.add("m.ts < {}", end)
    if rated is not None:
        where.add("m.rated = {}", rated)
    if before is not None:  # the index range first, then the exact position within it
        where.add("m.ts <= {0} AND (m.ts, m.uid) < ({0}, {1})", *before)
    if meter_id is not None:  # (the other meters' lateral reads stop at this test)
        where.add("mt.id = {}", meter_id)
    return await conn.fetch(
        f"""SELECT x.uid, x.ts, x.data, x.rated, mt.code AS meter
            FROM meters mt CROSS JOIN LATERAL (
              SELECT m.uid, m.ts, m.data, m.rated FROM measurements m
              WHERE {where}
              ORDER BY m.ts DESC FETCH FIRST $2 ROWS WITH TIES) x
            ORDER BY x.ts DESC, x.uid DESC LIMIT $2""", *where.args)


async def measurement(conn: Conn, account_id: int, uid: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT m.uid, m.ts, m.data, m.rated, mt.code AS meter FROM measurements m
           JOIN meters mt ON mt.id = m.meter_id WHERE m.account_id = $1 AND m.uid = $2""",
        account_id, uid)
