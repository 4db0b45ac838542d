"""Event types creditgate emits. Payload: {type, timestamp, data}; amounts are strings and
every account event carries the billing root's `sequence` so receivers can order them."""

from __future__ import annotations

EVENT_TYPES: dict[str, str] = {
    "credits.granted": "a balance was granted (or a purchase's credits became drawable)",
    "credits.voided": "what remained of a balance was voided",
    "credits.expired": "what remained of a balance expired",
    "credits.expiring": "a balance expires within the notice period (CREDITGATE_EXPIRY_NOTICE_D "
                        "days) with credit left: once per balance",
    "credits.clawed_back": "a partial refund of a purchase took its share of the purchased "
                           "credits back (what was already spent is owed as overage)",
    "credits.rolled_over": "what a recurring grant's period left unused (within its rollover "
                           "terms) was added to the next period's balance",
    "overage.settled": "a payment of what an account owed (its overage) was recorded",
    "balance.low": "an account's drawable balance of a credit type fell below its threshold",
    "balance.depleted": "eligible credit for a product reached zero",
    "balance.recovered": "eligible credit for a product is above zero again",
    "entitlement.revoked": "check now denies the product (credit exhausted)",
    "entitlement.granted": "check allows the product again",
    "payment.succeeded": "a credit purchase was paid",
    "payment.failed": "a credit purchase's payment failed",
    "auto_recharge.succeeded": "an auto-recharge was paid: credits bought and the new balance",
    "auto_recharge.failed": "an auto-recharge was not paid (declined, or a guard), with the reason",
    "auto_recharge.disabled": "auto-recharge was turned off after a failed payment, with the reason",
    "bill.finalized": "the bill run wrote an account plan's bill for a closed period",
    "bill.settled": "what a bill's charges drew is all in the ledger: its final split into "
                    "`covered` (by credit) and `overage` (owed), with its `charges_total`",
    "webhook_endpoint.disabled": "an endpoint was disabled: it answered 410, or failed for five days",
    "webhook.test": "sent by `creditgate webhooks send-test`",
}
