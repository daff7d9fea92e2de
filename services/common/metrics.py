"""Series computed when Prometheus scrapes, from the live state of a running app."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

T = TypeVar("T")


class ScrapeCollector(Collector, Generic[T]):
    """Compute families at scrape time from the newest attached source (e.g. a site registry).

    `build(None)` must return the same families, without samples: it describes the
    collector and answers scrapes while no app is running. An app attaches its source when
    it starts and detaches it when it stops; when several run in one process (tests), the
    newest one is reported.
    """

    def __init__(self, build: Callable[[T | None], list[Metric]]) -> None:
        self._build = build
        self._sources: list[T] = []

    def attach(self, source: T) -> None:
        """Report `source` from now on."""
        self._sources.append(source)

    def detach(self, source: T) -> None:
        """Stop reporting `source` (the one attached before it, if any, is reported again)."""
        with contextlib.suppress(ValueError):
            self._sources.remove(source)

    def describe(self) -> Iterable[Metric]:
        return self._build(None)

    def collect(self) -> Iterable[Metric]:
        return self._build(self._sources[-1] if self._sources else None)
