"""`make gpu-check` / `python -m ssd_core.gpucheck`: the CPU dry run on the stock CUDA image's package set
(Ray, Prefect, DuckDB, pycocotools, s3fs and fsspec made unimportable), the one line without CUDA, and
the real run on a GPU (marked `gpu`).

Each run is a fresh process from a folder outside the repository with only the repository on PYTHONPATH,
as on a node the source was copied to. No timing is asserted; what is checked is that every figure was
measured, that the table shows the JSON's figures, and what the process imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ssd_core.precision import resolve_precision

REPO = Path(__file__).resolve().parents[1]
ARCH = "ssdlite320_mobilenet_v3_large"
# What a stock CUDA PyTorch image has besides Python (and what these pull in).
STOCK = ("torch", "torchvision", "numpy", "pillow", "pyarrow", "tqdm")
NOT_IN_STOCK = ("ray", "prefect", "duckdb", "pycocotools", "s3fs", "fsspec")

# Runs ssd_core.gpucheck as `python -m` would, with every module the stock image lacks not found (an import
# raises ModuleNotFoundError and importlib.util.find_spec answers None, as there); then writes what was
# looked for of those and what was imported.
DRIVER = """
import importlib.abc, json, runpy, sys

blocked, argv, report = set({blocked!r}), {argv!r}, {report!r}
attempts = []

class StockImage(importlib.abc.MetaPathFinder):
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            attempts.append(name)
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

sys.meta_path[:] = [StockImage(list(sys.meta_path))]
before = set(sys.modules)
sys.argv = ["ssd_core.gpucheck", *argv]
code = 0
try:
    runpy.run_module("ssd_core.gpucheck", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
imported = sorted({{m.partition(".")[0] for m in set(sys.modules) - before}})
with open(report, "w") as f:
    json.dump({{"attempts": attempts, "imported": imported}}, f)
sys.exit(code)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _requirement_closure(names: tuple[str, ...]) -> set[str]:
    """The distributions ``names`` install, following their (non-optional) requirements."""
    seen: set[str] = set()
    todo = [canonicalize_name(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            required = requires(name) or []
        except PackageNotFoundError:
            continue  # a requirement for another platform
        for text in required:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def modules_not_in_the_stock_image() -> set[str]:
    """Top-level modules installed here that the stock image would not have: those of distributions outside
    STOCK's requirement closure, and NOT_IN_STOCK's even where the closure has them (torch requires fsspec)."""
    allowed = _requirement_closure(STOCK) - {canonicalize_name(name) for name in NOT_IN_STOCK}
    blocked = set(NOT_IN_STOCK)
    for module, names in packages_distributions().items():
        if module != "ssd_core" and not {canonicalize_name(name) for name in names} & allowed:
            blocked.add(module)
    return blocked


def test_dry_run_on_the_stock_image_package_set(tmp_path):
    out, report = tmp_path / "figures" / "gpu-check.json", tmp_path / "imports.json"
    argv = ["--device", "cpu", "--height", "96", "--width", "128", "--json", str(out)]
    blocked = modules_not_in_the_stock_image()
    assert {"ray", "prefect", "duckdb", "pycocotools", "pandas", "s3fs", "fsspec"} <= blocked  # installed here
    driver = DRIVER.format(blocked=sorted(blocked), argv=argv, report=str(report))
    result = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    imports = json.loads(report.read_text())
    # Not even a guarded import of these (torch and pyarrow look for optional ones, e.g. pandas, and go on).
    assert not [name for name in imports["attempts"] if name.partition(".")[0] in NOT_IN_STOCK]
    assert {"torch", "torchvision", "numpy", "PIL", "pyarrow"} <= set(imports["imported"])
    assert not set(imports["imported"]) & blocked

    figures = json.loads(out.read_text())
    assert figures["errors"] == [] and figures["notes"] == [] and figures["device"]["device"] == "cpu"
    assert figures["settings"]["archs"] == ARCH and figures["settings"]["compile"] is False
    auto = resolve_precision("auto", "cpu")
    amp = auto if auto != "fp32" else "bf16"
    by_section: dict[str, dict[str, dict]] = {}
    for row in figures["rows"]:
        assert row["arch"] == ARCH and row["batch_size"] == 2 and row["images_per_s"] > 0
        by_section.setdefault(row["section"], {})[row["variant"]] = row
    side_by_side = {"torchvision_fp32", "ssd_core_fp32", f"ssd_core_auto({auto})"}
    assert set(by_section["inference"]) == side_by_side | {f"torchvision_{amp}_autocast"}
    assert set(by_section["training"]) == side_by_side | {f"torchvision_{amp}_autocast"}  # its recipe trains so
    assert list(by_section["bulk"]) == [f"network alone ({auto})", "decode_jpeg + resize on cpu",
                                        "network + post-processing", "actor batch: JPEG bytes -> table"]
    for rows in by_section.values():
        anchor = next(iter(rows.values()))
        for row in rows.values():  # each ratio is the one of its figures (up to their rounding)
            assert row["vs_first"] == pytest.approx(anchor["median_s"] / row["median_s"], abs=1e-3)
            assert row["images_per_s"] == pytest.approx(2 / row["median_s"], abs=1e-3)
    assert figures["bulk"]["decode"] == "torchvision.io.decode_jpeg(device='cpu')"
    assert [goal["met"] for goal in figures["goals"]] == [None, None]  # goals are judged on a GPU only

    lines = result.stdout.splitlines()
    assert lines[0].startswith("# gpu-check on cpu:") and "CPU dry run" in lines[0]
    header = next(index for index, line in enumerate(lines) if line.split()[:3] == ["section", "arch", "variant"])
    shown = [line.split() for line in lines[header + 1 : header + 1 + len(figures["rows"])]]
    assert [(words[0], words[1]) for words in shown] == [(row["section"], row["arch"]) for row in figures["rows"]]
    assert [words[-2:] for words in shown] == [[f"{row['images_per_s']:.1f}", f"{row['vs_first']:.2f}x"]
                                               for row in figures["rows"]]
    assert sum("not judged" in line for line in lines) == 2
    assert lines[-1] == f"figures written to {out}"


def test_without_cuda_one_line_and_a_failure(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this runs (and means the same) on a GPU machine too.
    result = subprocess.run([sys.executable, "-m", "ssd_core.gpucheck"], cwd=tmp_path,
                            env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stdout + result.stderr == "no CUDA device\n"
    assert not (tmp_path / "gpu-check.json").exists()


def test_make_gpu_check_runs_the_script_with_the_source_on_pythonpath(tmp_path):
    result = subprocess.run(["make", "-s", "-C", str(REPO), "gpu-check", f"GPU_CHECK_PYTHON={sys.executable}",
                             f"GPU_CHECK_JSON={tmp_path / 'gpu-check.json'}"],
                            cwd=tmp_path, env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert result.stdout == "" and result.stderr.splitlines()[0] == "no CUDA device"


@pytest.mark.gpu
def test_gpu_run_measures_every_figure_on_the_gpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    argv = ["--archs", ARCH, "--train-arch", ARCH, "--bulk-arch", ARCH, "--batch-size", "8", "--train-batch-size", "4",
            "--repeats", "2", "--warmup", "1", "--compile", "on", "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "ssd_core.gpucheck", *argv], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["errors"] == [] and figures["device"]["device"].startswith("cuda")
    assert all(row["images_per_s"] > 0 for row in figures["rows"])
    inference = {row["variant"] for row in figures["rows"] if row["section"] == "inference"}
    assert any(variant.endswith("+compile") for variant in inference)
    assert figures["bulk"]["decode"] == "torchvision.io.decode_jpeg(device='cuda')"
    assert all(isinstance(goal["met"], bool) for goal in figures["goals"])
