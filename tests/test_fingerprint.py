"""Fingerprints by the code that ran, function by function (spvr_lib.fingerprint): a record stays valid across
edits that do not change what it ran (comments, docstrings, reformatting, moves between modules, functions
that did not run) and turns stale, naming the functions, exactly where a function it ran, a default argument
or a module constant it read changed."""
import importlib
import sys
import textwrap

import pytest

from spvr_lib import fingerprint, store

ALPHA = '''
"""Module alpha."""
OFFSET = 1


def helper(x, k=2):
    """Add the offset."""
    return k * x + OFFSET


def other():
    return 5


def unused():
    return 0


def compute():
    return {"v": helper(1)}


def compute_other():
    return {"v": other()}
'''


def _write(root, name, text):
    (root / f"{name}.py").write_text(textwrap.dedent(text))


def _reload(root):
    for name in [m for m in sys.modules if m == "mycode" or m.startswith("mycode.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    fingerprint.forget()


@pytest.fixture
def codebase(tmp_path, monkeypatch):
    root = tmp_path / "mycode"
    root.mkdir()
    (root / "__init__.py").write_text("")
    _write(root, "alpha", ALPHA)
    monkeypatch.syspath_prepend(str(tmp_path))
    store.CODE_ROOTS.append(root)
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    _reload(root)
    yield root
    store.CODE_ROOTS.remove(root)
    _reload(root)


def _records(root):
    """Two records: one ran compute and helper, the other compute_other and other."""
    mod = importlib.import_module("mycode.alpha")
    one = store.cached({"r": 1}, mod.compute, kind="t")
    two = store.cached({"r": 2}, mod.compute_other, kind="t")
    return one["code"], two["code"]


def _stale_after(root, name, text):
    one, two = _records(root)
    _write(root, name, text) if text is not None else (root / f"{name}.py").unlink()
    _reload(root)
    return store.stale_code(one), store.stale_code(two)


def test_a_record_holds_exactly_the_functions_that_ran(codebase):
    one, two = _records(codebase)
    assert sorted(one) == ["mycode.alpha:compute", "mycode.alpha:helper"]
    assert sorted(two) == ["mycode.alpha:compute_other", "mycode.alpha:other"]
    assert all(len(d) == fingerprint.DIGEST_LEN for d in one.values())


@pytest.mark.parametrize("edit", [
    ALPHA.replace("return k * x + OFFSET", "return k * x + OFFSET   # the offset, added"),          # comment
    ALPHA.replace('"""Add the offset."""', '"""Add the module\'s offset to k times x."""'),      # docstring
    ALPHA.replace('    """Add the offset."""\n', ""),                                               # no docstring
    ALPHA.replace("def helper(x, k=2):", "def helper(x: int, k: int = 2) -> int:"),               # annotations
    ALPHA.replace("return k * x + OFFSET", "return (k * x\n            + OFFSET)")                 # reformatting
         .replace("\n\n\ndef other", "\n\ndef other"),
    ALPHA + "\n\ndef added():\n    return 3\n",                                                    # a new function
    ALPHA.replace("def unused():\n    return 0\n", ""),                                             # deleted, unused
    ALPHA.replace("def unused():\n    return 0", "def unused():\n    return 99"),                   # changed, unused
    "\n\n# a comment at the top\n" + ALPHA.replace("OFFSET = 1", "OFFSET = 1\nUNREAD = 7"),        # unread constant
])
def test_edits_that_change_nothing_that_ran_keep_every_record_valid(codebase, edit):
    assert _stale_after(codebase, "alpha", edit) == ([], [])


def test_moving_a_function_to_another_module_keeps_the_record_valid(codebase):
    one, two = _records(codebase)
    _write(codebase, "beta", "OFFSET = 1\n\n\ndef helper(x, k=2):\n    return k * x + OFFSET\n")
    _write(codebase, "alpha", ALPHA.replace('OFFSET = 1\n', 'from mycode.beta import helper\n')
           .replace('def helper(x, k=2):\n    """Add the offset."""\n    return k * x + OFFSET\n', ""))
    _reload(codebase)
    assert "def helper" not in (codebase / "alpha.py").read_text()
    assert store.stale_code(one) == [] and store.stale_code(two) == []


def test_renaming_splitting_and_merging_modules_keeps_the_records_valid(codebase):
    one, two = _records(codebase)
    # rename alpha -> gamma, and split helper (with its constant) out into delta
    _write(codebase, "delta", "OFFSET = 1\n\n\ndef helper(x, k=2):\n    return k * x + OFFSET\n")
    _write(codebase, "gamma", ALPHA.replace("OFFSET = 1\n", "from mycode.delta import helper\n")
           .replace('def helper(x, k=2):\n    """Add the offset."""\n    return k * x + OFFSET\n', ""))
    (codebase / "alpha.py").unlink()
    _reload(codebase)
    assert store.stale_code(one) == [] and store.stale_code(two) == []
    # merge them again into one module of another name
    _write(codebase, "merged", ALPHA)
    (codebase / "gamma.py").unlink()
    (codebase / "delta.py").unlink()
    _reload(codebase)
    assert store.stale_code(one) == [] and store.stale_code(two) == []


@pytest.mark.parametrize("edit, changed", [
    (ALPHA.replace("return k * x + OFFSET", "return k * x - OFFSET"), ["mycode.alpha:helper"]),   # body
    (ALPHA.replace("def helper(x, k=2):", "def helper(x, k=3):"), ["mycode.alpha:helper"]),       # default
    (ALPHA.replace("OFFSET = 1", "OFFSET = 2"), ["mycode.alpha:helper"]),                         # constant
    (ALPHA.replace('return {"v": helper(1)}', 'return {"v": helper(2)}'), ["mycode.alpha:compute"]),
])
def test_a_change_to_what_ran_makes_exactly_the_records_that_ran_it_stale(codebase, edit, changed):
    assert _stale_after(codebase, "alpha", edit) == (changed, [])


def test_a_deleted_function_that_ran_is_named_gone(codebase):
    one, two = _records(codebase)
    _write(codebase, "alpha", ALPHA.replace("def other():\n    return 5\n", ""))
    _reload(codebase)
    # the function that called it reads a name that is gone: it changed too
    assert store.stale_code(one) == []
    assert store.stale_code(two) == ["mycode.alpha:compute_other", "mycode.alpha:other (gone)"]


def test_a_constant_read_from_another_module_counts(codebase):
    _write(codebase, "consts", "TABLE = {'a': 1}\n")
    _write(codebase, "user", "from mycode import consts\n\n\ndef compute():\n    return {'v': consts.TABLE['a']}\n")
    _reload(codebase)
    code = store.cached({"r": 3}, importlib.import_module("mycode.user").compute, kind="t")["code"]
    _write(codebase, "consts", "TABLE = {'a': 2}\n")
    _reload(codebase)
    assert store.stale_code(code) == ["mycode.user:compute"]


def test_a_memoised_function_counts_when_its_cache_answers(codebase):
    _write(codebase, "memo", "import functools\n\n\n@functools.lru_cache\ndef load():\n    return inner()\n\n\n"
                             "def inner():\n    return 4\n\n\ndef compute():\n    return {'v': load()}\n")
    _reload(codebase)
    mod = importlib.import_module("mycode.memo")
    mod.load()                                   # the cache is warm: load and inner will not run below
    code = store.cached({"r": 4}, mod.compute, kind="t")["code"]
    assert {"mycode.memo:compute", "mycode.memo:load", "mycode.memo:inner"} <= set(code)


def test_the_check_names_the_changed_functions_of_a_stale_record(codebase):
    one, _ = _records(codebase)
    _write(codebase, "alpha", ALPHA.replace("return k * x + OFFSET", "return k * x + 2 * OFFSET"))
    _reload(codebase)
    with pytest.warns(UserWarning, match=r"changed: mycode.alpha:helper\)"):
        rec = store.cached({"r": 1}, importlib.import_module("mycode.alpha").compute, kind="t")
    assert rec["v"] == 4


def test_an_import_that_brings_a_common_name_into_scope_stales_nothing(tmp_path, monkeypatch):
    """A digest counts bare names and ``alias.attr`` pairs, annotations left out: importing a code-root module
    that happens to define ``Any`` (or any name a function mentions as an attribute of something else) into a
    module changes no digest there; reading ``alias.attr`` still counts."""
    from spvr_lib import fingerprint as fp

    fid = "spvr_lib.paper.pruned_networks:pruned_network.<locals>.compute"
    names = fp._names_read(fp._module_source("spvr_lib.paper.pruned_networks").defs[fid.partition(":")[2]][0])
    assert "baselines.prune" in names and "Any" not in names and "prune" not in names
    assert "res" in names and "details" not in names         # an attribute of a local is no global
