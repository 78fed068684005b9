"""The chatqueue development LLM: an OpenAI-compatible test server with canned answers.

``python -m devllm`` runs it; :mod:`devllm.server` documents its routes and the
model-string syntax that makes it misbehave on demand; :mod:`devllm.answers`
computes its deterministic answers; :class:`devllm.testing.DevLLM` runs it for
tests. This module imports nothing, so ``python -m devllm`` can monkey-patch
with gevent before anything else is loaded.
"""
