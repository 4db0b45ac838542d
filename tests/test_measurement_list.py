"""GET /v1/accounts/{code}/measurements: an account's stored measurements, newest timestamp
first, across its meters, filtered by meter, time and rated, page after page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import Api
from tests.test_rating_config import meter
from tests.test_rating_drawdown import aggregation, price, storage_setup


def stamp(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def send(api: Api, account: str, items: list[tuple[str, str, datetime, int]]) -> None:
    """Measurements (uid, meter, timestamp, gb) in one batch; each one accepted."""
    out = await api.call("POST", "/v1/measurements", scope="runtime", json={"measurements": [
        {"uid": uid, "account": account, "meter": meter_code, "timestamp": stamp(at),
         "data": {"gb": gb, "files": 1, "seconds": 1}} for uid, meter_code, at, gb in items]})
    assert out["rejected"] == 0 and out["duplicates"] == 0, out


async def every_page(api: Api, account: str, scope: str = "runtime",
                     **params: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await api.call("GET", f"/v1/accounts/{account}/measurements", scope=scope,
                              params={**params, **({"cursor": cursor} if cursor else {})})
        seen += page["data"]
        assert len(page["data"]) <= int(params.get("limit", 50))
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


async def test_pages_list_every_measurement_once_newest_first_with_the_filters(api: Api) -> None:
    names, priced, plan_code = await storage_setup(api)
    await price(api, plan_code, "per_unit", [(None, "0.01")],
                aggregation=await aggregation(api, priced, "gb", "SUM"))
    unpriced = await meter(api, names["storage"])
    account = names["account"]
    now = datetime.now(UTC).replace(microsecond=0)
    items = []
    for k in range(23):
        at = now - timedelta(minutes=k // 3)  # three at each instant: the uid breaks the tie
        items.append((f"m-{k:02d}", priced if k % 2 else unpriced, at, k))
    await send(api, account, items[:12])
    await send(api, account, items[12:])
    # another account's measurements are not this one's
    other = (await api.setup())["account"]
    await send(api, other, [("m-00", priced, now, 1)])

    def expected(keep: Any = lambda item: True) -> list[str]:
        return [uid for uid, _, _, _ in sorted((i for i in items if keep(i)),
                                               key=lambda i: (i[2], i[0]), reverse=True)]

    listed = await every_page(api, account, limit=4)
    assert [m["uid"] for m in listed] == expected()
    first = listed[0]
    assert first == {"uid": "m-02", "account": account, "meter": unpriced,
                     "timestamp": stamp(now), "data": {"gb": "2", "files": "1", "seconds": "1"},
                     "rated": False}
    assert {m["uid"]: m["rated"] for m in listed} == {
        uid: meter_code == priced for uid, meter_code, _, _ in items}

    assert [m["uid"] for m in await every_page(api, account, limit=5, meter=priced)] == \
        expected(lambda i: i[1] == priced)
    assert [m["uid"] for m in await every_page(api, account, limit=3, rated="false")] == \
        expected(lambda i: i[1] == unpriced)
    start, end = now - timedelta(minutes=5), now - timedelta(minutes=2)
    assert [m["uid"] for m in await every_page(api, account, scope="admin", limit=2,
                                               start=stamp(start), end=stamp(end))] == \
        expected(lambda i: start <= i[2] < end)
    assert [m["uid"] for m in await every_page(api, account, meter=unpriced, rated="true")] == []
    # a page as long as what is left ends the list with a cursor whose next page is empty
    page = await api.call("GET", f"/v1/accounts/{account}/measurements", scope="runtime",
                          params={"limit": 23})
    assert len(page["data"]) == 23 and page["next_cursor"] is not None
    last = await api.call("GET", f"/v1/accounts/{account}/measurements", scope="runtime",
                          params={"limit": 23, "cursor": page["next_cursor"]})
    assert last == {"data": [], "next_cursor": None}


async def test_bad_queries_are_refused_naming_the_field(api: Api) -> None:
    names, _, _ = await storage_setup(api)
    account = names["account"]
    path = f"/v1/accounts/{account}/measurements"
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (path, {"meter": "no-such-meter"}, 422, "query.meter"),
        (path, {"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, 422,
         "query.start"),
        (path, {"start": "yesterday"}, 422, "query.start"),
        (path, {"end": "2026-01-01T00:00:00"}, 422, "query.end"),  # no offset
        (path, {"cursor": "not-a-cursor"}, 422, "query.cursor"),
        (path, {"limit": 0}, 422, "query.limit"),
        (path, {"limit": 501}, 422, "query.limit"),
        (path, {"rated": "perhaps"}, 422, "query.rated"),
        (path, {"uid": "m-1"}, 422, "query.uid"),
        ("/v1/accounts/no-such-account/measurements", {}, 404, "code"),
    ]
    for url, params, status, field in cases:
        problem = await api.call("GET", url, scope="runtime", params=params, expect=status)
        assert problem["field"] == field, (params, problem)


async def test_measurements_at_one_instant_are_paged_by_uid(api: Api) -> None:
    names, priced, _ = await storage_setup(api)
    account = names["account"]
    now = datetime.now(UTC).replace(microsecond=0)
    for k in (3, 0, 5, 1, 4, 2):  # stored in another order than their uids'
        await send(api, account, [(f"t-{k}", priced, now, k)])
    assert [m["uid"] for m in await every_page(api, account, limit=2)] == \
        [f"t-{k}" for k in (5, 4, 3, 2, 1, 0)]
