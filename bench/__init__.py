"""hq-bench: benchmark workloads against a real hq stack (``hq-bench --help``).

A benchmark is a program, not a test (STYLE.md §12): each workload starts a fresh
``hq-server`` on a pre-populated database, runs its clients as separate processes, checks
every answer, and prints min/median/max of the repeats as a table (``--json FILE`` writes
the raw repeats, the configuration and the machine).

Modules: :mod:`cli` (options, repeats, output), :mod:`workloads` (which clients run and
what each workload reports), :mod:`jobs` (each client's timed loop and answer checks),
:mod:`clients` (forking, releasing and collecting the client processes), :mod:`runner`
(one repeat: stack, clients, server CPU/RSS, database size), :mod:`keys` (deterministic
hashes and expected answers), :mod:`populate` (bulk-loading the database before the
stack starts), :mod:`stack` (hq-server and its processes), :mod:`metrics` (percentiles,
min/median/max), :mod:`table` (tabulate), :mod:`machine`, :mod:`progress`,
:mod:`summary` (one table over many JSON results).
"""
