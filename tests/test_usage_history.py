"""An account's usage history: the event list (newest recorded first, cursor-paginated, told
apart by kind, with reversals) and the summary per UTC hour or day, product and credit type."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx

from tests.conftest import Api


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def _hold(api: Api, account: str, product: str, amount: str, uid: str) -> None:
    await api.call("POST", f"/v1/accounts/{account}/holds", scope="runtime", expect=201,
                   json={"uid": uid, "product": product, "amount": amount})


async def _end_hold(api: Api, account: str, uid: str, captured: str | None) -> None:
    url = f"/v1/accounts/{account}/holds/{uid}"
    if captured is None:
        await api.call("POST", f"{url}/release", scope="runtime", json={})
    else:
        await api.call("POST", f"{url}/capture", scope="runtime", json={"amount": captured})


async def _page(api: Api, account: str, **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("GET", f"/v1/accounts/{account}/usage-events",
                                            scope="runtime", params=params)
    return result


async def _walk(api: Api, account: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await _page(api, account, **({"cursor": cursor} if cursor else {}), **params)
        items += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_the_event_list_is_newest_recorded_first_and_pages_without_gaps(
        api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    await api.grant(n["account"], "10.00")
    for i in range(3):
        await api.usage(n["account"], n["api"], "0.50", uid=f"single-{i}")
    # one batch: its events share a recorded time, so the list orders them by uid
    await api.call("POST", "/v1/usage", scope="runtime", json={"events": [
        {"uid": f"batch-{i}", "account": n["account"], "product": n["storage"],
         "amount": "0.25", "timestamp": _iso(datetime.now(UTC))} for i in range(5)]})
    await _hold(api, n["account"], n["api"], "1.00", "hold-1")
    await api.call("POST", f"/v1/accounts/{n['account']}/usage-events/single-1/reverse",
                   scope="runtime", expect=201, json={"amount": "0.20"})
    await api.usage(n["account"], n["api"], "20.00", uid="big")  # beyond what is left: overage
    left = Decimal("10.00") - 3 * Decimal("0.50") - 5 * Decimal("0.25") - 1 + Decimal("0.20")

    rows = await db.fetch(
        """SELECT e.uid FROM usage_events e JOIN accounts a ON a.id = e.account_id
           WHERE a.code = $1 ORDER BY e.recorded_at DESC, e.uid DESC""", n["account"])
    expected = [r["uid"] for r in rows]
    assert len(expected) == 10
    for limit in (1, 3, 10, 50):
        assert [e["uid"] for e in await _walk(api, n["account"], limit=limit)] == expected

    events = {e["uid"]: e for e in await _walk(api, n["account"])}
    assert (events["big"]["amount"], events["big"]["overage"]) == ("20.00", str(20 - left))
    assert (events["single-1"]["reversed"], events["single-0"]["reversed"]) == ("0.20", None)
    assert events["h0:hold-1"]["kind"] == "hold" and events["batch-3"]["kind"] == "usage"
    assert events["batch-3"]["product"] == n["storage"]
    assert events["batch-3"]["credit_type"] == n["credit_type"]

    holds = await _walk(api, n["account"], kind="hold")
    assert [e["uid"] for e in holds] == ["h0:hold-1"]
    usage = await _walk(api, n["account"], kind="usage", limit=2)
    assert [e["uid"] for e in usage] == [u for u in expected if u != "h0:hold-1"]
    storage = await _walk(api, n["account"], product=n["storage"], limit=4)
    assert [e["uid"] for e in storage] == [f"batch-{i}" for i in range(4, -1, -1)]
    assert (await _page(api, n["account"], kind="rated"))["data"] == []


async def test_the_event_list_refuses_bad_input_by_field(api: Api) -> None:
    n = await api.setup()
    url = f"/v1/accounts/{n['account']}/usage-events"
    for params, field in [({"cursor": "not-ours"}, "query.cursor"),
                          ({"cursor": "MTIzNA"}, "query.cursor"),  # "1234": no uid
                          ({"kind": "refund"}, "query.kind"),
                          ({"limit": "0"}, "query.limit"),
                          ({"product": "no such/code"}, "query.product"),
                          ({"since": "2026-01-01T00:00:00Z"}, "query.since")]:
        problem = await api.call("GET", url, scope="runtime", expect=422, params=params)
        assert problem["field"] == field, (params, problem)
    missing = await api.call("GET", "/v1/accounts/no-such-account/usage-events",
                             scope="runtime", expect=404)
    assert missing["field"] == "code"


async def test_the_summary_sums_usage_per_window_product_and_credit_type(api: Api) -> None:
    n = await api.setup()
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    base = hour - timedelta(hours=30)
    await api.grant(n["account"], "100.00", effective_at=_iso(base - timedelta(days=1)))
    reported = [  # (uid, product, amount, timestamp)
        ("a", n["api"], "1.25", base + timedelta(minutes=5)),
        ("b", n["api"], "2.00", base + timedelta(minutes=50)),
        ("c", n["storage"], "0.75", base + timedelta(minutes=59, seconds=59)),
        ("d", n["api"], "3.10", base + timedelta(hours=1)),  # the next hour's first instant
        ("e", n["api"], "0.40", base + timedelta(hours=26, minutes=1)),
        ("f", n["storage"], "5.00", datetime.now(UTC) - timedelta(seconds=1)),
    ]
    await api.call("POST", "/v1/usage", scope="runtime", json={"events": [
        {"uid": uid, "account": n["account"], "product": product, "amount": amount,
         "timestamp": _iso(at)} for uid, product, amount, at in reported]})
    await api.call("POST", f"/v1/accounts/{n['account']}/usage-events/b/reverse",
                   scope="runtime", expect=201, json={"amount": "0.50"})
    # holds count for what they captured, once captured; a released one counts nothing
    for uid, amount, captured in [("h-1", "5.00", "1.50"), ("h-2", "2.00", None),
                                  ("h-3", "2.00", "0.00")]:
        await _hold(api, n["account"], n["api"], amount, uid)
        await _end_hold(api, n["account"], uid, captured)
    await _hold(api, n["account"], n["api"], "4.00", "h-open")  # not captured yet: not counted
    other = await api.setup()  # another account's usage is not this one's
    await api.usage(other["account"], other["api"], "9.00")

    reversed_ = {"b": Decimal("0.50")}
    used = [(uid, product, Decimal(amount), at) for uid, product, amount, at in reported]
    [hold] = [e for e in await _walk(api, n["account"], kind="hold") if e["uid"] == "h0:h-1"]
    used.append(("h-1", n["api"], Decimal("1.50"), datetime.fromisoformat(hold["timestamp"])))
    for window, step in [("hour", timedelta(hours=1)), ("day", timedelta(days=1))]:
        expected: dict[tuple[datetime, str], list[Decimal]] = defaultdict(
            lambda: [Decimal(0), Decimal(0), Decimal(0)])
        for uid, product, amount, at in used:
            start = at.replace(minute=0, second=0, microsecond=0)
            if window == "day":
                start = start.replace(hour=0)
            sums = expected[(start, product)]
            sums[0] += 1
            sums[1] += amount
            sums[2] += reversed_.get(uid, Decimal(0))
        out = await api.call("GET", f"/v1/accounts/{n['account']}/usage-summary",
                             scope="runtime", params={"window": window, "start": _iso(
                                 base - timedelta(days=1)), "end": _iso(datetime.now(UTC))})
        got = {(datetime.fromisoformat(b["start"]), b["product"]): b for b in out["data"]}
        assert sorted(got) == sorted(expected)
        for key, (count, amount, back) in expected.items():
            bucket = got[key]
            assert datetime.fromisoformat(bucket["end"]) == key[0] + step
            assert (bucket["events"], bucket["credit_type"]) == (count, n["credit_type"])
            assert (Decimal(bucket["amount"]), Decimal(bucket["reversed"]),
                    Decimal(bucket["net"])) == (amount, back, amount - back)
            assert bucket["overage"] == "0.00"

    # filters and bounds: one product; a range that starts at event d's instant
    out = await api.call("GET", f"/v1/accounts/{n['account']}/usage-summary", scope="runtime",
                         params={"window": "hour", "product": n["storage"],
                                 "start": _iso(base), "end": _iso(base + timedelta(hours=2))})
    assert [(b["product"], b["amount"]) for b in out["data"]] == [(n["storage"], "0.75")]
    out = await api.call("GET", f"/v1/accounts/{n['account']}/usage-summary", scope="runtime",
                         params={"window": "hour", "start": _iso(base + timedelta(hours=1)),
                                 "end": _iso(base + timedelta(hours=1, seconds=1))})
    assert [(b["events"], b["amount"]) for b in out["data"]] == [(1, "3.10")]
    out = await api.call("GET", f"/v1/accounts/{n['account']}/usage-summary", scope="runtime",
                         params={"window": "hour", "start": _iso(base),
                                 "end": _iso(base + timedelta(hours=1))})  # end is exclusive
    assert sum(b["events"] for b in out["data"]) == 3


async def test_the_summary_shows_overage_and_defaults_to_the_month_so_far(api: Api) -> None:
    n = await api.setup()
    await api.grant(n["account"], "1.00")
    await api.usage(n["account"], n["api"], "3.00", uid="over")
    before = datetime.now(UTC)
    out = await api.call("GET", f"/v1/accounts/{n['account']}/usage-summary", scope="admin")
    # through the end of the current hour (an hour may have begun during the call)
    ends = {at.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
            for at in (before, datetime.now(UTC))}
    end = datetime.fromisoformat(out["end"])
    assert out["window"] == "day" and end in ends
    start = datetime.fromisoformat(out["start"])
    assert start == (end - timedelta(hours=1)).replace(day=1, hour=0)
    # an end at a month's first instant: the month before it (not an empty range)
    month = await api.call("GET", f"/v1/accounts/{n['account']}/usage-summary", scope="admin",
                           params={"end": "2026-12-01T00:00:00Z"})
    assert month["start"] == "2026-11-01T00:00:00Z" and month["data"] == []
    [bucket] = out["data"]
    assert (bucket["amount"], bucket["overage"], bucket["net"]) == ("3.00", "2.00", "3.00")


async def test_the_summary_refuses_bad_input_by_field(api: Api) -> None:
    n = await api.setup()
    url = f"/v1/accounts/{n['account']}/usage-summary"
    now = datetime.now(UTC)
    for params, field in [
            ({"start": _iso(now), "end": _iso(now - timedelta(hours=1))}, "query.start"),
            ({"start": _iso(now), "end": _iso(now)}, "query.start"),
            ({"window": "hour", "start": _iso(now - timedelta(days=32)), "end": _iso(now)},
             "query.end"),
            ({"start": _iso(now - timedelta(days=400)), "end": _iso(now)}, "query.end"),
            ({"window": "week"}, "query.window"),
            ({"start": "2026-01-01T00:00:00"}, "query.start"),  # no offset
            ({"end": "1767225600"}, "query.end"),  # a number is not a timestamp
            ({"credit_type": "no-such-type"}, "query.credit_type")]:
        problem = await api.call("GET", url, scope="runtime", expect=422, params=params)
        assert problem["field"] == field, (params, problem)


async def test_a_customer_token_reads_its_own_summary_but_not_the_event_list(
        api: Api, client: httpx.AsyncClient) -> None:
    n = await api.setup()
    other = await api.setup()
    await api.grant(n["account"], "5.00")
    await api.usage(n["account"], n["api"], "1.00", uid=uuid.uuid4().hex)
    minted = await api.call("POST", f"/v1/accounts/{n['account']}/customer-tokens",
                            scope="runtime", expect=201, json={})
    bearer = {"Authorization": f"Bearer {minted['token']}"}
    own = await client.get(f"/v1/accounts/{n['account']}/usage-summary", headers=bearer)
    assert own.status_code == 200 and own.json()["data"][0]["amount"] == "1.00"
    theirs = await client.get(f"/v1/accounts/{other['account']}/usage-summary", headers=bearer)
    assert theirs.status_code == 403, theirs.text
    listed = await client.get(f"/v1/accounts/{n['account']}/usage-events", headers=bearer)
    assert listed.status_code == 403, listed.text
