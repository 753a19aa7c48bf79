"""The base of every model parsed from a user's file: frozen, and strict about unknown keys (a typo fails)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
