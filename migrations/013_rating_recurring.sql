-- Real-time drawdown of counter pricings and plans' standing charges. Their charge for a
-- period is recomputed from what is known (the counter levels, the plan) instead of being
-- moved by deltas, so each of their rated_charges rows ("p<counter pricing id>",
-- "s<account plan id>") remembers the charge, in the plan's currency, that `exact` already
-- holds (converted). NULL on the rows of aggregation pricings, which do not use it.
ALTER TABLE rated_charges ADD COLUMN charged numeric;
