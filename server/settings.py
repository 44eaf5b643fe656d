"""Server settings: one pydantic-settings model, filled from flags and ``LOOPSERVE_*`` variables.

Flags win over the environment, the environment over the defaults, so a container can be
configured without touching its command line.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.default import DEFAULT_SPEC as DEFAULT_MODEL

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_size(value: object) -> int:
    """Bytes from ``512MiB``, ``2G``, ``1.5gib`` or a plain integer (binary and SI units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE.match(str(value))
        if m is None:
            raise ValueError(f"not a size: {value!r} (examples: 512MiB, 2GiB, 1000000)")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return size


class ServeConfigError(ValueError):
    """Settings that cannot serve this model (the message says which and why)."""


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class ServeSettings(BaseSettings):
    """Everything ``loopserve serve`` can be told; each field is also ``LOOPSERVE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="LOOPSERVE_", extra="ignore")

    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    served_model_name: str | None = None
    batching: Literal["depth", "sequence"] = "depth"
    depth_alignment: Literal["auto", "mixed", "aligned"] = "auto"
    exit_threshold: float | None = Field(None, ge=0)
    exit_measure: Literal["prob", "margin", "gate"] | None = None
    min_loops: int | None = Field(None, ge=1)
    kv_fill: Literal["propagate", "copy"] = "propagate"
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    kv_cache_memory: ByteSize = 512 * 2**20
    block_size: int = Field(16, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    max_queue: int = Field(256, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)
    max_body_bytes: ByteSize = 4 * 2**20
    header_timeout: float = Field(10.0, gt=0, description="seconds to send request headers")
    body_timeout: float = Field(30.0, gt=0, description="seconds to send the request body")
    log_interval: float = Field(10.0, gt=0)
    shutdown_grace: float = Field(30.0, ge=0)
    seed: int = 0
    chat_template: str | None = None
    enable_prefix_caching: bool = False
    compile: bool = False
    generation_config: Literal["auto", "vllm"] = "auto"
    enable_auto_tool_choice: bool = False
    tool_call_parser: Literal["hermes"] | None = None

    @model_validator(mode="after")
    def _auto_tools_need_a_parser(self) -> ServeSettings:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes)")
        return self

    @property
    def auto_tool_parser(self) -> str | None:
        """The parser that reads the model's own tool calls, when ``auto`` is enabled."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None
