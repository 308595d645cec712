"""Sizes: THE parameter counter (``count_params``), the count of a spec's network without building it
(``spec_params``, on the meta device, memoised) and the paper's size on disk (``model_size_mb``)."""
from __future__ import annotations

import functools
import io
import json

import torch
from torch import nn

from spvr_lib.models.networks import _CLASSES
from spvr_lib.models.specs import validate
from spvr_lib.store import canonical_json


def count_params(model: nn.Module) -> int:
    """THE parameter counter: numel of every parameter (BN and classifier included, buffers not)."""
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=1 << 16)
def _params_of_json(spec_json: str) -> int:
    spec = json.loads(spec_json)
    with torch.device("meta"):  # no weights allocated; init skipped (it does not change the count)
        return count_params(_CLASSES[spec["arch"]](spec))


def spec_params(spec: dict) -> int:
    """count_params(build(spec)) without allocating weights (meta device, memoised)."""
    validate(spec)
    return _params_of_json(canonical_json(spec))


def model_size_mb(model: nn.Module) -> float:
    """Size in MB (1e6 bytes) of ``torch.save(model.state_dict())``: the paper's "size on disk"."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 1e6
