"""Recompute the pruned baselines whose records a code change made stale, each as it was first computed, and say
whether today's code gives the same network (issue 31: the baselines' entry point gained Torch-Pruning's criteria).

A baseline record is cheap to recompute (seconds; RCP and CURL minutes), but the trainings that start from its
weights are hours: they are keyed by the digest of those weights, so where the recomputed network is the same
(same status, widths, parameters and weights digest), every training of it stays valid.  RCP's brief training and
CURL's masking depend on the number of torch threads; each record is recomputed with the threads its provenance
names.  Outside spvr_lib on purpose: its functions are not part of any fingerprint.

    python tools/reprune_baselines.py [--scale cpu] [--methods l1 rcp ...] [--threads 1|2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from spvr_lib import store, train  # noqa: E402
from spvr_lib.paper import base_models, pruned_networks, scales# noqa: E402

COMPARED = ("status", "error", "params_before", "params_after", "budget", "arch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=None, help="only the records computed with this many threads")
    args = parser.parse_args(argv)
    cfg = scales.get_scale(args.scale)
    account = json.loads((REPO / "figures" / args.scale / "reproduce_run.json").read_text())
    bases = {base_models.train_base(cfg, k, progress=False)["hash"]: k for k in cfg.models}
    paths = [store.cache_dir() / Path(p).name for p in account["cache"]["records"] if Path(p).name.startswith("baseline-")]
    same, differ = 0, 0
    for path in sorted(paths):
        old = store.read_record(path)
        key = old["key"]
        if args.methods and key["method"] not in args.methods:
            continue
        changed = store.stale_code(old.get("code"))
        if not changed:
            continue
        model_key = bases[key["base"]]
        weights = pruned_networks.pruned_dir() / f"{path.stem}.pt"
        old_digest = pruned_networks._description(weights).get("state_sha256")
        threads = old.get("provenance", {}).get("device", {}).get("torch_threads") or 1
        if args.threads is not None and int(threads) != args.threads:
            continue
        torch.set_num_threads(int(threads))
        model, info = pruned_networks.pruned_network(cfg, model_key, key["method"], old["rate"], seed=key["seed"],
                                               progress=False)
        new = store.read_record(path)
        digest = None if model is None else train.state_dict_digest(pruned_networks.pruned_state(model))
        diff = [f for f in COMPARED if json.dumps(old.get(f)) != json.dumps(new.get(f))]
        if digest != old_digest:
            diff.append("weights")
        verdict = "SAME" if not diff else "DIFFERS " + ", ".join(diff)
        same, differ = same + (not diff), differ + bool(diff)
        print(f"{path.name} {model_key} {key['method']} rate {old['rate']} threads {threads}: {verdict}", flush=True)
    print(f"{same} recomputed the same, {differ} differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
