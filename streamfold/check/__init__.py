"""Floor 3: checks. ``verify`` re-plans and checks an output against the same task records
(``taskcheck``, with reference values from ``oracle``); ``forward*`` is the numpy forward pass."""
