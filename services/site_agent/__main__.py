"""Run a site agent: `python -m services.site_agent`."""

from __future__ import annotations

from services.common.http import serve
from services.common.logging import configure_logging
from services.site_agent.app import create_app
from services.site_agent.settings import Settings


def main() -> None:
    """Read settings, configure logging, serve the agent until SIGTERM."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    serve(create_app(settings), settings.host, settings.port)


if __name__ == "__main__":
    main()
