"""The one device resolver of spvr_lib (training, ranking, latency and the command lines)."""
from __future__ import annotations

import os

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``.

    None: CUDA if available, else the CPU.  ``"cuda"`` without an index means ``cuda:<LOCAL_RANK>``
    (the GPU torchrun gives this process; ``cuda:0`` outside torchrun).  Raises ValueError naming
    ``device`` for anything but None, "cpu" or "cuda[:index]", and for CUDA where none is available.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: expected None, 'cpu' or 'cuda[:index]'") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected None, 'cpu' or 'cuda[:index]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev
