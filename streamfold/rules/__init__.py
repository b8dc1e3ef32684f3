"""Floor 1: the architecture rules as data (``families/*.toml``), their schema and loader, and the
``{n}``/``{e}`` pattern matching shared by the planner, detect and derive."""
