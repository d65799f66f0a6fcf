"""Turning a user's ``device`` argument into a torch device that exists, or a clear error.

torch itself answers ``device="nonsense"`` with a list of twenty backend names, and
``device="cuda"`` on a CPU-only build with an ``AssertionError`` raised deep inside ``Module.to``,
after the checkpoint has already been read. Checking first costs nothing and says what to do.
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["DeviceLike", "resolve_device"]

DeviceLike = Union[str, int, torch.device, None]


def _cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this PyTorch build ({torch.__version__}) has no CUDA support"
    return "no NVIDIA GPU or driver was found"


def resolve_device(device: DeviceLike = None) -> torch.device:
    """The device to run on: ``None`` means CUDA when available, else CPU.

    Args:
        device: ``None``, a string such as ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``, a CUDA
            index, or a ``torch.device``.

    Raises:
        TypeError: ``device`` is of another type.
        ValueError: the string is not a device name torch knows, or the device is not available on
            this machine (the message says why and what to pass instead).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', a torch.device or None, "
                        f"got {type(device).__name__}")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device {device!r} is not a device name PyTorch knows; use 'cpu', 'cuda', 'cuda:N' "
                         "(N-th GPU) or 'mps' (Apple GPU)") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} was asked for, but CUDA is not available: {_cuda_reason()}; "
                             "use device='cpu' (or leave it unset to pick CUDA only when present)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(dev)!r} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0 .. cuda:{count - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {str(dev)!r} was asked for, but Apple's MPS backend is not available on this "
                             "machine; use device='cpu'")
    elif dev.type not in ("cpu", "meta"):
        try:  # xpu, hpu, privateuseone...: ask the backend itself
            torch.empty(0, device=dev)
        except Exception as err:  # noqa: BLE001 - each backend raises its own kind
            raise ValueError(f"device {str(dev)!r} is not usable here ({type(err).__name__}: {err}); "
                             "use device='cpu'") from err
    return dev
