"""What a computation ran, function by function: the code fingerprints of the run cache.

A fingerprint is ``{"<module>:<qualname>": digest}`` for every function of the code roots (spvr_lib) that
ran while a computation was traced.  A function's digest covers what it does and nothing else:

* its syntax tree, normalised: docstrings, type annotations, line and column numbers dropped, so comments,
  docstrings and reformatting never change it; default arguments and nested functions are part of the tree;
* the module-level values it reads (constants, tables; a class of the code roots by its fields and class
  attributes, not its methods), by their values, whichever module they are read from (``scales.CPU`` too);
* a function memoised with ``functools.lru_cache`` whose cache answered (so that it did not run) is counted
  with the code it would run (:func:`_memoised_closure`).

A function is looked up where it was (``module:qualname``); when that module no longer defines it (moved,
module split, merged or renamed) it is looked up by its qualname in every module of the code roots, and the
fingerprint still holds where one of them has the same digest.  So a fingerprint stays valid across every
edit that does not change a function that ran or a value it read, and turns stale, naming the functions,
when one does (:func:`changed_functions`).
"""
from __future__ import annotations

import ast
import atexit
import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib
import os
import re
import sys
import threading
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent      # spvr_lib/: the code fingerprints cover its functions
REPO_ROOT = PACKAGE_ROOT.parent
CODE_ROOTS: list[Path] = [PACKAGE_ROOT]             # tests may add a folder of their own
# the cache's own bookkeeping does not change what is computed: never part of a fingerprint
UNTRACED = {str(PACKAGE_ROOT / "store.py"), str(PACKAGE_ROOT / "fingerprint.py")}
_INLINE = {"<listcomp>", "<genexpr>", "<setcomp>", "<dictcomp>", "<module>"}   # part of the code around them
DIGEST_LEN = 16
UNRESOLVED = "unresolved"       # the digest of a function that ran but whose source could not be found


def _in_roots(filename: str) -> bool:
    return any(filename.startswith(str(root) + os.sep) for root in CODE_ROOTS)


def module_name(filename: str) -> str | None:
    """``spvr_lib/paper/scales.py`` -> ``spvr_lib.paper.scales`` (None outside the code roots)."""
    path = Path(filename)
    for root in CODE_ROOTS:
        try:
            rel = path.relative_to(root.parent)
        except ValueError:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)
    return None


_SCOPES = re.compile(r"<(?:listcomp|genexpr|setcomp|dictcomp)>\.")


def function_id(code: types.CodeType) -> str | None:
    """``"spvr_lib.train:fit"``: where a code object's function is defined (None outside the code roots).
    Comprehension scopes are left out of the qualname (a lambda in a list comprehension of ``f`` is
    ``f.<locals>.<lambda>``), as the syntax tree sees it."""
    mod = module_name(code.co_filename)
    return None if mod is None else f"{mod}:{_SCOPES.sub('', code.co_qualname)}"


# --------------------------------------------------------------------------- the tracer
_traces: list[set] = []              # open traces, innermost last: each a set of code objects and function ids
_trace_lock = threading.Lock()
_previous_tracer: list[Any] = []


def _tracer(frame: Any, event: str, arg: Any, _traces: list = _traces, _roots: list = CODE_ROOTS,
            _sep: str = os.sep, _skip: set = UNTRACED, _inline: set = _INLINE) -> None:
    # a "call" event per Python function entered; returning None asks for no line events.  Everything it
    # uses is bound as a default, so it still works while the interpreter tears modules down.
    if event == "call":
        code = frame.f_code
        name = code.co_filename
        if code.co_name not in _inline and name not in _skip and any(name.startswith(str(r) + _sep) for r in _roots):
            for seen in _traces:
                seen.add(code)
    return None


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """No tracer in this thread while the block runs (the one it had is put back)."""
    previous = sys.gettrace()
    if previous is None:
        yield
        return
    sys.settrace(None)
    try:
        yield
    finally:
        sys.settrace(previous)


def _stop_tracing_at_exit() -> None:
    if _traces:
        sys.settrace(None)


atexit.register(_stop_tracing_at_exit)


class CodeTrace:
    """The functions of the code roots that run while the trace is open (a context manager).

    >>> with CodeTrace() as trace:
    ...     compute()
    >>> trace.fingerprint()        # {"spvr_lib.train:fit": "3f0c...", ...}

    Traces nest: what an inner trace sees, every enclosing one sees too, and :meth:`add` (a reused cached
    record's fingerprint, or functions that run out of sight, in DataLoader workers) adds to all open traces.
    """

    def __init__(self) -> None:
        self.seen: set = set()           # code objects and function ids
        self.known: dict[str, str] = {}  # digests taken over from reused records
        self._open = False

    def __enter__(self) -> "CodeTrace":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        with _trace_lock:
            if not _traces:
                _previous_tracer.append(sys.gettrace())
                sys.settrace(_tracer)
            _traces.append(self.seen)
            _open_traces.append(self)
            self._open = True

    def stop(self) -> None:
        with _trace_lock:
            if not self._open:
                return
            self._open = False
            for i in range(len(_traces) - 1, -1, -1):
                if _traces[i] is self.seen:
                    del _traces[i]
                    del _open_traces[i]
                    break
            if not _traces:
                sys.settrace(_previous_tracer.pop() if _previous_tracer else None)

    @staticmethod
    def add(functions: Iterable[str] | Mapping[str, str]) -> None:
        """Count ``functions`` (ids; or a fingerprint, whose digests are kept) as run by every open trace."""
        functions = dict(functions) if isinstance(functions, Mapping) else set(functions)
        for trace in _open_traces:
            if isinstance(functions, Mapping):
                trace.known.update(functions)
            else:
                trace.seen.update(functions)

    def function_ids(self) -> set[str]:
        ids = set(self.known)
        for item in list(self.seen):
            fid = item if isinstance(item, str) else function_id(item)
            if fid is not None:
                ids.add(fid)
        return ids

    def fingerprint(self) -> dict[str, str]:
        """{function id: digest} of every function seen (and of the memoised code they call), sorted."""
        out = dict(self.known)
        ids = self.function_ids() - set(self.known)
        for fid in sorted(ids | _memoised_closure(ids)):
            if fid not in out:      # a function its module's source does not define can never match: stale
                out[fid] = function_digest(fid) or UNRESOLVED
        return dict(sorted(out.items()))


_open_traces: list[CodeTrace] = []


def source_functions(obj: Any) -> set[str]:
    """Every method of the code-root classes of ``obj`` (and of the objects it wraps, ``.dataset``): code that
    may run out of the traced thread (DataLoader workers)."""
    ids: set[str] = set()
    while obj is not None:
        for cls in type(obj).__mro__:
            for value in vars(cls).values():
                fn = getattr(value, "__func__", value)
                code = getattr(fn, "__code__", None)
                if code is not None and _in_roots(code.co_filename):
                    fid = function_id(code)
                    if fid:
                        ids.add(fid)
        obj = getattr(obj, "dataset", None)
    return ids


# --------------------------------------------------------------------------- the code of a module
class _Module:
    """A source file of the code roots, parsed once: its normalised definitions by qualname."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        self.defs: dict[str, list[ast.AST]] = {}
        self.assigned = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                         for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                         for t in ast.walk(t) if isinstance(t, ast.Name)}
        self._index(tree.body, "")

    def _index(self, body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            self._visit(node, prefix)

    def _visit(self, node: ast.AST, prefix: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            qual = prefix + node.name
            self.defs.setdefault(qual, []).append(node)
            for child in node.body:
                self._visit_inner(child, qual + ".<locals>.")
            for child in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                self._visit_inner(child, prefix)
        elif isinstance(node, ast.ClassDef):
            qual = prefix + node.name
            self.defs.setdefault(qual, []).append(node)
            for child in node.body:
                self._visit(child, qual + ".")
        else:
            self._visit_inner(node, prefix)

    def _visit_inner(self, node: ast.AST, prefix: str) -> None:
        # statements and expressions: nested defs, classes and lambdas inside them
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self._visit(node, prefix)
            return
        if isinstance(node, ast.Lambda):
            self.defs.setdefault(prefix + "<lambda>", []).append(node)
            self._visit_inner(node.body, prefix + "<lambda>.<locals>.")
            return
        for child in ast.iter_child_nodes(node):
            self._visit_inner(child, prefix)


@functools.lru_cache(maxsize=None)
def _parsed(path: str, mtime_ns: int, size: int) -> _Module | None:
    name = module_name(path)
    try:
        return _Module(name or path, Path(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _module_source(mod: str) -> _Module | None:
    """The parsed source of module ``mod`` of the code roots (None if there is no such file)."""
    parts = mod.split(".")
    for root in CODE_ROOTS:
        if parts[0] != root.name:
            continue
        base = root.parent.joinpath(*parts)
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            try:
                st = path.stat()
            except OSError:
                continue
            return _parsed(str(path), st.st_mtime_ns, st.st_size)
    return None


def _all_modules() -> list[str]:
    """Every module of the code roots, listed once per process and set of roots (:func:`forget` drops the list)."""
    roots = tuple(str(r) for r in CODE_ROOTS)
    if roots not in _MODULES:
        mods = []
        for root in CODE_ROOTS:
            for path in sorted(root.rglob("*.py")):
                name = module_name(str(path))
                if name:
                    mods.append(name)
        _MODULES[roots] = mods
    return _MODULES[roots]


_MODULES: dict[tuple[str, ...], list[str]] = {}


class _Normalise(ast.NodeTransformer):
    """Drop what does not change behaviour: docstrings, annotations (never evaluated here: ``from __future__
    import annotations``); positions are dropped by ``ast.dump(include_attributes=False)``."""

    def _strip_doc(self, node: Any) -> Any:
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:
        node.returns = None
        self.generic_visit(node)
        return self._strip_doc(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> Any:
        self.generic_visit(node)
        return self._strip_doc(node)

    def visit_arg(self, node: ast.arg) -> Any:
        node.annotation = None
        node.type_comment = None
        return node


_DUMPS: dict[tuple[int, bool], tuple[ast.AST, str]] = {}     # (id(node), shape) -> (node, text): a parsed node


def _normalised_dump(node: ast.AST, shape: bool = False) -> str:
    """The normalised text of a definition (:class:`_Normalise`); ``shape``: a class without its methods.
    Memoised per node of a parsed source (the nodes live as long as their parsed module)."""
    key = (id(node), shape)
    hit = _DUMPS.get(key)
    if hit is not None and hit[0] is node:
        return hit[1]
    import copy

    copied = copy.deepcopy(node)
    if shape:
        copied.body = [s for s in copied.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
    text = ast.dump(_Normalise().visit(copied), include_attributes=False)
    _DUMPS[key] = (node, text)
    return text


def _class_shape(node: ast.ClassDef) -> str:
    """A class by its bases, decorators, fields and class attributes, without its methods (each method
    counts on its own when it runs)."""
    return _normalised_dump(node, shape=True)


def _names_read(node: ast.AST) -> set[str]:
    """What a definition reads from outside itself: every bare name it mentions ("x") and, for an attribute of a
    bare name, the pair ("alias.attr": ``scales.CPU``, ``baselines.prune``), annotations and docstrings left out
    (never evaluated).  A superset of the globals it reads, but no wider: a module another module imports does
    not count for every name some other module happens to define."""
    names = set()
    for sub in ast.walk(_Normalise().visit(_copied(node))):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
            names.add(f"{sub.value.id}.{sub.attr}")
    return names


def _copied(node: ast.AST) -> ast.AST:
    import copy

    return copy.deepcopy(node)


# --------------------------------------------------------------------------- values
def _is_memoised(value: Any) -> bool:
    return callable(value) and hasattr(value, "cache_info") and hasattr(value, "__wrapped__")


def value_token(value: Any, depth: int = 0) -> str:
    """A stable text of a module-level value: data by value, code by where it is defined."""
    if depth > 8:
        return "..."
    t = type(value)
    if value is None or t in (bool, int, float, complex, str, bytes):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{t.__qualname__}.{value.name}"
    if isinstance(value, (tuple, list)):
        return f"{t.__name__}(" + ",".join(value_token(v, depth + 1) for v in value) + ")"
    if isinstance(value, (set, frozenset)):
        return f"{t.__name__}(" + ",".join(sorted(value_token(v, depth + 1) for v in value)) + ")"
    if isinstance(value, (dict, types.MappingProxyType)):
        items = sorted((value_token(k, depth + 1), value_token(v, depth + 1)) for k, v in value.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if isinstance(value, types.ModuleType):
        return f"module {value.__name__}"
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)) \
            or _is_memoised(value):
        # code by name (it counts on its own when it runs); a code-root one without its module: moves keep it
        what = "class" if isinstance(value, type) else "function"
        module = getattr(value, "__module__", None) or "?"
        inside = module_name_in_roots(module)
        return f"{what} {'' if inside else module + '.'}{getattr(value, '__qualname__', repr(value))}"
    if isinstance(value, os.PathLike):       # inside the checkout: relative, so that another clone agrees
        path = Path(os.fspath(value))
        try:
            return f"path <repo>/{path.resolve().relative_to(REPO_ROOT)}"
        except ValueError:
            return f"path {path}"
    if dataclasses.is_dataclass(value):
        return f"{t.__qualname__}(" + ",".join(f"{f.name}={value_token(getattr(value, f.name), depth + 1)}"
                                               for f in dataclasses.fields(value)) + ")"
    if hasattr(value, "tobytes") and hasattr(value, "dtype") and hasattr(value, "shape"):     # numpy
        return f"array {value.dtype} {tuple(value.shape)} {hashlib.sha256(value.tobytes()).hexdigest()[:16]}"
    if t.__module__ == "torch" and hasattr(value, "detach"):                                   # a tensor
        arr = value.detach().cpu().contiguous().view(-1).to(dtype=__import__("torch").float64).numpy()
        return f"tensor {tuple(value.shape)} {hashlib.sha256(arr.tobytes()).hexdigest()[:16]}"
    text = repr(value)
    return f"{t.__module__}.{t.__qualname__}" + ("" if " at 0x" in text else f" {text}")


def module_name_in_roots(module: str) -> bool:
    return module.split(".")[0] in {root.name for root in CODE_ROOTS}


def _module_globals(mod: str) -> dict[str, Any]:
    module = sys.modules.get(mod)
    if module is None:
        try:
            module = importlib.import_module(mod)
        except Exception:          # a module that no longer imports: its values cannot be read
            return {}
    return vars(module)


def _global_tokens(mod: str, names: set[str], own_only: bool = False) -> list[str]:
    """The module-level values among ``names`` (:func:`_names_read`): a bare name of ``mod``'s, or "alias.attr",
    an attribute of a code-root module ``mod`` holds as ``alias``."""
    g = _module_globals(mod)
    out = []
    if own_only:
        return [f"{name}={_read_value(g[name])}" for name in sorted(names) if name in g]
    for name in sorted(names):
        alias, dot, attr = name.partition(".")
        if not dot:
            if name in g and not isinstance(g[name], types.ModuleType):
                out.append(f"{name}={_read_value(g[name])}")
            continue
        module = g.get(alias)
        if not isinstance(module, types.ModuleType) or not getattr(module, "__file__", None):
            continue
        path = str(Path(module.__file__).resolve())
        if _in_roots(path) and path not in UNTRACED and attr in vars(module) \
                and not isinstance(vars(module)[attr], types.ModuleType):
            out.append(f"{name}={_read_value(vars(module)[attr])}")
    return out


def _read_value(value: Any) -> str:
    """A value as a function that reads it depends on it: a class of the code roots by its shape, code by
    name (it counts on its own when it runs), anything else by value."""
    if isinstance(value, type):
        try:
            fid = f"{value.__module__}:{value.__qualname__}"
        except AttributeError:
            return value_token(value)
        mod = _module_source(value.__module__)
        if mod is not None and value.__qualname__ in mod.defs:
            return "class " + _digest("\n".join(_class_shape(n) for n in mod.defs[value.__qualname__]
                                                if isinstance(n, ast.ClassDef)))
        return value_token(value) if fid else ""
    return value_token(value)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_LEN]


# --------------------------------------------------------------------------- function digests
VALUES = "<values>"     # the qualname of a module's top-level values: "spvr_lib.paper.reference:<values>"


def function_digest(fid: str, module: str | None = None) -> str | None:
    """The digest of function ``fid`` (``"module:qualname"``) as the code roots define it now, read in
    ``module`` (default: the module the id names); None where that module does not define it.
    ``"module:<values>"`` stands for every top-level value the module assigns (what a notebook reads
    from it directly, without running a function of it).  Memoised per source file version (module values are
    taken as constant while a process runs; :func:`forget` drops the memo)."""
    mod = module or fid.partition(":")[0]
    src = _module_source(mod)
    key = (fid, mod, None if src is None else src.path)
    if src is not None and key in _DIGESTS and _DIGESTS[key][0] is src:
        return _DIGESTS[key][1]
    with _untraced():              # bookkeeping: not part of any fingerprint, and no tracer cost on every call
        digest = _function_digest(fid, module)
    if src is not None:
        _DIGESTS[key] = (src, digest)
    return digest


_DIGESTS: dict[tuple, tuple[_Module, str | None]] = {}


def _function_digest(fid: str, module: str | None = None) -> str | None:
    mod, _, qual = fid.partition(":")
    mod = module or mod
    src = _module_source(mod)
    if src is None:
        return None
    if qual == VALUES:
        return _digest("\n".join(_global_tokens(mod, src.assigned, own_only=True)))
    if qual not in src.defs:
        return None
    nodes = src.defs[qual]
    parts, names = [], set()
    for node in nodes:
        if isinstance(node, ast.ClassDef):     # a class body that ran (an import inside a computation)
            parts.append(_class_shape(node))
        else:
            parts.append(_normalised_dump(node))
            names |= _names_read(node)
    parts += _global_tokens(mod, names)
    return _digest("\n".join(parts))


def _memoised_closure(ids: Iterable[str]) -> set[str]:
    """Functions of the code roots that ``ids`` call through a ``functools.lru_cache`` (whose cache may have
    answered, so that they did not run here), with every code-root function those mention, transitively."""
    out: set[str] = set()
    todo = list(ids)
    seen: set[str] = set()
    while todo:
        fid = todo.pop()
        if fid in seen:
            continue
        seen.add(fid)
        mod, _, qual = fid.partition(":")
        src = _module_source(mod)
        if src is None or qual not in src.defs:
            continue
        g = _module_globals(mod)
        names = set().union(*(_names_read(n) for n in src.defs[qual]))
        inside = fid in out
        for name in names:
            value = g.get(name)
            if value is None:
                continue
            target = getattr(value, "__wrapped__", None) if _is_memoised(value) else (value if inside else None)
            code = getattr(target, "__code__", None)
            if code is not None and _in_roots(code.co_filename):
                tid = function_id(code)
                if tid and tid not in out:
                    out.add(tid)
                    todo.append(tid)
                    seen.discard(tid)
    return out


def changed_functions(fingerprint: Mapping[str, str]) -> list[str]:
    """The functions of ``fingerprint`` whose code or read values changed since, or that no module defines
    any more (``"spvr_lib.train:fit"``, with ``" (gone)"`` for those).  Each (function, digest) is judged once
    per process (:func:`forget` drops the verdicts): reading a notebook's records asks about the same moved
    or changed functions thousands of times, and each answer searches every module of the code roots."""
    changed = []
    for fid, digest in fingerprint.items():
        if (fid, digest) not in _VERDICTS:
            _VERDICTS[(fid, digest)] = _changed(fid, digest)
        if _VERDICTS[(fid, digest)] is not None:
            changed.append(_VERDICTS[(fid, digest)])
    return changed


def _changed(fid: str, digest: str) -> str | None:
    """None where ``fid`` still has ``digest`` (where it is, or in a module it moved to), else its name (with
    " (gone)" where no module defines it)."""
    if function_digest(fid) == digest:
        return None
    qual = fid.partition(":")[2]
    defining = _modules_defining(qual)
    if any(function_digest(fid, module=m) == digest for m in defining):
        return None                                            # moved to another module, unchanged
    return fid if function_digest(fid) is not None or defining else f"{fid} (gone)"


_VERDICTS: dict[tuple[str, str], str | None] = {}


def _modules_defining(qual: str) -> list[str]:
    return [m for m in _all_modules() if (src := _module_source(m)) is not None and qual in src.defs]


def is_file_fingerprint(fingerprint: Mapping[str, str]) -> bool:
    """A fingerprint of the earlier kind, {source file: sha256} (before function fingerprints)."""
    return any(k.endswith(".py") and ":" not in k for k in fingerprint)


def forget() -> None:
    """Drop the parsed sources and re-import edited modules on the next lookup (a process that edits its
    own code roots, as the tests do)."""
    _parsed.cache_clear()
    _DIGESTS.clear()
    _DUMPS.clear()
    _MODULES.clear()
    _VERDICTS.clear()
