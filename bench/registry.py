"""Registries of methods, metrics, datasets and models.

Entries are lazy ``"module:attr"`` strings with a one-line summary (and the paper,
for methods), so ``bench ls`` lists everything without importing torch or
diffusers. Third-party packages add entries through the entry-point groups
``diffbench.methods``, ``diffbench.metrics``, ``diffbench.datasets`` and
``diffbench.models``. Duplicate names raise; unknown names suggest the closest
match.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, Iterator, TypeVar

from bench.errors import UnknownName

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:attr"
    summary: str
    paper: str = ""
    source: str = "builtin"  # or the distribution that provided it through an entry point


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


def load_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"registry target {target!r} is not of the form 'module:attr'")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Registry(Generic[T]):
    """A named collection of lazily imported objects of one kind."""

    kind: str  # "method", "metric", ...
    group: str  # entry-point group
    base: type | None = None  # loaded objects must be subclasses (classes) or instances of this
    _entries: dict[str, Entry] = field(default_factory=dict)
    _loaded: dict[str, Any] = field(default_factory=dict)
    _plugins_scanned: bool = False

    def register(self, name: str, target: str, summary: str, paper: str = "", source: str = "builtin") -> None:
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is registered twice: {self._entries[name].target} and {target}"
            )
        self._entries[name] = Entry(name, target, summary, paper, source)

    def _scan_plugins(self) -> None:
        if self._plugins_scanned:
            return
        self._plugins_scanned = True
        for ep in entry_points(group=self.group):
            obj = ep.load()
            dist = ep.dist.name if ep.dist is not None else "plugin"
            self.register(
                ep.name,
                ep.value,
                summary=getattr(obj, "summary", "") or _first_line(obj.__doc__),
                paper=getattr(obj, "paper", ""),
                source=dist,
            )

    def names(self) -> list[str]:
        self._scan_plugins()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        self._scan_plugins()
        for name in sorted(self._entries):
            yield self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._scan_plugins()
        return name in self._entries

    def entry(self, name: str) -> Entry:
        self._scan_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        text = str(name)
        folded = {n.lower(): n for n in self._entries}  # DDIM -> ddim: case is the likeliest slip
        close = ([folded[text.lower()]] if text.lower() in folded
                 else [folded[c] for c in difflib.get_close_matches(text.lower(), folded, n=1, cutoff=0.5)])
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries))})"

    def get(self, name: str) -> T:
        """Import and return the object registered under ``name``, checking its type."""
        if name in self._loaded:
            return self._loaded[name]
        entry = self.entry(name)
        obj = load_target(entry.target)
        if self.base is not None:
            ok = issubclass(obj, self.base) if isinstance(obj, type) else isinstance(obj, self.base)
            if not ok:
                raise TypeError(f"{self.kind} {name!r} ({entry.target}) is not a {self.base.__name__}")
        self._loaded[name] = obj
        return obj
