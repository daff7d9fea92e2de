"""HTTP routes of OpenAI's Files and Batches APIs (the batch worker runs what they create).

Decisions: a user sees and touches only their own files and batches — anyone else's is a 404,
as if it did not exist; an admin may read any by id. A file is refused at upload (400, the
first bad line named) rather than failing later in `validating`. Deleting an input file does
not stop a batch that already loaded its lines.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from schemas.messages import Endpoint
from services.access.errors import InvalidRequest, NotFound
from services.access.principal import Principal
from services.gateway import batch_db
from services.gateway.batch_input import URLS, parse_input
from services.gateway.batch_objects import (
    batch_object,
    file_object,
    new_batch_id,
    new_file_id,
)
from services.gateway.filestore import FileStore
from services.gateway.routes import GatewayDep, PrincipalDep

router = APIRouter()
CANCELLABLE = ("validating", "in_progress", "finalizing")
"""Where OpenAI allows a cancel (a finalizing batch that is cancelled ends `cancelled`)."""
UPLOAD_SLACK = 64 * 1024
"""Room for the multipart envelope around a file of the largest allowed size."""
_json = msgspec.json.Encoder()


def _store(request: Request) -> FileStore:
    store: FileStore = request.app.state.file_store
    return store


def _not_found(kind: str, ident: str) -> NotFound:
    return NotFound(f"No such {kind}: '{ident}'", code="not_found", param="id")


async def _own_file(gw: GatewayDep, principal: Principal, file_id: str) -> batch_db.FileRow:
    row = await batch_db.get_file(gw.engine, file_id)
    if row is None or (row.user_id != principal.user_id and not principal.is_admin):
        raise _not_found("file", file_id)
    return row


async def _upload(request: Request, limit: int) -> tuple[str, str, bytes]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + UPLOAD_SLACK:
        raise InvalidRequest(f"The file exceeds {limit} bytes.", code="file_too_large")
    form = await request.form(max_files=1, max_fields=8)
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("Send the file as the multipart field `file`.", param="file")
    if purpose != "batch":
        raise InvalidRequest("`purpose` must be `batch`.", param="purpose", code="invalid_purpose")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise InvalidRequest(f"The file exceeds {limit} bytes.", code="file_too_large")
    return upload.filename or "upload.jsonl", purpose, data


@router.post("/v1/files")
async def create_file(request: Request, gw: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    filename, purpose, data = await _upload(request, gw.settings.batch_max_file_bytes)

    def check_body(endpoint: Endpoint, body: bytes) -> None:
        gw.access.check(endpoint, body, principal)

    parsed = parse_input(data, gw.settings.batch_max_lines, check_body)
    row = batch_db.FileRow(
        file_id=new_file_id(),
        user_id=principal.user_id,
        filename=filename,
        purpose=purpose,
        bytes=len(data),
        created_at=time.time(),
        url=parsed.url,
        lines=len(parsed.lines),
    )
    await _store(request).put(row.file_id, data)
    await batch_db.insert_file(gw.engine, row)
    return file_object(row)


@router.get("/v1/files")
async def list_files(
    gw: GatewayDep, principal: PrincipalDep, purpose: str | None = None
) -> dict[str, Any]:
    rows = await batch_db.list_files(gw.engine, principal.user_id, purpose)
    return {"object": "list", "data": [file_object(r) for r in rows], "has_more": False}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, gw: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    return file_object(await _own_file(gw, principal, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(
    file_id: str, request: Request, gw: GatewayDep, principal: PrincipalDep
) -> Response:
    row = await _own_file(gw, principal, file_id)
    try:
        data = await _store(request).get(row.file_id)
    except FileNotFoundError:
        raise _not_found("file", file_id) from None
    return Response(data, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(
    file_id: str, request: Request, gw: GatewayDep, principal: PrincipalDep
) -> dict[str, Any]:
    row = await _own_file(gw, principal, file_id)
    await batch_db.delete_file(gw.engine, row.file_id)
    await _store(request).delete(row.file_id)
    return {"id": row.file_id, "object": "file", "deleted": True}


class CreateBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


_create_decoder = msgspec.json.Decoder(CreateBatch)


def _parse_create(body: bytes) -> CreateBatch:
    try:
        create = _create_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidRequest(f"Invalid request body: {exc}") from exc
    if create.endpoint not in URLS:
        raise InvalidRequest(
            f"`endpoint` must be one of {', '.join(URLS)}.", param="endpoint", code="invalid_value"
        )
    if create.completion_window != "24h":
        raise InvalidRequest(
            "`completion_window` must be `24h`.", param="completion_window", code="invalid_value"
        )
    if create.metadata is not None and len(create.metadata) > 16:
        raise InvalidRequest("`metadata` holds at most 16 pairs.", param="metadata")
    return create


async def _counts(gw: GatewayDep, row: batch_db.BatchRow) -> dict[str, Any]:
    return batch_object(row, await batch_db.line_counts(gw.engine, row.batch_id))


@router.post("/v1/batches")
async def create_batch(request: Request, gw: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    create = _parse_create(await request.body())
    source = await batch_db.get_file(gw.engine, create.input_file_id)
    if source is None or source.user_id != principal.user_id:
        raise _not_found("file", create.input_file_id)
    if source.purpose != "batch":
        raise InvalidRequest("The input file's purpose must be `batch`.", param="input_file_id")
    if source.url != create.endpoint:
        raise InvalidRequest(
            f"The file's requests are for {source.url}, not {create.endpoint}.", param="endpoint"
        )
    now = time.time()
    row = batch_db.BatchRow(
        batch_id=new_batch_id(),
        user_id=principal.user_id,
        username=principal.username,
        groups=_json.encode(list(principal.groups)).decode(),
        endpoint=create.endpoint,
        input_file_id=source.file_id,
        completion_window=create.completion_window,
        metadata=None if create.metadata is None else _json.encode(create.metadata).decode(),
        status="validating",
        total=source.lines,
        errors=None,
        output_file_id=None,
        error_file_id=None,
        created_at=now,
        expires_at=now + gw.settings.batch_expiry_s,
    )
    await batch_db.insert_batch(gw.engine, row)
    return batch_object(row, {})


async def _own_batch(gw: GatewayDep, principal: Principal, batch_id: str) -> batch_db.BatchRow:
    row = await batch_db.get_batch(gw.engine, batch_id)
    if row is None or (row.user_id != principal.user_id and not principal.is_admin):
        raise _not_found("batch", batch_id)
    return row


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, gw: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    return await _counts(gw, await _own_batch(gw, principal, batch_id))


@router.get("/v1/batches")
async def list_batches(
    gw: GatewayDep,
    principal: PrincipalDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    rows = await batch_db.list_batches(gw.engine, principal.user_id, after, limit + 1)
    page = [await _counts(gw, r) for r in rows[:limit]]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(rows) > limit,
    }


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, gw: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    row = await _own_batch(gw, principal, batch_id)
    if row.status in CANCELLABLE:
        await batch_db.update_batch(
            gw.engine,
            batch_id,
            only_if=CANCELLABLE,
            status="cancelling",
            cancelling_at=time.time(),
        )
    elif row.status not in ("cancelling", "cancelled"):
        raise InvalidRequest(
            f"Cannot cancel a batch that is {row.status}.", code="invalid_state", param="id"
        )
    return await _counts(gw, await _own_batch(gw, principal, batch_id))
