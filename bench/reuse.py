"""What one process loads once and lends to every run it makes: models, feature networks, CLIP, reference features.

A sweep, ``bench claims``, ``bench nightly`` or a Ray worker makes many runs in one process; the runs that share a
model or a metric's network should pay for loading it once, so that a cell costs its sampling and its metrics and
nothing more. Entries are keyed by what defines them: a name plus the digest or the file-system signature of the
files they come from (``files_signature``), so an entry whose files changed is loaded again, never served stale.

Two ways to lend:

- ``shared(key, make)``: the same object every time, for what runs only read (a feature network, the evaluation
  CLIP, LPIPS, cached reference features);
- ``copied(key, make)``: a deep copy of the kept object, for what a run changes (a model: moved to its device and
  dtype, given attention processors, fine-tuned by a personalization method). The kept object is never handed out,
  so no run sees another run's changes. At most ``MAX_COPIED`` such objects are kept (least recently used first out):
  a sweep over many models does not hold them all.

Nothing here changes a number: a run's samples and metrics are the same bytes with or without reuse
(tests/test_reuse.py). ``DIFFBENCH_REUSE=0`` turns it off (every call loads afresh), e.g. to rule it out.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, TypeVar

T = TypeVar("T")
MAX_COPIED = 2

_lock = threading.RLock()
_shared: OrderedDict[Hashable, Any] = OrderedDict()
_copied: OrderedDict[Hashable, Any] = OrderedDict()
stats = {"hits": 0, "misses": 0}


def enabled() -> bool:
    return os.environ.get("DIFFBENCH_REUSE", "1") != "0"


def _kept(store: OrderedDict, key: Hashable, make: Callable[[], T], limit: int | None) -> T:
    """The object kept in ``store`` for ``key``, made on first use; at most ``limit`` kept (least recently used out)."""
    with _lock:
        if key in store:
            stats["hits"] += 1
            store.move_to_end(key)
            return store[key]
        stats["misses"] += 1
        value = store[key] = make()
        while limit is not None and len(store) > limit:
            store.popitem(last=False)
        return value


def shared(key: Hashable, make: Callable[[], T]) -> T:
    """The object ``make()`` returned for ``key`` in this process, made on first use; the same object each time."""
    return _kept(_shared, key, make, None) if enabled() else make()


def copied(key: Hashable, make: Callable[[], T]) -> T:
    """A deep copy of the object ``make()`` returned for ``key`` in this process (made on first use)."""
    if not enabled():
        return make()
    with _lock:  # not evicted or copied by another thread while this one copies it
        return copy.deepcopy(_kept(_copied, key, make, MAX_COPIED))


def clear() -> None:
    """Forget everything (tests; a long-lived process that wants its memory back)."""
    with _lock:
        _shared.clear()
        _copied.clear()
        stats.update(hits=0, misses=0)


def files_signature(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime in ns) of every file under ``paths`` (folders walked), sorted: cheap to take on every
    call, and it changes when a file is replaced, rewritten or touched. A missing path gives an empty entry, so
    the loader that follows raises its own error."""
    found = []
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            st = f.stat()
            found.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))
