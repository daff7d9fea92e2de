"""Messages on the broker: commands (imperative) and events (past tense).

Rules (STYLE.md): frozen, keyword-only, tagged; a message changes only by appending
fields with defaults; a breaking change is a new tag.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.names import Priority

Endpoint = Literal["chat.completions", "completions", "embeddings"]
ModelState = Literal["cold", "starting", "hot", "draining"]
Outcome = Literal["completed", "cancelled", "failed"]


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every broker message; the class name is the tag."""


class RunInference(Message, tag=True, frozen=True, kw_only=True):
    """Run one OpenAI request on a site and stream its records to `stream_key(request_id)`.

    `body` is the client's JSON body as validated at the edge; `expires_at` (epoch seconds)
    is when the gateway stops waiting, so nobody should start it after that.
    """

    request_id: str
    user_id: str
    username: str
    groups: tuple[str, ...] = ()
    model: str
    endpoint: Endpoint
    priority: Priority = "interactive"
    stream: bool = False
    include_usage: bool = False
    body: bytes
    created_at: float
    expires_at: float
    site_id: str = ""
    allowed_sites: tuple[str, ...] = ()
    """The catalogue's sites for this model; empty means any site that serves it."""
    reply_to: str = ""
    """A direct producer's reply queue (checked by the router to be the producer's own):
    the site agent also sends the request's `Reply` there. Empty: the stream only."""
    moved_from: str = ""
    """The site whose heartbeats stopped while this request waited or ran there: the router
    moved it. The new site waits out that site's claim (nobody renews it), then runs the
    request, or ends it with an error if tokens had already reached the client."""


class IngressRequest(Message, tag=True, frozen=True, kw_only=True):
    """A request a pipeline publishes straight to `first.ingress`.

    Its credential travels in the `names.CREDENTIAL_HEADER` header, never in the body; the
    router authenticates it exactly as the gateway would, applies the caller's limits, and
    only then turns it into a RunInference (without the credential). Results are read from
    `stream_key(request_id)`: the id must be unguessable (the producer API makes UUIDv7s).
    """

    request_id: str
    endpoint: Endpoint
    body: bytes
    """The OpenAI request body, JSON, as an HTTP client would POST it."""
    priority: Priority = "interactive"
    created_at: float = 0.0
    reply_to: str = ""
    """A queue named `names.reply_queue_prefix(<the publisher's RabbitMQ user>)` + anything, that
    the producer declared: its `Reply` goes there too (at least once). Empty: the stream only."""


class UsageRecorded(Message, tag=True, frozen=True, kw_only=True):
    """Tokens delivered for one request; the ledger keeps one row per request_id."""

    request_id: str
    user_id: str
    username: str
    model: str
    site_id: str
    endpoint: Endpoint
    priority: Priority = "interactive"
    prompt_tokens: int
    completion_tokens: int
    outcome: Outcome
    groups: tuple[str, ...] = ()
    """The caller's groups, whose shared token budgets the usage is charged to as well."""
    created_at: float
    finished_at: float


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One model's state on one site, read from its vLLM instances' /metrics."""

    model: str
    state: ModelState
    instances: int
    running: int
    waiting: int
    capacity: int
    kv_cache_usage: float = 0.0
    tokens_per_s: float = 0.0
    slots_per_instance: int = 0
    """Requests one instance takes at once: what starting one would add (cold models too)."""
    max_instances: int = 0
    """How many instances the site may run (0: only the ones it was given by URL)."""
    restarts: int = 0
    """Instances that died or never became healthy since the agent started."""
    last_error: str = ""
    """Why the last one did (empty if none did)."""


class SiteHeartbeat(Message, tag=True, frozen=True, kw_only=True):
    """A site agent's periodic statement of what it serves and how busy it is."""

    site_id: str
    agent_id: str
    sent_at: float
    """The agent's clock; a router clamps it to its own clock's skew window on receipt."""
    interval_s: float
    models: tuple[ModelStatus, ...] = ()
    received_at: float = 0.0
    """When a router received it (the router's clock), stamped by that router before it keeps
    or mirrors it; 0 as an agent sends it. Liveness is judged by it, never by `sent_at`: a
    heartbeat dated in the future must not keep a site live."""


class StartModel(Message, tag=True, frozen=True, kw_only=True):
    """A router asks a site to bring a model up (requests for it are on their way)."""

    site_id: str
    model: str
    requested_at: float
    keep_s: float = 300.0
    """Keep at least one instance (starting or hot) this long even without requests."""


class StopModel(Message, tag=True, frozen=True, kw_only=True):
    """An operator or router asks a site to drain and stop a model's instances."""

    site_id: str
    model: str
    requested_at: float


ControlMessage = StartModel | StopModel

AnyMessage = RunInference | IngressRequest | UsageRecorded | SiteHeartbeat | StartModel | StopModel
