"""Values that an op computes in the forward pass of a recomputed region and takes again when the region is
recomputed in the backward pass, instead of computing them a second time.

A region recomputed by ``torch.utils.checkpoint`` (``modules.common.recomputed``) runs its forward twice: once
storing nothing, and again in the backward pass to rebuild what the backward needs, on the same inputs. The
Triton scan's forward is two passes over the sequence: a summary pass giving the state entering every chunk, then
the output pass from those states; the states are a few MB, so the recomputation can start at the output pass
(``selective_scan``: ``chunk_states``).

``contexts()`` is checkpoint's ``context_fn``: the region's forward runs under its first context manager, the
recomputation under its second. Inside either, each ``slot()`` call gets the region's next slot, in call order (the
recomputation runs the same ops in the same order): a new empty one in the forward, the one the forward filled in
the recomputation (an empty one past the last). Outside a region ``slot()`` is None. A slot's value is what the op
put there; the op itself checks that it fits.
"""
from __future__ import annotations

import threading

_current = threading.local()  # the region whose forward or recomputation runs on this thread (autograd's own thread
# runs the recomputation)


class Slot:
    __slots__ = ("value",)

    def __init__(self):
        self.value = None


class _Region:
    def __init__(self):
        self.slots: list[Slot] = []
        self.next = None  # index of the next slot while recomputing, None while recording

    def slot(self) -> Slot:
        if self.next is None:
            self.slots.append(Slot())
            return self.slots[-1]
        i, self.next = self.next, self.next + 1
        return self.slots[i] if i < len(self.slots) else Slot()


class _Enter:
    """Makes ``region`` current on this thread; ``replay`` starts handing out its recorded slots from the first
    (each time: a second backward pass recomputes again)."""

    def __init__(self, region: _Region, replay: bool):
        self.region, self.replay = region, replay

    def __enter__(self):
        self.outer = getattr(_current, "region", None)
        _current.region = self.region
        if self.replay:
            self.region.next = 0

    def __exit__(self, *exc):
        _current.region = self.outer
        self.region.next = None


def contexts():
    """``torch.utils.checkpoint(..., context_fn=contexts)``: (forward's context, recomputation's context)."""
    region = _Region()
    return _Enter(region, replay=False), _Enter(region, replay=True)


def slot() -> Slot | None:
    """The current region's next slot (module docstring), or None outside a recomputed region."""
    region = getattr(_current, "region", None)
    return None if region is None else region.slot()
