"""creditgate: prepaid-credit entitlement gateway."""
