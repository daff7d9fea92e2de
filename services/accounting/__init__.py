"""Accounting: consumes `UsageRecorded` and keeps an exact, idempotent token ledger in SQL."""
