"""The tree's boundaries: services meet only through the broker and Redis, and the role
packages they share stay free of what they must not hold (read from the sources' imports)."""

from __future__ import annotations

import ast

import pytest

from tests.sources import ROOT, parse, python_files

SERVICES = ("gateway", "router", "site_agent", "accounting")


def imports_of(package: str) -> dict[str, set[str]]:
    """Return, per module file of `services/<package>`, the modules it imports."""
    found: dict[str, set[str]] = {}
    for path in python_files(ROOT / "services" / package):
        names: set[str] = set()
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """Return `module: import` for every import of `package` under one of `forbidden`."""
    return sorted(
        f"{module}: {name}"
        for module, names in imports_of(package).items()
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def test_no_router_module_imports_the_gateway() -> None:
    assert offenders("router", ("services.gateway",)) == []


@pytest.mark.parametrize("service", ["router", "site_agent", "accounting"])
def test_a_service_imports_no_other_service(service: str) -> None:
    others = tuple(f"services.{name}" for name in SERVICES if name != service)
    assert offenders(service, others) == []


def test_access_holds_no_http_and_no_broker_and_no_service() -> None:
    forbidden = (
        "fastapi",
        "starlette",
        "faststream",
        "aio_pika",
        "aiormq",
        *(f"services.{name}" for name in SERVICES),
    )
    assert offenders("access", forbidden) == []


def test_every_package_ships_in_a_wheel() -> None:
    """`pip install .` (the compose image) finds packages by their __init__.py: a folder of
    modules without one would be left out of the image and work only from a checkout."""
    folders = {path.parent for path in python_files(ROOT / "services")}
    folders |= {path.parent for path in python_files(ROOT / "schemas")}
    assert (
        sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()) == []
    )
