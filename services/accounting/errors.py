"""Errors of the accounting service.

    AccountingError            base of everything this package raises on purpose
     ├── LedgerUnavailable     the database could not be reached or refused a statement;
     │                         transient: the consumer retries, then requeues the event
     ├── UnsupportedDatabase   the URL names neither SQLite nor PostgreSQL (at start)
     └── InvalidReport         a report asked for an unknown grouping or format;
                               also a ValueError, so an HTTP edge answers 400

An event that cannot be decoded is not an error of this package: the consumer rejects it
to `first.dead` when `schemas.codec.DecodeError` says so.
"""

from __future__ import annotations


class AccountingError(Exception):
    """Base of the accounting service's errors."""


class LedgerUnavailable(AccountingError):
    """The ledger's database could not complete a statement (retry later)."""


class UnsupportedDatabase(AccountingError):
    """The ledger cannot run on this kind of database (a configuration error)."""


class InvalidReport(AccountingError, ValueError):
    """A report was asked for with an unknown grouping or output format."""
