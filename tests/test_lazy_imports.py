"""torchvision imported without torch._dynamo still works, and torch._dynamo still loads afterwards."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import torch
from ssd_core.lazy_imports import import_torchvision

torchvision = import_torchvision()
assert "torch._dynamo" not in sys.modules and "_dynamo" not in torch.__dict__
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
pooled = torchvision.ops.roi_align(torch.ones(1, 1, 8, 8), torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]]), 2)
assert pooled.shape == (1, 1, 2, 2) and torch.allclose(pooled, torch.ones(1, 1, 2, 2))
roi_align_module = sys.modules["torchvision.ops.roi_align"]  # torchvision.ops.roi_align is the function
assert roi_align_module.is_compile_supported("cpu") is True  # the stand-in forwards to the real one
import torch._dynamo
assert hasattr(torch._dynamo, "optimize") and "torch._dynamo.utils" in sys.modules
assert torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2)).tolist() == [2.0, 2.0]
from ssd_core import build_model
model = build_model("ssdlite320_mobilenet_v3_large").eval()
with torch.inference_mode():
    out = model([torch.rand(3, 64, 64)])
assert set(out[0]) == {"boxes", "scores", "labels"}
print("ok")
"""


def test_torchvision_without_dynamo_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


FALLBACK_PROBE = """
import importlib.abc, sys
import torch

class NeedsMoreDynamo(importlib.abc.MetaPathFinder):
    # A torchvision that needs more of torch._dynamo than the stand-in has: its first import fails.
    def find_spec(self, name, path, target=None):
        stand_in = sys.modules.get("torch._dynamo")
        if name == "torchvision.ops.roi_align" and stand_in is not None and not hasattr(stand_in, "config"):
            raise ImportError("cannot import name 'config' from 'torch._dynamo'")
        return None

sys.meta_path.insert(0, NeedsMoreDynamo())
from ssd_core.lazy_imports import import_torchvision

torchvision = import_torchvision()  # falls back to a plain import, which loads the real torch._dynamo
assert hasattr(sys.modules["torch._dynamo"], "config")
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]
print("ok")
"""


def test_a_torchvision_the_stand_in_does_not_satisfy_gets_a_plain_import():
    result = subprocess.run([sys.executable, "-c", FALLBACK_PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_already_imported_torchvision_is_returned_as_is():
    import torchvision

    from ssd_core.lazy_imports import import_torchvision

    assert import_torchvision() is torchvision
