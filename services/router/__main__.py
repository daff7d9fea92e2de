"""Run the router: `python -m services.router`."""

from __future__ import annotations

from services.access.settings import AccessSettings
from services.common.http import serve
from services.common.logging import configure_logging
from services.router.app import create_app
from services.router.settings import Settings


def main() -> None:
    """Read settings, configure logging, serve the router until SIGTERM."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    serve(create_app(settings, AccessSettings()), settings.host, settings.port)


if __name__ == "__main__":
    main()
