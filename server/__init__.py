"""hq-server: a whole local stack (one broker, N workers) in the foreground."""
