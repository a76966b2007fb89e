# Copyright (c) resnext_det contributors. Licensed under the Apache License 2.0.
"""Read weight files of any format people have, with errors a user can act on.

Formats are recognised from the file's first bytes, not its name: a PyTorch zip
(``torch.save``), a pickle (legacy ``torch.save``, Detectron/Detectron2 ``.pkl``),
safetensors (timm, Hugging Face) and Torch7 binary ``.t7``.
"""
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import UserError

__all__ = [
    "CheckpointReadError",
    "READ_ERRORS",
    "TRUST_PICKLE_ENV",
    "safe_pickle_load",
    "torch_load_weights",
    "SourceWeights",
    "sniff_container",
    "read_weights_file",
    "describe_read_failure",
    "KEY_FAMILIES",
    "key_family",
]


class CheckpointReadError(UserError):
    """A file that is missing, truncated, corrupt or not a checkpoint."""


#: Errors raised by pickle / torch.load / zipfile on files that are not what
#: they claim to be (truncated downloads, random bytes, HTML error pages): whoever
#: reads a weights file turns them into a :class:`CheckpointReadError`.
READ_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    UnicodeDecodeError,
    zipfile.BadZipFile,
    struct.error,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    TypeError,
    MemoryError,
    OverflowError,
    OSError,  # a truncated zip: "[Errno 22] Invalid argument" from the zip reader
)

#: ``RESNEXT_DET_TRUST_PICKLE=1`` lets pickles create any object (they run code then):
#: only for files you trust. Without it, weight and proposal pickles may hold numpy
#: arrays and plain containers only.
TRUST_PICKLE_ENV = "RESNEXT_DET_TRUST_PICKLE"


@dataclass
class SourceWeights:
    """The raw content of a weight file.

    Attributes:
        path: the file.
        container: "zip", "pickle", "safetensors" or "t7".
        tensors: flat name -> tensor dict (empty for Torch7, see ``tree``).
        tree: the Torch7 module tree (``torchfile`` objects), for "t7".
        extra: other entries of the file (e.g. ``__author__``).
    """

    path: str
    container: str
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    tree: Any = None
    extra: Dict[str, Any] = field(default_factory=dict)


def sniff_container(path: str) -> str:
    """"zip", "pickle", "safetensors", "t7" or "unknown", from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = os.path.getsize(path)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n <= size - 8:
            return "safetensors"
    if len(head) >= 8:
        typ, idx = struct.unpack("<ii", head[:8])
        # A Torch7 file starts with a table (3) or a torch object (4), index 1.
        if typ in (3, 4) and idx == 1:
            return "t7"
    return "unknown"


def describe_read_failure(path: str, err: BaseException, *, what: str = "") -> str:
    """The message for a file that could not be read: its size and likely causes."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    what = what or repr(path)
    return (
        f"{what} ({size} bytes) is not a readable checkpoint: {type(err).__name__}: "
        f"{str(err)[:300]}. It is probably truncated (an interrupted download or copy: "
        "compare its size and sha256 with the source) or not a weight file at all."
    )


_TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles Detectron/Caffe2 ``.pkl`` files (dicts of numpy arrays) without
    running arbitrary code: only numpy array reconstruction and containers."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # numpy arrays pickled with protocol 2
        # numpy arrays pickled with protocol 5 (stage 2's proposal files): np.frombuffer
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),
        # Detectron2's proposal files may store the box mode as its enum.
        ("detectron2.structures.boxes", "BoxMode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the pickle wants to create {module}.{name}, which a weight file does not need "
            "(pass --trust-pickle to allow it if you trust the file)"
        )


def safe_pickle_load(path: str, *, what: str = "") -> Any:
    """Unpickle ``path`` allowing numpy arrays and plain containers only (no code runs),
    unless ``RESNEXT_DET_TRUST_PICKLE=1``. A pickle that wants anything else is a
    :class:`CheckpointReadError` naming the file, the class it wanted and the opt-in."""
    what = what or repr(path)
    with open(path, "rb") as f:
        if os.environ.get(TRUST_PICKLE_ENV) == "1":
            return pickle.load(f, encoding="latin1")
        try:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            if "wants to create" in str(e):
                raise CheckpointReadError(
                    f"{what}: refused to unpickle it: {str(e).split(' (pass')[0]}. Unpickling runs "
                    f"code; if you trust the file, set {TRUST_PICKLE_ENV}=1."
                ) from e
            raise


def torch_load_weights(path: str, *, trust_pickle: Optional[bool] = None) -> Any:
    """``torch.load`` of tensors, numbers and plain containers only (``weights_only``),
    whatever the torch version's default. ``trust_pickle`` (default:
    ``RESNEXT_DET_TRUST_PICKLE=1``) allows any object: the file's code runs then."""
    if trust_pickle is None:
        trust_pickle = os.environ.get(TRUST_PICKLE_ENV) == "1"
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        # "unsupported GLOBAL x.y": the file wants to create an object (run code). Other
        # messages ("Unsupported operand 96") mean a corrupt file: a read failure.
        if not trust_pickle and "unsupported global" in str(e).lower():
            raise CheckpointReadError(
                f"{path!r} holds Python objects besides tensors (a training checkpoint with "
                "its arguments, for example), which would run code when loaded: refused. If you "
                f"trust the file, pass --trust-pickle (tools) or set {TRUST_PICKLE_ENV}=1."
            ) from e
        raise


def _to_tensor(name: str, v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    raise CheckpointReadError(f"entry {name!r} is a {type(v).__name__}, not a tensor")


def _unwrap(obj: Any, path: str, *, use_ema: bool) -> Dict[str, Any]:
    """The name -> tensor dict inside the usual wrappers."""
    if not isinstance(obj, dict):
        raise CheckpointReadError(
            f"{path!r} holds a {type(obj).__name__}, not a dict of weights: it is not a checkpoint"
        )
    order = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model", "model_state", "blobs", "module")
    for key in order:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner:
            return inner
    if use_ema:  # never the non-EMA weights in their place
        entries = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise CheckpointReadError(
            f"--use-ema: {path!r} has no EMA weights (no 'state_dict_ema' or 'model_ema' entry; "
            f"its entries: {entries}): leave out --use-ema to convert its weights"
        )
    return obj


def read_weights_file(path: str, *, use_ema: bool = False, trust_pickle: bool = False) -> SourceWeights:
    """Read ``path`` into a :class:`SourceWeights`; errors name the problem.

    Args:
        path: the weight file.
        use_ema: take ``state_dict_ema`` of a timm training checkpoint.
        trust_pickle: allow arbitrary Python objects in pickles (only for files
            you trust: unpickling runs code).
    """
    if not os.path.exists(path):
        raise CheckpointReadError(f"{path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointReadError(f"{path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointReadError(f"{path!r} is empty (0 bytes): an interrupted download or copy?")
    container = sniff_container(path)
    try:
        if container == "zip":
            obj = torch_load_weights(path, trust_pickle=trust_pickle)
        elif container == "pickle":
            # Legacy (pre-1.6) torch.save files are pickles that start with
            # torch's magic number; others (Detectron/Caffe2 .pkl) are plain.
            with open(path, "rb") as f:
                legacy_torch = f.read(14)[2:] == b"\x8a\x0a" + _TORCH_LEGACY_MAGIC
            if legacy_torch:
                obj = torch_load_weights(path, trust_pickle=trust_pickle)
            else:
                with open(path, "rb") as f:
                    if trust_pickle:
                        obj = pickle.load(f, encoding="latin1")
                    else:
                        try:
                            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
                        except pickle.UnpicklingError as e:
                            if "wants to create" in str(e):
                                raise CheckpointReadError(f"{path!r}: {e}") from e
                            raise
        elif container == "safetensors":
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        elif container == "t7":
            import torchfile

            tree = torchfile.load(path)
            return SourceWeights(path=path, container="t7", tree=tree)
        else:
            with open(path, "rb") as f:
                head = f.read(16)
            raise CheckpointReadError(
                f"{path!r} is not a weight file in a format we read (PyTorch .pth/.pt, "
                f"safetensors, Detectron/Caffe2 .pkl, Torch7 .t7): it starts with {head!r}"
            )
    except CheckpointReadError:
        raise
    except READ_ERRORS as e:
        raise CheckpointReadError(describe_read_failure(path, e)) from e
    except Exception as e:  # torchfile raises its own exception class
        if type(e).__name__ == "T7ReaderException":
            raise CheckpointReadError(describe_read_failure(path, e)) from e
        raise

    flat = _unwrap(obj, path, use_ema=use_ema)
    # Entries next to the weights (``__author__``, resnext_det's metadata).
    extra = {
        k: v
        for k, v in (obj.items() if flat is not obj else ())
        if v is not flat and not isinstance(v, (torch.Tensor, np.ndarray))
    }
    tensors: Dict[str, torch.Tensor] = {}
    for k, v in flat.items():
        if not isinstance(k, str):
            raise CheckpointReadError(f"{path!r}: key {k!r} is not a string: not a weight dict")
        if isinstance(v, (torch.Tensor, np.ndarray)):
            tensors[k] = _to_tensor(k, v)
    if not tensors:
        raise CheckpointReadError(f"{path!r} holds no tensors: it is not a weight file")
    # DataParallel / DistributedDataParallel prefix.
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return SourceWeights(path=path, container=container, tensors=tensors, extra=extra)


#: Tell-tale keys of each backbone key family.
KEY_FAMILIES = {
    "torchvision": ("layer1.0.conv1.weight",),
    "detectron2": ("stem.conv1.weight", "res2.0.conv1.weight"),
    "caffe2": ("conv1_w", "res2_0_branch2a_w"),
}


def key_family(tensors: Dict[str, Any]) -> Optional[str]:
    """Which naming scheme a flat weight dict uses, or None."""
    for fam, keys in KEY_FAMILIES.items():
        if all(k in tensors for k in keys):
            return fam
    if any(k.startswith("backbone.") for k in tensors):
        return "detector"
    return None
