"""Contracts shared by every FIRST service: messages, stream records and names."""
