"""Full cache: no compression, the reference every table compares against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.methods.base import Method


@dataclass
class Full(Method):
    """Keep every token. Budgets are ignored; results are filed under budget `full`."""

    name: ClassVar[str] = "full"
    query_aware: ClassVar[bool] = False
    cost: ClassVar[str] = "none"
    reference: ClassVar[str] = "—"
    adapts: ClassVar[bool] = False  # heads: ada does not apply: keeps everything
    compresses: ClassVar[bool] = False
