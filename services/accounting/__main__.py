"""Run the accounting service: `python -m services.accounting`."""

from __future__ import annotations

from services.accounting.app import create_app
from services.accounting.settings import Settings
from services.common.http import serve
from services.common.logging import configure_logging


def main() -> None:
    """Read settings from the environment, configure logging and serve until stopped."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    serve(create_app(settings), settings.host, settings.port)


if __name__ == "__main__":
    main()
