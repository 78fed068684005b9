"""Real processes and brokers for the tests, the scripts and the benchmarks.

- :mod:`chatqueue_testing.harness`: a Procfile line as a process, waiting until
  it serves, a free port, plain HTTP and Server-Sent Events, queue clean-up;
- :mod:`chatqueue_testing.rabbitnode`: private RabbitMQ nodes and clusters
  beside the shared broker, to restart, kill or alarm.

It is not installed with chatqueue: it is imported from a checkout (pytest
and ``python -m bench`` put the checkout on ``sys.path``, and
``scripts/rabbitmq-cluster`` adds it).
"""
