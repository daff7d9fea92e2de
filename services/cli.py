"""The `first` command: run a service, the development stack, or an operator task."""

from __future__ import annotations

from typing import Annotated, Any

import typer

app = typer.Typer(
    help="FIRST: OpenAI-compatible inference on HPC clusters over a message queue.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def gateway() -> None:
    """Run the HTTP gateway (settings: FIRST_GATEWAY_*)."""
    from services.gateway.__main__ import main

    main()


@app.command()
def router() -> None:
    """Run the router (settings: FIRST_ROUTER_*)."""
    from services.router.__main__ import main

    main()


@app.command("site-agent")
def site_agent() -> None:
    """Run a site agent (settings: FIRST_SITE_AGENT_*)."""
    from services.site_agent.__main__ import main

    main()


@app.command()
def accounting() -> None:
    """Run the accounting service (settings: FIRST_ACCOUNTING_*)."""
    from services.accounting.__main__ import main

    main()


@app.command("batch-worker")
def batch_worker() -> None:
    """Run the batch worker, which runs every batch (settings: FIRST_GATEWAY_*)."""
    from services.gateway.batch_service import main

    main()


@app.command()
def dev() -> None:
    """Run the whole stack in the foreground with two vLLM-CPU backends (Ctrl-C stops it)."""
    from services.devstack.__main__ import main

    main()


@app.command("sim-vllm")
def sim_vllm(
    model: Annotated[str | None, typer.Option(help="Served model name (default sim).")] = None,
    host: Annotated[str | None, typer.Option(help="Interface (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8100).")] = None,
    tokens_per_s: Annotated[
        float | None, typer.Option(help="Tokens/s per request (default 200).")
    ] = None,
    ttft_ms: Annotated[float | None, typer.Option(help="Time to first token (default 20).")] = None,
    slots: Annotated[
        int | None, typer.Option(help="Requests generated at once (default 256).")
    ] = None,
    max_model_len: Annotated[
        int | None, typer.Option(help="Context length (default 2048).")
    ] = None,
    fail_nth: Annotated[
        list[int] | None, typer.Option(help="Answer request N with a 500 (repeatable).")
    ] = None,
    close_after_tokens: Annotated[
        int | None, typer.Option(help="Close each stream abruptly after K tokens.")
    ] = None,
    stall_after_tokens: Annotated[
        int | None, typer.Option(help="Stall each stream after K tokens.")
    ] = None,
) -> None:
    """Run the simulated vLLM server (settings: FIRST_SIM_VLLM_*; options override them)."""
    from services.sim_vllm.__main__ import main
    from services.sim_vllm.settings import Settings

    given: dict[str, Any] = {
        "model": model,
        "host": host,
        "port": port,
        "tokens_per_s": tokens_per_s,
        "ttft_ms": ttft_ms,
        "slots": slots,
        "max_model_len": max_model_len,
        "fail_nth": fail_nth,
        "close_after_tokens": close_after_tokens,
        "stall_after_tokens": stall_after_tokens,
    }
    main(Settings(**{name: value for name, value in given.items() if value is not None}))


@app.command("fake-globus")
def fake_globus(
    client_id: Annotated[str, typer.Option(help="The gateway's confidential client id.")],
    client_secret: Annotated[str, typer.Option(help="Its secret.")],
    host: Annotated[str, typer.Option(help="Interface (loopback only by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8040,
) -> None:
    """Run a local Globus Auth + Groups stand-in for tests and the demo (never in production)."""
    import uvicorn

    from services.devstack.fake_globus import create_app

    app_ = create_app(client_id, client_secret)
    uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False)


def _register_subapps() -> None:
    from services.access.keys_cli import keys_app
    from services.accounting.cli import usage_app
    from services.common.rabbit_cli import rabbit_app
    from services.common.redis_cli import redis_app
    from services.gateway.batch_cli import batch_app
    from services.producer.cli import queue_app
    from services.site_agent.supervise_cli import sites_app

    app.add_typer(usage_app, name="usage", help="Usage reports from the ledger.")
    app.add_typer(batch_app, name="batch", help="Submit batch files and follow their batches.")
    app.add_typer(keys_app, name="keys", help="Create, list and revoke API keys.")
    app.add_typer(queue_app, name="queue", help="Publish requests straight to the queue.")
    app.add_typer(sites_app, name="sites", help="Run site agents on Globus Compute endpoints.")
    app.add_typer(rabbit_app, name="rabbit", help="RabbitMQ topology and least-privilege users.")
    app.add_typer(redis_app, name="redis", help="Least-privilege Redis users, per component.")


_register_subapps()
