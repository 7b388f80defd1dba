"""torchvision without torch._dynamo, for processes whose start-up is on the clock (the bulk actors).

torchvision.ops.roi_align runs ``from torch._dynamo.utils import is_compile_supported`` when torchvision is
imported, which loads all of torch._dynamo (sympy, FX symbolic shapes): 1.25 s of the 1.4 s torchvision
import on a 2-core CPU, in every process, for a function roi_align calls only inside its
own forward (our models never call roi_align and never compile). `import_torchvision` imports torchvision
while ``torch._dynamo.utils`` is a stand-in whose ``is_compile_supported`` imports the real one on first
call, then removes the stand-ins, so a later ``import torch._dynamo`` (torch.compile, torch.export) loads
the real package as usual. If torchvision (or torch._dynamo) is already imported, or the stand-in does not
satisfy this torchvision, it is a plain ``import torchvision``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_STAND_INS = ("torch._dynamo", "torch._dynamo.utils")


def _is_compile_supported(device_type: str) -> Any:
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, skipping torch._dynamo's import cost (see the module docstring)."""
    if "torchvision" in sys.modules or "torch._dynamo" in sys.modules:
        return importlib.import_module("torchvision")
    import torch

    package = types.ModuleType("torch._dynamo")
    package.__path__ = []  # any other torch._dynamo submodule fails to import -> plain import below
    utils = types.ModuleType("torch._dynamo.utils")
    utils.is_compile_supported = _is_compile_supported
    package.utils = utils
    sys.modules.update(dict(zip(_STAND_INS, (package, utils))))
    try:
        return importlib.import_module("torchvision")
    except ImportError:
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
        _remove_stand_ins(torch, package, utils)
        return importlib.import_module("torchvision")
    finally:
        _remove_stand_ins(torch, package, utils)


def _remove_stand_ins(torch: types.ModuleType, package: types.ModuleType, utils: types.ModuleType) -> None:
    for name, stand_in in zip(_STAND_INS, (package, utils)):
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
    if torch.__dict__.get("_dynamo") is package:  # the import system binds submodules on their parent
        del torch._dynamo
