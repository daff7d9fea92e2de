"""The README's Metrics table and the series the services (and the access package they share)
register say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY

import services.access.sealed
import services.accounting.metrics
import services.gateway.metrics
import services.router.metrics
import services.site_agent.metrics  # noqa: F401  (importing registers the series)

README = Path(__file__).resolve().parents[2] / "README.md"
_ROW = re.compile(r"^\| `(?P<name>first_\w+)` \|(?P<type>[^|]+)\|(?P<labels>[^|]*)\|")


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """Return name -> (type, labels) of each row of the README's Metrics table."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = _ROW.match(line)
        if match:
            kind = match["type"].split(",")[0].strip()
            labels = frozenset(re.findall(r"`(\w+)`", match["labels"]))
            rows[match["name"]] = (kind, labels)
    return rows


def registered() -> dict[str, tuple[str, frozenset[str]]]:
    """Return exposed name -> (type, labels) of every first_* family in the global registry."""
    out = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("first_"):
            continue
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels if label != "le"}
        out[name] = (family.type, frozenset(labels))
    return out


def test_every_series_is_documented_with_its_type_and_every_documented_one_exists() -> None:
    docs, real = documented(), registered()
    assert len(docs) >= 20
    assert sorted(docs) == sorted(real)
    for name, (kind, _labels) in real.items():
        assert docs[name][0] == kind, name


def test_documented_labels_are_the_labels_of_the_series_that_have_samples() -> None:
    docs, real = documented(), registered()
    for name, (_kind, labels) in real.items():
        if labels:  # a labelled family shows its labels once a child exists
            assert labels == docs[name][1], name


def test_each_service_names_its_series_after_itself() -> None:
    for name in registered():
        assert re.match(r"first_(gateway|router|site_agent|accounting|access)_", name), name
