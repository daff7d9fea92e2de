"""Run the simulated vLLM: `python -m services.sim_vllm --port 8100` or `first sim-vllm`."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import uvicorn
from pydantic_settings import CliApp

from services.common.http import serve
from services.common.logging import configure_logging
from services.sim_vllm.app import create_app
from services.sim_vllm.settings import Settings

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Read settings from command-line options, over FIRST_SIM_VLLM_* and the defaults."""
    return CliApp.run(Settings, cli_args=list(sys.argv[1:] if argv is None else argv))


def main(settings: Settings | None = None) -> None:
    """Serve until stopped; settings come from the command line unless given."""
    settings = settings or parse_settings()
    configure_logging(settings.log_level, settings.log_json)
    logger.info(
        "sim-vllm serving %s on %s (%.0f tok/s, %d slots)",
        settings.model,
        settings.uds or f"{settings.host}:{settings.port}",
        settings.tokens_per_s,
        settings.slots,
    )
    serve(create_app(settings), settings.host, settings.port, settings.uds or None)


@contextmanager
def running(settings: Settings) -> Iterator[str]:
    """Serve in a background thread (port 0 picks a free one); yield the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"sim-vllm-{port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"sim-vllm did not start on port {port}")
            time.sleep(0.01)
        yield f"http://{settings.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)
        sock.close()


if __name__ == "__main__":
    main()
