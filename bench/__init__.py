"""Benchmarks of chatqueue that print their figures (they are not tests).

Run one with ``.venv/bin/python -m bench.bench_worker [--quick]``. Each starts
its own development LLM and chatqueue processes from the Procfile, on queue
names of its own run, and removes them when it ends (Ctrl-C, SIGTERM and SIGHUP included).
"""
