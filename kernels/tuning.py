"""Launch-plan overrides shared by the kernel modules (benchmark sweeps and tests set them; empty = each module's
defaults)."""
from __future__ import annotations

from typing import Callable, Sequence


def tuning_setter(overrides: dict, keys: Sequence[str]) -> Callable[..., None]:
    """A ``set_tuning(**kw)`` that replaces the contents of ``overrides`` with kw (None values dropped); unknown keys
    raise; no arguments resets to the defaults."""

    def set_tuning(**kw):
        bad = set(kw) - set(keys)
        if bad:
            raise ValueError(f"set_tuning: unknown keys {sorted(bad)}; known: {', '.join(keys)}")
        overrides.clear()
        overrides.update({k: v for k, v in kw.items() if v is not None})

    set_tuning.__doc__ = f"Override launch-plan choices (keys: {', '.join(keys)}); no arguments resets."
    return set_tuning
