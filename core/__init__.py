"""hq: a hash-equivalence server for BitBake builds, on ZeroMQ."""

__version__ = "0.2.0"
