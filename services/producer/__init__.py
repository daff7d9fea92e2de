"""Publish requests straight to the queue (`first.ingress`) and read their results from Redis."""
