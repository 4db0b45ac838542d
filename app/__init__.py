"""creditgate: prepaid-credit entitlement gateway."""

import decimal

# Every number a request may carry has at most 36 significant digits (app/schemas.py: Amount),
# so the sums and products made of them are exact within 100; the default context's 28 digits
# rounded a long measure silently. Quotients keep their own, documented precision
# (app/rating/pricing.py: PRECISION). Set for this thread and for every context made later.
EXACT_DIGITS = 100
decimal.DefaultContext.prec = EXACT_DIGITS
decimal.getcontext().prec = EXACT_DIGITS
