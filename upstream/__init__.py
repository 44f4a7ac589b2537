"""hq's clients of an upstream server: what a local hq will ask on a miss (issue 14). Today
the OEHASHEQUIV upstreams (``unix://``, ``HOST:PORT``, ``ws://``, ``wss://``), batched
through the stream modes; not yet wired into the stack (no ``--upstream`` option yet)."""
