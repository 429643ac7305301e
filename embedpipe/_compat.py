"""Keep ``import timm`` working when torchvision's compiled ops cannot load.

timm imports torchvision, and torchvision registers fake (meta) kernels for its
``torchvision::nms`` and ``torchvision::qnms`` ops at import time without
checking that its compiled library loaded. When the installed torchvision
wheel was built for another torch variant (a CUDA build next to a CPU torch),
that library fails to load and ``import torchvision`` dies with
``operator torchvision::nms does not exist``. embedpipe never calls those ops;
defining their schemas (no kernels) is enough for the import to succeed.

We do this only when torchvision's own library fails to load, so a working
install is left untouched.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# Schemas of the two ops that torchvision's _meta_registrations.py refers to
# unconditionally (csrc/ops/nms.cpp, csrc/ops/quantized/cpu/qnms_kernel.cpp).
_MISSING_OP_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_done = False


def _torchvision_ops_library() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    candidates = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    return candidates[0] if candidates else None


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` (and so ``import timm``) succeed. Idempotent."""
    global _done
    if _done or "torchvision" in sys.modules:
        _done = True
        return
    import torch

    library = _torchvision_ops_library()
    if library is None:
        _done = True
        return
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as error:
        logger.debug("torchvision's compiled ops do not load (%s); defining their schemas", error)
        for name, schema in _MISSING_OP_SCHEMAS.items():
            namespace, op = name.split("::")
            if not torch._C._dispatch_has_kernel(name) and not hasattr(getattr(torch.ops, namespace), op):
                torch.library.define(name, schema)
    _done = True
