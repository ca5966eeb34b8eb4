"""How a replica decodes: `ServingEngineSettings` resolved for one device into a `ServingPlan`.

Two KV cache layouts decode the same sequences to the same tokens: `dynamic` (one left-padded
cache grown by concatenation every step, `generation.BatchDecoder`) and `static` (fixed per-slot
buffers written in place, slots reused across requests, `slots.StaticBatchDecoder`). `auto` picks
static on CUDA, where in-place fixed-shape steps are what make a decode step cheap, and dynamic on
CPU. Torch-free, so the platform can hold these settings without importing torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

KvCacheSetting = Literal["auto", "dynamic", "static"]
# `static_max_len` on `auto`: the model's context, capped so 64 slots of a small model's cache
# stay a few GB (SmolLM2-135M: 64 x 2048 tokens x 23 KB in bf16 = 3 GB).
AUTO_STATIC_MAX_LEN = 2048
# The environment variable a standalone platform reads its serving engine from (JSON).
ENGINE_ENV = "FIRELOOP_SERVING_ENGINE"


class ServingEngineSettings(BaseModel):
    """The decoding engine of every replica (the same tokens either way; `auto` per device)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # KV cache layout: `static` preallocated per-slot buffers, `dynamic` grown per step.
    kv_cache: KvCacheSetting = "auto"
    # Tokens (prompt + max_tokens) one sequence may hold in the static cache; a request that
    # needs more is refused (400) naming this limit. `auto`: the context, at most 2048.
    static_max_len: int | Literal["auto"] = "auto"
    # torch.compile of the static decode step (CUDA only; refused elsewhere).
    compile_decode: bool = False

    @classmethod
    def from_env(cls) -> ServingEngineSettings:
        """`$FIRELOOP_SERVING_ENGINE` (JSON of these fields) when set, else the defaults."""
        raw = os.environ.get(ENGINE_ENV)
        if not raw:
            return cls()
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ValueError(f"{ENGINE_ENV}: {exc}") from None


@dataclass(frozen=True)
class ServingPlan:
    """Concrete choices for one device: `static_max_len` 0 means the dynamic cache."""

    static_max_len: int = 0
    compile_decode: bool = False

    @property
    def static(self) -> bool:
        return self.static_max_len > 0

    def describe(self) -> str:
        if not self.static:
            return "dynamic KV cache"
        compiled = ", compiled decode step" if self.compile_decode else ""
        return f"static KV cache of {self.static_max_len} tokens per slot{compiled}"


def resolve_serving_engine(
    settings: ServingEngineSettings, device_type: str, context_length: int
) -> ServingPlan:
    """The plan for `settings` on a `device_type` device; `ValueError` naming the setting that
    this device cannot run."""
    cuda = device_type == "cuda"
    if settings.compile_decode and not cuda:
        # Inductor on CPU needs a C++ toolchain and compiles for minutes per new shape.
        raise ValueError(
            f"serving engine compile_decode needs a CUDA device; replicas run on {device_type}"
        )
    kv_cache = settings.kv_cache
    if kv_cache == "auto":
        kv_cache = "static" if cuda else "dynamic"
    if kv_cache == "dynamic":
        if settings.compile_decode:
            raise ValueError("serving engine compile_decode needs kv_cache 'static'")
        return ServingPlan()
    max_len = (
        min(context_length, AUTO_STATIC_MAX_LEN)
        if settings.static_max_len == "auto"
        else settings.static_max_len
    )
    if not 2 <= max_len <= context_length:
        raise ValueError(
            f"serving engine static_max_len must be in [2, {context_length}] (the model's "
            f"context), got {max_len}"
        )
    return ServingPlan(static_max_len=max_len, compile_decode=settings.compile_decode)
