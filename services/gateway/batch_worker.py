"""The batch worker: the one component that moves batches (`first batch-worker`).

Each round it takes every open batch one step:
- validating: re-check the input file, load its lines into SQL (pending), -> in_progress;
- in_progress: expire it at `expires_at`; else publish pending lines up to the batch's window
  (request_id written before the publish, so a restart republishes the same id); when no line
  is open any more -> finalizing -> write the output/error files -> completed;
- cancelling: publish nothing; once no line is in flight (or after the grace, cancelling the
  rest at their sites) the open lines end `batch_cancelled` -> files -> cancelled.
Results arrive as `Reply`s on `first.batch.results` (`on_reply`), and the sweeper reads the
Redis stream of a line that has waited long without one (the stream is the source of truth),
republishing a line whose stream is still empty after a longer bound (its message may be lost).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas import names
from schemas.records import Reply
from services.access.errors import ApiError
from services.access.settings import AccessSettings, CatalogueModel
from services.common import replies, topology
from services.common.broker import publish
from services.common.ids import new_request_id
from services.gateway import batch_db
from services.gateway.batch_db import BatchRow, LineRow
from services.gateway.batch_input import InputFile, parse_input
from services.gateway.batch_lines import line_job, owner, spent_budget
from services.gateway.batch_objects import (
    result_file_id,
    result_files,
    result_of,
    validation_errors,
)
from services.gateway.filestore import FileStore
from services.gateway.inference import cancel
from services.gateway.settings import Settings

logger = logging.getLogger(__name__)
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
SWEEP_LIMIT = 500
EXPIRED_MESSAGE = "The batch expired before this request ran."


@dataclass
class BatchWorker:
    settings: Settings
    access: AccessSettings
    broker: RabbitBroker
    redis: Redis
    engine: AsyncEngine
    store: FileStore

    def __post_init__(self) -> None:
        # Built once: every published line looks its model up here.
        self.catalogue: dict[str, CatalogueModel] = {m.name: m for m in self.access.models}

    async def round(self) -> None:
        """Take every open batch one step, then sweep lines that waited long for a reply."""
        for batch in await batch_db.batches_in(self.engine, OPEN):
            await self.step(batch)
        await self.sweep()

    async def step(self, batch: BatchRow) -> None:
        if batch.status == "validating":
            await self._load(batch)
        elif batch.status == "in_progress":
            await self._advance(batch)
        elif batch.status == "finalizing":
            await self._finish(batch, "completed")
        elif batch.status == "cancelling":
            await self._cancel(batch)

    async def _load(self, batch: BatchRow) -> None:
        now = time.time()
        if not await batch_db.has_lines(self.engine, batch.batch_id):
            parsed = await self._input(batch)
            if parsed is None:
                return
            items = [(line.line, line.custom_id, line.body) for line in parsed.lines]
            await batch_db.insert_lines(self.engine, batch.batch_id, items)
        await batch_db.update_batch(
            self.engine,
            batch.batch_id,
            only_if=("validating",),
            status="in_progress",
            in_progress_at=now,
        )
        logger.info("batch %s in progress (%d lines)", batch.batch_id, batch.total)

    async def _input(self, batch: BatchRow) -> InputFile | None:
        """Return the input file's lines, or fail the batch (file gone, or no longer valid)."""
        try:
            data = await self.store.get(batch.input_file_id)
            source = await batch_db.get_file(self.engine, batch.input_file_id)
            if source is None:
                raise FileNotFoundError(batch.input_file_id)
            return parse_input(data, self.settings.batch_max_lines, lambda _e, _b: None)
        except FileNotFoundError:
            errors = validation_errors("file_not_found", "The input file no longer exists.")
        except ApiError as exc:
            errors = validation_errors(exc.code or "invalid_file", exc.message)
        await batch_db.update_batch(
            self.engine,
            batch.batch_id,
            only_if=("validating",),
            status="failed",
            failed_at=time.time(),
            errors=errors,
        )
        return None

    async def _advance(self, batch: BatchRow) -> None:
        now = time.time()
        if batch.expires_at is not None and now >= batch.expires_at:
            await self._end_open(batch, "batch_expired", EXPIRED_MESSAGE)
            await self._finish(batch, "expired")
            return
        in_flight = await batch_db.lines_in(self.engine, batch.batch_id, "published")
        room = self.settings.batch_window - len(in_flight)
        pending = await batch_db.lines_in(self.engine, batch.batch_id, "pending", max(room, 0))
        if pending:
            spent = await spent_budget(self.redis, owner(batch), self.access)
            if spent is not None:
                await batch_db.end_lines(
                    self.engine,
                    batch.batch_id,
                    ("pending",),
                    code="insufficient_quota",
                    message=spent,
                    now=now,
                )
                return
        for line in pending:
            await self._publish_new(batch, line)
        if (
            not pending
            and not in_flight
            and await batch_db.update_batch(
                self.engine,
                batch.batch_id,
                only_if=("in_progress",),
                status="finalizing",
                finalizing_at=now,
            )
        ):
            await self._finish(batch, "completed")

    async def _publish_new(self, batch: BatchRow, line: LineRow) -> None:
        request_id = new_request_id()
        job = line_job(batch, line.body, request_id, self.catalogue, names.BATCH_RESULTS_QUEUE)
        if job is None:
            await batch_db.end_lines_by_no(
                self.engine,
                batch.batch_id,
                line.line_no,
                code="model_not_found",
                message="The line's model is no longer offered.",
                now=time.time(),
            )
            return
        # Stored before it is published: a crash in between republishes this same id.
        if await batch_db.assign(
            self.engine, batch.batch_id, line.line_no, request_id, time.time()
        ):
            await self._send(job)

    async def _send(self, job: Any) -> None:
        await publish(
            self.broker,
            job,
            exchange=topology.REQUESTS,
            routing_key=names.request_routing_key(job.priority),
            timeout=self.settings.publish_timeout_s,
            message_id=job.request_id,
        )

    async def _cancel(self, batch: BatchRow) -> None:
        in_flight = await batch_db.lines_in(self.engine, batch.batch_id, "published")
        since = batch.cancelling_at or time.time()
        if in_flight and time.time() < since + self.settings.batch_cancel_grace_s:
            return
        await self._end_open(batch, "batch_cancelled", "The batch was cancelled before this ran.")
        await self._finish(batch, "cancelled")

    async def _end_open(self, batch: BatchRow, code: str, message: str) -> None:
        ended = await batch_db.end_lines(
            self.engine,
            batch.batch_id,
            ("pending", "published"),
            code=code,
            message=message,
            now=time.time(),
        )
        for request_id in ended:  # still generating somewhere: stop it (what ran is billed)
            await cancel(self.redis, request_id)

    async def _finish(self, batch: BatchRow, status: str) -> None:
        """Write the output and error files (same ids if redone), then end the batch."""
        lines = await batch_db.all_lines(self.engine, batch.batch_id)
        out, err = result_files(batch.batch_id, lines)
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for field, kind, data in (
            ("output_file_id", "output", out),
            ("error_file_id", "error", err),
        ):
            if not data:
                continue
            file_id = result_file_id(batch.batch_id, kind)
            await self.store.put(file_id, data)
            await batch_db.insert_file(
                self.engine,
                batch_db.FileRow(
                    file_id=file_id,
                    user_id=batch.user_id,
                    filename=f"{batch.batch_id}_{kind}.jsonl",
                    purpose="batch_output",
                    bytes=len(data),
                    created_at=time.time(),
                ),
            )
            ids[field] = file_id
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}
        await batch_db.update_batch(
            self.engine,
            batch.batch_id,
            only_if=OPEN,
            status=status,
            **{stamp[status]: time.time()},
            **ids,
        )
        logger.info("batch %s %s", batch.batch_id, status)

    async def on_reply(self, reply: Reply) -> bool:
        """Write a line's result (once); False if no open line has this request_id."""
        status, body = result_of(reply)
        now = time.time()
        if not 200 <= status < 300 and await batch_db.record_expired(
            self.engine, reply.request_id, message=EXPIRED_MESSAGE, now=now
        ):
            return True
        return await batch_db.record_result(
            self.engine, reply.request_id, status_code=status, response=body, now=now
        )

    async def sweep(self) -> None:
        """Read the streams of lines without a reply for long; republish the ones still empty."""
        now = time.time()
        stale = await batch_db.stale_lines(
            self.engine, now - self.settings.batch_sweep_after_s, SWEEP_LIMIT
        )
        for line in stale:
            request_id = cast(str, line.request_id)
            reply = await replies.read_reply(self.redis, request_id)
            if reply is not None:
                await self.on_reply(reply)
                continue
            old = (line.published_at or 0) < now - self.settings.batch_republish_after_s
            if old and not await self.redis.exists(names.stream_key(request_id)):
                await self._republish(line, request_id)

    async def _republish(self, line: LineRow, request_id: str) -> None:
        batch = await batch_db.get_batch(self.engine, line.batch_id)
        if batch is None or batch.status not in ("in_progress", "cancelling"):
            return
        job = line_job(batch, line.body, request_id, self.catalogue, names.BATCH_RESULTS_QUEUE)
        if job is None:
            return
        logger.warning("republishing batch line %s (no reply, empty stream)", request_id)
        await batch_db.touch(self.engine, request_id, time.time())
        await self._send(job)
