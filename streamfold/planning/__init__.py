"""Floor 2: from headers, rules and norm vectors to a plan (every norm, its consumers, its fate) and
to tasks (one JSON-able record per output shard). Pure functions of their inputs."""
