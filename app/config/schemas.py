"""Bodies of the configuration API: accounts, products, credit types."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.schemas import Code, Email, Integer, ListQuery, Name, Page, Strict

Status = Literal["active", "blocked"]


class CreditTypeIn(Strict):
    code: Code
    name: Name
    kind: Literal["fiat", "custom"]
    decimal_places: Integer = Field(ge=0, le=9, description="fixed once created")


class CreditTypePatch(Strict):
    name: Name


class CreditTypeOut(BaseModel):
    code: str
    name: str
    kind: str
    decimal_places: int
    created_at: datetime
    updated_at: datetime


class ProductIn(Strict):
    code: Code
    name: Name


class ProductPatch(Strict):
    name: Name


class ProductOut(BaseModel):
    code: str
    name: str
    created_at: datetime
    updated_at: datetime


class AccountIn(Strict):
    code: Code
    name: Name
    email: Email | None = None
    parent: Code | None = Field(default=None, description="parent account code; fixed once set")
    status: Status = "active"
    credit_type: Code | None = Field(
        default=None, description="default credit type of check and usage; inherited by children"
    )


class AccountPatch(Strict):
    name: Name | None = None
    email: Email | None = None
    status: Status | None = None
    credit_type: Code | None = None


class AccountOut(BaseModel):
    code: str
    name: str
    email: str | None
    parent: str | None
    status: str
    credit_type: str | None
    created_at: datetime
    updated_at: datetime


class CreditTypePage(Page[CreditTypeOut]):
    pass


class ProductPage(Page[ProductOut]):
    pass


class AccountPage(Page[AccountOut]):
    pass


class AccountListQuery(ListQuery):
    email: Email | None = Field(default=None, description="accounts with this email (any case)")
    status: Status | None = None
    parent: Code | None = Field(default=None, description="the children of this account")
