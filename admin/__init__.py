"""hq-admin: operate an hq service through its broker (statistics, health, database care)."""
