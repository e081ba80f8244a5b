"""Registries of methods, metrics, datasets and models.

A registry maps a name to a lazy ``"module:attr"`` target. What ``bench ls`` prints
(the name's summary, and the paper for methods) is written once, on the class: its
``summary`` and ``paper`` attributes (or its docstring's first line; a model loader
function's docstring). It is read statically from the module's source with ``ast``,
without importing the module, so listing imports neither torch nor diffusers nor any
plugin. Third-party packages add entries through the entry-point groups
``diffbench.methods``, ``diffbench.metrics``, ``diffbench.datasets`` and
``diffbench.models``, read the same way. Duplicate names raise; unknown names
suggest the closest match.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.machinery
import importlib.util
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, Iterator, Mapping, TypeVar

from bench.errors import UnknownName

T = TypeVar("T")
FIELDS = ("name", "summary", "paper")


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:attr"
    summary: str | None  # None until read from the source (Registry.entry)
    paper: str | None = ""
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


# -- reading a class's name, summary and paper from its source, without importing it -----------------------------------
def _find_spec_without_importing(module_name: str):
    """The module's spec, located package by package on sys.path: no package ``__init__`` runs (importlib.util.find_spec
    would import the parents); a module already imported answers from sys.modules."""
    if module_name in sys.modules:
        return getattr(sys.modules[module_name], "__spec__", None)
    spec, path = None, None
    parts = module_name.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        if name in sys.modules:
            spec = getattr(sys.modules[name], "__spec__", None)
        else:
            try:  # a top-level name has no parent to import: every finder may answer (an editable install's too)
                spec = (importlib.util.find_spec(name) if i == 0
                        else importlib.machinery.PathFinder.find_spec(name, path))
            except (ImportError, ValueError):
                return None
        if spec is None:
            return None
        path = spec.submodule_search_locations
        if i < len(parts) - 1 and path is None:
            return None
    return spec


@lru_cache(maxsize=None)
def _module_source(module_name: str) -> tuple[ast.Module, str] | None:
    """The parsed source of a module and its package (for relative imports); None when it has no readable source."""
    spec = _find_spec_without_importing(module_name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    package = module_name if spec.submodule_search_locations is not None else module_name.rpartition(".")[0]
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8")), package


def _literal(node: ast.AST, constants: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left, constants), _literal(node.right, constants)
        return left + right if isinstance(left, str) and isinstance(right, str) else None
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _assignments(body: list[ast.stmt], constants: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stmt in body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name, value = stmt.targets[0].id, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            name, value = stmt.target.id, stmt.value
        else:
            continue
        literal = _literal(value, constants)
        if literal is not None:
            out[name] = literal
    return out


def _imported_names(tree: ast.Module, package: str) -> dict[str, tuple[str, str]]:
    """``from m import A as B`` at module level: {"B": ("m", "A")}."""
    out: dict[str, tuple[str, str]] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom):
            module = stmt.module or ""
            if stmt.level:
                base = package.split(".")
                base = base[: len(base) - stmt.level + 1]
                module = ".".join([*base, module] if module else base)
            for alias in stmt.names:
                out[alias.asname or alias.name] = (module, alias.name)
    return out


def static_metadata(target: str) -> dict[str, str]:
    """``name``, ``summary`` and ``paper`` of the class (or function) a target names, read from its source.

    Class attributes are looked up along the base classes that the source names (in the same module or
    imported with ``from m import C``); the summary falls back to the docstring's first line. Values that
    are not literals (or module-level string constants) are left out: nothing is imported or executed.
    """
    module_name, _, attr = target.partition(":")
    return dict(_static(module_name, attr, 0))


@lru_cache(maxsize=None)
def _static(module_name: str, attr: str, depth: int) -> tuple[tuple[str, str], ...]:
    parsed = _module_source(module_name)
    if parsed is None or depth > 8 or "." in attr:
        return ()
    tree, package = parsed
    constants = _assignments(tree.body, {})
    node = next((n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == attr), None)
    if node is None:  # imported into this module: follow it
        source = _imported_names(tree, package).get(attr)
        return _static(source[0], source[1], depth + 1) if source else ()
    found: dict[str, str] = {}
    if isinstance(node, ast.ClassDef):
        own = _assignments(node.body, constants)
        found = {k: own[k] for k in FIELDS if isinstance(own.get(k), str)}
        imported = _imported_names(tree, package)
        for base in node.bases:  # the first base that has it, as the MRO would mostly give it
            if not isinstance(base, ast.Name) or all(k in found for k in FIELDS):
                continue
            where = (module_name, base.id) if any(
                isinstance(n, ast.ClassDef) and n.name == base.id for n in tree.body) else imported.get(base.id)
            if where:
                for k, v in _static(where[0], where[1], depth + 1):
                    if k != "docstring":
                        found.setdefault(k, v)
    doc = _first_line(ast.get_docstring(node))
    if doc:
        found.setdefault("docstring", doc)
    return tuple(found.items())


def _resolve_base(base: type | str | None) -> type | None:
    return load_target(base) if isinstance(base, str) else base


@dataclass
class Registry(Generic[T]):
    """A named collection of lazily imported objects of one kind."""

    kind: str  # "method", "metric", ...
    group: str  # entry-point group
    base: type | str | None = None  # loaded objects must be subclasses (classes) or instances of this ("module:attr": lazy)
    targets: Mapping[str, str] = field(default_factory=dict)  # the built-in entries: name -> "module:attr"
    _entries: dict[str, Entry] = field(default_factory=dict)  # summary None: read from the source when first asked
    _loaded: dict[str, Any] = field(default_factory=dict)
    _plugins_scanned: bool = False

    def __post_init__(self) -> None:
        for name, target in self.targets.items():
            self.register(name, target)

    def register(self, name: str, target: str, summary: str | None = None, paper: str | None = None,
                 source: str = "builtin") -> None:
        """Register ``name``; summary and paper default to the ones written on the target (read lazily)."""
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is registered twice: {self._entries[name].target} and {target}"
            )
        self._entries[name] = Entry(name, target, summary, (paper or "") if summary is not None else None, source)

    def _scan_plugins(self) -> None:
        if self._plugins_scanned:
            return
        self._plugins_scanned = True
        for ep in entry_points(group=self.group):  # read, not loaded: listing imports no plugin
            dist = ep.dist.name if ep.dist is not None else "plugin"
            self.register(ep.name, ep.value, source=dist)

    def names(self) -> list[str]:
        self._scan_plugins()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        for name in self.names():
            yield self.entry(name)

    def __contains__(self, name: str) -> bool:
        self._scan_plugins()
        return name in self._entries

    def entry(self, name: str) -> Entry:
        self._scan_plugins()
        try:
            entry = self._entries[name]
        except KeyError:
            raise UnknownName(self.unknown_message(name)) from None
        if entry.summary is None:
            target, source = entry.target, entry.source
            meta = static_metadata(target)
            self._entries[name] = Entry(name, target, meta.get("summary") or meta.get("docstring", ""),
                                        meta.get("paper", ""), source)
        return self._entries[name]

    def declared_name(self, name: str) -> str | None:
        """The ``name`` attribute written on the registered class (read statically), if any."""
        return static_metadata(self.entry(name).target).get("name")

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
        base = _resolve_base(self.base)
        if base is not None:
            ok = issubclass(obj, base) if isinstance(obj, type) else isinstance(obj, base)
            if not ok:
                raise TypeError(f"{self.kind} {name!r} ({entry.target}) is not a {base.__name__}")
        self._loaded[name] = obj
        return obj
