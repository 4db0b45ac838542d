"""SQL of the rating domain: configuration, measurements and aggregation state."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from typing import Any

import asyncpg

from app.db import Conn, Connection

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
TABLES = {"meters": METER, "aggregations": AGGREGATION, "counters": COUNTER,
          "plan_templates": TEMPLATE, "plans": PLAN}
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
                      standing: Decimal | None, minimum: Decimal | None) -> None:
    await conn.execute(
        """INSERT INTO plans (code, name, template_id, standing_charge, minimum_spend)
           VALUES ($1, $2, $3, $4, $5)""", code, name, template_id, standing, minimum)


async def lock_plan(conn: Connection, plan_id: int) -> None:
    await conn.execute("SELECT 1 FROM plans WHERE id = $1 FOR UPDATE", plan_id)


async def overlapping_pricing(conn: Conn, plan_id: int, aggregation_id: int | None,
                              counter_id: int | None, start: date, end: date | None) -> bool:
    found = await conn.fetchval(
        """SELECT 1 FROM pricings WHERE plan_id = $1
             AND aggregation_id IS NOT DISTINCT FROM $2 AND counter_id IS NOT DISTINCT FROM $3
             AND start_date < COALESCE($5::date, 'infinity'::date)
             AND COALESCE(end_date, 'infinity'::date) > $4 LIMIT 1""",
        plan_id, aggregation_id, counter_id, start, end)
    return found is not None


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
                                   end: date | None) -> bool:
    found = await conn.fetchval(
        f"""SELECT 1 FROM account_plans ap JOIN ({PLAN}) pl ON pl.id = ap.plan_id
            WHERE ap.account_id = $1 AND pl.product = $2
              AND ap.start_date < COALESCE($4::date, 'infinity'::date)
              AND COALESCE(ap.end_date, 'infinity'::date) > $3 LIMIT 1""",
        account_id, product, start, end)
    return found is not None


async def insert_account_plan(conn: Conn, account_id: int, plan_id: int, start: date,
                              end: date | None) -> int:
    ap_id: int = await conn.fetchval(
        """INSERT INTO account_plans (account_id, plan_id, start_date, end_date)
           VALUES ($1, $2, $3, $4) RETURNING id""", account_id, plan_id, start, end)
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
