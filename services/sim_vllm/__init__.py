"""A simulated vLLM OpenAI server: a test instrument and the benchmark backend of FIRST.

It answers like vLLM where FIRST depends on it (routes, SSE framing, chunk and error shapes,
usage, /metrics series) with deterministic text, paced tokens, a slot scheduler, abort on
disconnect, and faults that tests switch at run time.
"""
