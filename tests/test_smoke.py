from tests.conftest import Api


async def test_grant_check_usage_balance(api: Api) -> None:
    names = await api.setup()
    acct, product = names["account"], names["api"]
    assert (await api.check(acct, product))["reason"] == "no_eligible_balance"
    await api.grant(acct, "10.00")
    check = await api.check(acct, product, amount="2.50")
    assert check == {"allowed": True, "reason": "ok", "available": "10.00",
                     "credit_type": names["credit_type"], "consumed": False, "duplicate": False}
    result = await api.usage(acct, product, "2.50")
    assert result["status"] == "accepted" and result["available"] == "7.50"
    assert await api.available(acct) == "7.50"
