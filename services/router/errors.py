"""Errors of the router. They travel as data: error records in the request's stream.

    ErrorInfo (schemas.records), written as Failure + Final(outcome="failed")
     ├── 503 service_unavailable / no_site_available   no live site had the model hot in time
     └── 502 server_error / dead_lettered               the broker gave up on the request

The router raises nothing of its own: a failed publish is nacked (requeued, bounded by the
queue's delivery limit), an undecodable message is rejected to the dead-letter exchange.
"""

from __future__ import annotations

from schemas.records import ErrorInfo


def no_site_available(model: str, waited_s: float) -> ErrorInfo:
    """Return the error of a request no live site could take."""
    return ErrorInfo(
        status=503,
        type="service_unavailable",
        code="no_site_available",
        message=(
            f"No site is serving model '{model}' right now (waited {waited_s:.1f} s); retry later."
        ),
    )


def dead_lettered(reason: str) -> ErrorInfo:
    """Return the error of a request the broker dead-lettered."""
    return ErrorInfo(
        status=502,
        type="server_error",
        code="dead_lettered",
        message=f"The request could not be delivered for processing ({reason}).",
    )
