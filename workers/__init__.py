"""hq workers: single-threaded processes that answer the broker's jobs from SQLite."""
