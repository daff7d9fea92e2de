"""Run the gateway: `python -m services.gateway` or `first gateway`."""

from __future__ import annotations

from services.access.settings import AccessSettings
from services.common.http import serve
from services.common.logging import configure_logging
from services.gateway.app import create_app
from services.gateway.settings import Settings


def main() -> None:
    """Read settings from the environment and serve until stopped."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    serve(create_app(settings, AccessSettings()), settings.host, settings.port)


if __name__ == "__main__":
    main()
