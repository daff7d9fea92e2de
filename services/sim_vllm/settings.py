"""Simulator settings (env prefix FIRST_SIM_VLLM_, or options: `--tokens-per-s 500`)."""

from __future__ import annotations

from pydantic import Field, PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.sim_vllm.faults import Faults


class Settings(BaseSettings):
    """How the simulated vLLM behaves; the fault fields are its faults at start."""

    model_config = SettingsConfigDict(
        env_prefix="FIRST_SIM_VLLM_",
        extra="ignore",
        cli_kebab_case=True,
        cli_prog_name="first sim-vllm",
        cli_implicit_flags=True,
        use_attribute_docstrings=True,
    )

    model: str = "sim"
    """The served model name (vLLM's --served-model-name)."""
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=0, le=65535)
    uds: str = ""
    """A Unix socket to listen on instead of host and port (vLLM's --uds)."""
    tokens_per_s: float = Field(default=200.0, gt=0)
    """Generation speed of each request."""
    ttft_ms: float = Field(default=20.0, ge=0)
    """Time from admission to the first token (prefill)."""
    slots: int = Field(default=256, ge=1)
    """Requests generated at once (vLLM's --max-num-seqs); the rest wait."""
    max_model_len: int = Field(default=2048, ge=2)
    default_max_tokens: int = Field(default=16, ge=1)
    embedding_dimensions: int = Field(default=384, ge=1)
    version: str = "0.11.0"
    """What GET /version reports."""
    fail_nth: list[PositiveInt] = Field(default_factory=list)
    fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    close_after_tokens: int | None = Field(default=None, ge=0)
    stall_after_tokens: int | None = Field(default=None, ge=0)
    stall_limit_s: float = Field(default=300.0, gt=0)
    """Bound on a stall: the connection is closed after this long if the client stays."""
    seed: int = 0
    """Seed of the fail_rate draws."""
    log_level: str = "INFO"
    log_json: bool | None = None
    """JSON logs; None means JSON when stderr is not a TTY."""

    def faults(self) -> Faults:
        """Return the faults to start with."""
        return Faults(
            fail_nth=self.fail_nth,
            fail_rate=self.fail_rate,
            close_after_tokens=self.close_after_tokens,
            stall_after_tokens=self.stall_after_tokens,
        )
