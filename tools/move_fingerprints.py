"""Move the run cache's file fingerprints over to function fingerprints, without retraining (issue 30).

A record of the earlier kind carries {source file: sha256} of every spvr_lib file whose functions ran while it
was computed.  Where those hashes match today's files, the record ran today's code of those files; which of
their functions it ran is found by replaying the same computation under the function tracer:

* ``train`` and ``lrtrial`` records (the trainings, hours each): the same call with the same key but at a tiny
  size (2 epochs, 2 training images per class, 1 validation image per class, 8 scenes), interrupted after the
  first epoch and resumed from its checkpoint, so that the resume path counts as well (conservative: a record
  that never resumed is also invalidated by a change to it);
* every other kind (pruning, ranking, baselines, Guyon's MLPs, notebook 12's model: seconds each): recomputed
  at full size with today's code, by the notebooks run from a scratch copy of the cache that holds the
  moved-over trainings (``--phase full``); where every field of the result but its timings equals the
  record's, today's code computes what the record holds, and the record (its content untouched) takes over the
  fingerprint of that computation.

The moved-over fingerprint is the replay's, restricted to the files the record's own fingerprint lists (a
function of a file the original never ran is dropped: the replay went elsewhere); a listed file none of whose
functions ran in the replay contributes every function it defines (conservative).  The record's content is
kept as it was; ``code_moved`` in it says how its fingerprint was obtained.

Outside spvr_lib on purpose: its own functions are not part of any fingerprint.

    python tools/move_fingerprints.py --phase tiny            # train + lrtrial records, in place
    python tools/move_fingerprints.py --phase full --replayed DIR   # take over the fingerprints replayed in DIR
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spvr_lib import fingerprint, store  # noqa: E402

TINY_KINDS = ("train", "lrtrial")
# what differs between two runs of the same computation without being its result
VOLATILE = {"wall_s", "prune_s", "seconds", "code", "code_moved", "provenance", "computed_by", "interrupted_s",
            "hash", "key"}


class _Interrupt(Exception):
    pass


def file_of(fid: str) -> str:
    mod = fid.partition(":")[0]
    parts = mod.split(".")
    base = REPO.joinpath(*parts)
    if (base / "__init__.py").exists():
        return str(Path(*parts) / "__init__.py")
    return str(Path(*parts[:-1]) / f"{parts[-1]}.py")


def module_of(path: str) -> str:
    return fingerprint.module_name(str(REPO / path)) or path


def every_function(path: str) -> dict[str, str]:
    """Every function a source file defines, with its digest (a file the replay did not reach)."""
    mod = module_of(path)
    src = fingerprint._module_source(mod)
    out = {}
    for qual in (src.defs if src else {}):
        fid = f"{mod}:{qual}"
        out[fid] = fingerprint.function_digest(fid) or fingerprint.UNRESOLVED
    return out


def moved_fingerprint(legacy: dict[str, str], replayed: dict[str, str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(the record's function fingerprint, the files filled with every function, the replay's files dropped)."""
    files = set(legacy)
    kept = {fid: d for fid, d in replayed.items() if file_of(fid) in files}
    reached = {file_of(fid) for fid in kept}
    whole = sorted(files - reached)
    for path in whole:
        kept.update(every_function(path))
    dropped = sorted({file_of(fid) for fid in replayed} - files)
    return dict(sorted(kept.items())), whole, dropped


@contextlib.contextmanager
def interrupted_once(train_module: Any):
    """``train.fit`` interrupted after its first epoch on its first call (then the real one again)."""
    real = train_module.fit

    def fit_stopping(*args: Any, **kw: Any) -> Any:
        train_module.fit = real

        def stop(entry: dict) -> None:
            raise _Interrupt

        return real(*args, **{**kw, "on_epoch_end": stop})

    train_module.fit = fit_stopping
    try:
        yield
    finally:
        train_module.fit = real


def _tiny_options(opts: dict | None, n: int) -> dict | None:
    if not opts:
        return opts
    out = dict(opts)
    for k in ("n_images", "limit"):
        if k in out:
            out[k] = n
    if "items" in out:
        out["items"] = tuple(out["items"])
    return out


def replay_tiny(rec: dict[str, Any], kind: str) -> dict[str, str]:
    """The functions a train / lrtrial record's computation runs, replayed at a tiny size (see the module doc):
    the fingerprint of the tiny record, whose computation resumed the interrupted first attempt."""
    from spvr_lib import models, train
    from spvr_lib.paper import lr_search, scales, segmentation

    k = rec["key"]
    recipe = {**k["recipe"], "epochs": 2}
    shapes = k.get("shapes")
    init = models.build_network(k["spec"], shapes).state_dict() if k.get("init") else None
    if True:
        if kind == "train":
            def run() -> Any:
                return train.train_run(k["spec"], k["dataset"], train.Recipe(**recipe), k["seed"],
                                       per_class_train=None if k["per_class_train"] is None else 2,
                                       per_class_test=k["per_class_test"], init_state=init, tag=k.get("tag", ""),
                                       progress=False, shapes=shapes,
                                       train_options=_tiny_options(k.get("train_options"), 8),
                                       test_options=_tiny_options(k.get("test_options"), 4))
        elif "train_options" in k:                                   # SegNet's lr trial
            settings = {**segmentation.segmentation_settings("cpu"), "n_train": 10, "epochs": 2}
            assert segmentation.segnet_recipe(settings, k["recipe"]["lr"]).to_dict() == recipe, (recipe, settings)

            def run() -> Any:
                return segmentation.segnet_lr_trial(settings, k["recipe"]["lr"], seed=k["seed"], progress=False)
        else:                                                        # a classification lr trial
            r = k["recipe"]
            setup = scales.ModelSetup("replay", k["dataset"], epochs=2, batch_size=r["batch_size"], lr=r["lr"],
                                      weight_decay=r["weight_decay"], augment=r["augment"], amp=r["amp"],
                                      channels_last=r["channels_last"], eval_every=r.get("eval_every", 1),
                                      num_workers=r["num_workers"], train_subset=2,
                                      val_per_class=1 if k.get("val_per_class") is not None else None,
                                      val_fraction=k.get("val_fraction", 0.1))
            assert lr_search.recipe(setup, r["lr"], r["mode"]).to_dict() == recipe, (recipe, setup)

            def run() -> Any:
                return lr_search.lr_trial(setup, k["spec"], r["lr"], r["mode"], init, k["seed"], False, shapes)
        resumable = kind == "train" or "train_options" not in k
        if resumable:
            with interrupted_once(train):
                try:
                    run()
                except _Interrupt:
                    pass
        record = run()
    return record["code"]


def legacy(cache: Path, kinds: tuple[str, ...] | None = None) -> list[Path]:
    out = []
    for path in sorted(cache.glob("*.json")):
        kind = path.name.split("-", 1)[0]
        if kinds is not None and kind not in kinds:
            continue
        rec = store.read_record(path)
        if rec.get("code") and fingerprint.is_file_fingerprint(rec["code"]):
            out.append(path)
    return out


def write_moved(path: Path, rec: dict[str, Any], code: dict[str, str], how: str, whole: list[str],
                dropped: list[str]) -> None:
    """The record as it was, with its function fingerprint and ``code_moved``: how it was obtained, the files
    of the file fingerprint and the commit whose files they matched."""
    rec = dict(rec)
    rec["code_moved"] = {"how": how, "files": sorted(rec["code"]), "files_matched_commit": _commit(),
                         "whole_files": whole, "replay_only_files": dropped}
    rec["code"] = code
    store.write_record(path, rec)


def _commit() -> str | None:
    return store.git_state(REPO).get("commit")


def phase_tiny(cache: Path, only: list[str] | None = None) -> int:
    paths = [p for p in legacy(cache, TINY_KINDS) if not only or p.name in only]
    print(f"{len(paths)} train/lrtrial records with a file fingerprint", flush=True)
    bad = 0
    for i, path in enumerate(paths, 1):
        rec = store.read_record(path)
        changed = store.stale_code(rec["code"])
        if changed:
            print(f"SKIP {path.name}: its files changed since ({', '.join(changed)}): cannot be moved over")
            bad += 1
            continue
        kind = path.name.split("-", 1)[0]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, _env(SPVR_CACHE=str(Path(tmp) / "runs")):
            replayed = replay_tiny(rec, kind)
        code, whole, dropped = moved_fingerprint(rec["code"], replayed)
        write_moved(path, rec, code, "replayed at a tiny size (2 epochs, 2 images per class), interrupted "
                    "after epoch 1 and resumed (tools/move_fingerprints.py --phase tiny)", whole, dropped)
        print(f"[{i}/{len(paths)}] {path.name}: {len(code)} functions ({time.perf_counter() - t0:.1f} s)"
              + (f"; whole files {whole}" if whole else "") + (f"; dropped {dropped}" if dropped else ""), flush=True)
    return 1 if bad else 0


def phase_full(cache: Path, replayed_cache: Path) -> int:
    """Take over the fingerprints of the full-size replays in ``replayed_cache`` (the same keys, recomputed
    there by the notebooks with today's code) for the records of ``cache`` that still carry a file
    fingerprint, where every field of the result but its timings is equal: today's code computes what the
    record holds, so the record stays (its content untouched) and takes over the fingerprint of that code."""
    bad = 0
    paths = legacy(cache)
    print(f"{len(paths)} records with a file fingerprint", flush=True)
    for path in paths:
        rec = store.read_record(path)
        other = replayed_cache / path.name
        if not other.exists():
            print(f"MISSING {path.name}: no replay (not used by any notebook at this scale?)")
            bad += 1
            continue
        again = store.read_record(other)
        fields = sorted((set(rec) | set(again)) - VOLATILE)
        diff = [f for f in fields if json.dumps(rec.get(f), sort_keys=True) != json.dumps(again.get(f), sort_keys=True)]
        if diff:
            print(f"DIFFERS {path.name}: the replay's {diff} differ from the record's; not moved")
            bad += 1
            continue
        code, whole, dropped = moved_fingerprint(rec["code"], again["code"])
        write_moved(path, rec, code, "recomputed at full size by the notebooks from a scratch copy of the cache "
                    f"(the same key; every field but timings equal: {', '.join(fields)}) "
                    "(tools/move_fingerprints.py --phase full)", whole, dropped)
        print(f"{path.name}: {len(code)} functions" + (f"; whole files {whole}" if whole else "")
              + (f"; dropped {dropped}" if dropped else ""), flush=True)
    return 1 if bad else 0


@contextlib.contextmanager
def _env(**values: str):
    import os

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("tiny", "full"), required=True)
    ap.add_argument("--cache", type=Path, default=REPO / "data" / "runs")
    ap.add_argument("--replayed", type=Path, help="--phase full: the run cache the notebooks recomputed into")
    ap.add_argument("--only", nargs="*", help="record file names (tests, spot checks)")
    args = ap.parse_args(argv)
    if args.phase == "tiny":
        return phase_tiny(args.cache, args.only)
    return phase_full(args.cache, args.replayed)


if __name__ == "__main__":
    sys.exit(main())
