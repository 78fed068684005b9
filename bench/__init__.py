"""Benchmarks of chatqueue that print their figures (they are not tests).

``.venv/bin/python -m bench [--quick]`` runs them all in one run and prints
one table (see :mod:`bench.run`). They start their processes and brokers with
:mod:`chatqueue_testing`, as the tests do; :mod:`bench.tools` holds what only
the benchmarks use (figures, signals, an ``asyncio`` HTTP reader).
"""
