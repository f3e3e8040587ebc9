"""Progress bars for long table passes (tqdm, only when asked for)."""

from __future__ import annotations

from typing import Any


def progress_bar(enabled: Any, total: int, desc: str) -> Any:
    """A tqdm bar counting `total` rows, or None when `enabled` is false."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, dynamic_ncols=True)
