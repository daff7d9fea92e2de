"""`first batch submit FILE`: upload a batch file, create the batch, follow it, download results.

It is a client of the gateway's HTTP API (what the `openai` SDK does, without needing it):
the credential is FIRST_API_KEY (an API key or a Globus access token). The output lines go
to `--out` (default FILE with `.output.jsonl`), failed lines to `--errors` (`.errors.jsonl`).
Ctrl-C stops following, not the batch: `first batch status ID` picks it up again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

batch_app = typer.Typer(no_args_is_help=True)
ENDED = ("completed", "failed", "expired", "cancelled")

BaseUrl = Annotated[
    str, typer.Option(envvar="FIRST_BASE_URL", help="The gateway's OpenAI base URL.")
]


class BatchClientError(RuntimeError):
    """The gateway refused a call (its OpenAI error message is in the text)."""


def _client(base_url: str, timeout_s: float) -> httpx.Client:
    credential = os.environ.get("FIRST_API_KEY", "")
    if not credential:
        raise typer.BadParameter("set FIRST_API_KEY (an API key or a Globus access token)")
    return httpx.Client(
        base_url=base_url.rstrip("/"),
        headers={"authorization": f"Bearer {credential}"},
        timeout=timeout_s,
        trust_env=False,
    )


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise BatchClientError(f"{response.status_code}: {message}")
    body: dict[str, Any] = response.json()
    return body


def create_batch(http: httpx.Client, file: Path, endpoint: str) -> dict[str, Any]:
    """Upload `file` and create its batch; return the batch object."""
    with file.open("rb") as handle:
        upload = _json(
            http.post("/files", files={"file": (file.name, handle)}, data={"purpose": "batch"})
        )
    body = {"input_file_id": upload["id"], "endpoint": endpoint, "completion_window": "24h"}
    return _json(http.post("/batches", json=body))


def follow(http: httpx.Client, batch: dict[str, Any], poll_s: float) -> dict[str, Any]:
    """Show a progress bar until the batch ends; return its last state."""
    total = max(int(batch["request_counts"]["total"] or 0), 1)
    with typer.progressbar(length=total, label=batch["id"], file=None) as bar:
        shown = 0
        while batch["status"] not in ENDED:
            time.sleep(poll_s)
            batch = _json(http.get(f"/batches/{batch['id']}"))
            counts = batch["request_counts"]
            done = int(counts["completed"]) + int(counts["failed"])
            bar.update(done - shown)
            shown = done
    return batch


def download(http: httpx.Client, file_id: str | None, path: Path) -> int:
    """Write the file's content to `path`; return its line count (0 if there is no file)."""
    if file_id is None:
        return 0
    response = http.get(f"/files/{file_id}/content")
    if response.status_code >= 400:
        _json(response)
    path.write_bytes(response.content)
    return response.content.count(b"\n")


def _finish(http: httpx.Client, batch: dict[str, Any], out: Path, errors: Path) -> None:
    written = download(http, batch["output_file_id"], out)
    failed = download(http, batch["error_file_id"], errors)
    typer.echo(f"{batch['id']} {batch['status']}: {written} results in {out}", err=True)
    if failed:
        typer.echo(f"{failed} failed lines in {errors}", err=True)
    if batch["status"] != "completed":
        raise typer.Exit(1)


@batch_app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(help="JSONL of requests in OpenAI's batch format.")],
    base_url: BaseUrl = "http://127.0.0.1:8000/v1",
    endpoint: Annotated[str, typer.Option(help="The lines' endpoint.")] = "/v1/chat/completions",
    out: Annotated[Path | None, typer.Option(help="Results (default FILE.output.jsonl).")] = None,
    errors: Annotated[
        Path | None, typer.Option(help="Failed lines (default FILE.errors.jsonl).")
    ] = None,
    poll_s: Annotated[float, typer.Option(help="Seconds between progress checks.")] = 2.0,
    timeout_s: Annotated[float, typer.Option(help="Bound of each HTTP call.")] = 120.0,
) -> None:
    """Upload FILE, run it as a batch, show progress, and download its results."""
    try:
        with _client(base_url, timeout_s) as http:
            batch = create_batch(http, file, endpoint)
            typer.echo(f"created {batch['id']}", err=True)
            batch = follow(http, batch, poll_s)
            _finish(
                http,
                batch,
                out or file.with_suffix(".output.jsonl"),
                errors or file.with_suffix(".errors.jsonl"),
            )
    except (BatchClientError, httpx.HTTPError, OSError) as exc:
        typer.echo(f"{file}: {exc}", err=True)
        raise typer.Exit(1) from None


@batch_app.command("status")
def status(
    batch_id: Annotated[str, typer.Argument(help="The batch's id.")],
    base_url: BaseUrl = "http://127.0.0.1:8000/v1",
    timeout_s: Annotated[float, typer.Option(help="Bound of each HTTP call.")] = 30.0,
) -> None:
    """Print the batch object (OpenAI's JSON)."""
    try:
        with _client(base_url, timeout_s) as http:
            response = http.get(f"/batches/{batch_id}")
            _json(response)
            typer.echo(response.text)
    except (BatchClientError, httpx.HTTPError) as exc:
        typer.echo(f"{batch_id}: {exc}", err=True)
        raise typer.Exit(1) from None
