"""Benchmarks of chatqueue that print their figures (they are not tests).

``.venv/bin/python -m bench [--quick]`` runs them all in one run and prints
one table (see :mod:`bench.run`); :mod:`bench.harness` is the harness they
share with the tests.
"""
