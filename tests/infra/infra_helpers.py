"""Helpers for the infra tests: paths, parsed manifests, and the environment variables the code reads."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

# Configuration the deployment must supply; other names (CUDA_VISIBLE_DEVICES, RANK, HOME...) are set by the
# runtime (Ray, the NVIDIA container runtime, the OS), not by infra files.
CONFIG_PREFIXES = ("AWS_", "RAY_", "PREFECT_", "SSD_")
# What the optional Kubernetes secret `ssd-s3` may carry (documented in infra/k8s/base.yaml and the README);
# on EKS the same role is played by IRSA on the service account.
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
}
_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_ENV_FUNCS = {"getenv", "get", "setdefault", "pop"}


def env_names_read_by_source(source: str) -> set[str]:
    """Environment variable names a Python module reads.

    Direct reads (`os.getenv("X")`, `os.environ.get("X")`, `os.environ["X"]`) plus, in modules that touch
    `os.environ` at all, string constants with a configuration prefix: that catches names kept in a tuple
    and looked up in a loop.
    """
    tree = ast.parse(source)
    names: set[str] = set()
    touches_environ = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            touches_environ = True
        elif isinstance(node, ast.Name) and node.id in ("environ", "getenv"):
            touches_environ = True
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            func_name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            is_env = func_name == "getenv" or (func_name in _ENV_FUNCS and owner.endswith("environ"))
            if is_env and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
        if (
            isinstance(node, ast.Subscript)
            and ast.unparse(node.value).endswith("environ")
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
            and isinstance(node.ctx, ast.Load)
        ):
            names.add(node.slice.value)
    if touches_environ:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith(CONFIG_PREFIXES)
                and _ENV_NAME.match(node.value)
            ):
                names.add(node.value)
    return {name for name in names if _ENV_NAME.match(name)}


# Entry points that never run in a deployment: `make demo` sets its own laptop defaults (PREFECT_HOME under
# .state, a long ephemeral-server timeout) with os.environ.setdefault, which a container does not need.
LOCAL_ONLY_MODULES = {"flows/demo.py"}


def code_config_env_names() -> set[str]:
    """Configuration variables (see CONFIG_PREFIXES) read under ssd_core/ and flows/ (but LOCAL_ONLY_MODULES)."""
    names: set[str] = set()
    for package in ("ssd_core", "flows"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.relative_to(REPO).as_posix() in LOCAL_ONLY_MODULES:
                continue
            names |= env_names_read_by_source(path.read_text(encoding="utf-8"))
    return {name for name in names if name.startswith(CONFIG_PREFIXES)}


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def infra_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in suffixes and ".data" not in p.parts)


def lock_versions() -> dict[str, str]:
    """Normalised name (PEP 503: lower-case, runs of -_. as one -) -> version from constraints.txt."""
    versions = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            versions[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return versions


def pod_specs(document: dict) -> Iterator[tuple[str, dict]]:
    """(label, pod spec) for every pod template in a KubeRay RayCluster/RayJob or a batch Job."""
    kind = document.get("kind")
    spec = document.get("spec", {})
    if kind == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "RayJob submitter", spec["submitterPodTemplate"]["spec"]
        spec = spec["rayClusterSpec"]
        kind = "RayCluster"
    if kind == "RayCluster":
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"worker group {group['groupName']}", group["template"]["spec"]
    elif kind == "Job":
        yield "job", spec["template"]["spec"]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_user(text: str) -> str:
    """The user the image's CMD/ENTRYPOINT run as (the last USER instruction), '' if none."""
    users = [args for keyword, args in dockerfile_instructions(text) if keyword == "USER"]
    return users[-1] if users else ""
