"""infra/Dockerfile, linted in Python: pinned bases, non-root, no remote ADD, and the `make setup` install."""

from __future__ import annotations

import re

import pytest
from infra_helpers import INFRA, REPO, dockerfile_instructions, final_user

DOCKERFILE = (INFRA / "Dockerfile").read_text()
GPU_BASE = "nvidia/cuda:13.0.1-runtime-ubuntu24.04"


def _arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def lint(text: str) -> list[str]:
    """Problems hadolint would also report (DL3006/DL3007/DL3020/DL3002 and friends), as messages."""
    instructions = dockerfile_instructions(text)
    defaults = _arg_defaults(instructions)
    problems = []
    for keyword, args in instructions:
        if keyword == "FROM":
            image = args.split()[0]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m[1], m[0]), image)
            name = image.split("@")[0].rsplit("/", 1)[-1]
            if "@sha256:" not in image and ":" not in name:
                problems.append(f"FROM {image} has no tag")
            if name.endswith(":latest"):
                problems.append(f"FROM {image} uses latest")
        if keyword == "ADD" and re.search(r"\b(https?|ftp)://", args):
            problems.append(f"ADD of a URL: {args}")
        if keyword in ("ENV", "ARG") and re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)\w*\s*=\s*\S", args):
            problems.append(f"{keyword} bakes a credential: {args}")
    keywords = [keyword for keyword, _ in instructions]
    run_points = [i for i, k in enumerate(keywords) if k in ("CMD", "ENTRYPOINT")]
    user_points = [i for i, k in enumerate(keywords) if k == "USER"]
    if not run_points:
        problems.append("no CMD or ENTRYPOINT")
    elif not user_points or user_points[-1] > min(run_points):
        problems.append("no USER before CMD/ENTRYPOINT")
    user = final_user(text).split(":")[0]
    if user in ("", "root", "0"):
        problems.append(f"runs as {user or 'root'}")
    if re.search(r"\blatest\b", " ".join(args for _, args in instructions)):
        problems.append("mentions a latest tag")
    return problems


def test_dockerfile_passes_lint():
    assert lint(DOCKERFILE) == []


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("FROM python\nUSER app\nCMD [\"x\"]\n", "has no tag"),
        ("FROM python:latest\nUSER app\nCMD [\"x\"]\n", "uses latest"),
        ("FROM python:3.11\nADD https://example.com/x.tgz /x\nUSER app\nCMD [\"x\"]\n", "ADD of a URL"),
        ("FROM python:3.11\nCMD [\"x\"]\n", "no USER before CMD"),
        ("FROM python:3.11\nUSER root\nCMD [\"x\"]\n", "runs as root"),
        ("FROM python:3.11\nENV AWS_SECRET_ACCESS_KEY=abc\nUSER app\nCMD [\"x\"]\n", "bakes a credential"),
        ("ARG BASE=python\nFROM ${BASE}\nUSER app\nCMD [\"x\"]\n", "has no tag"),
    ],
)
def test_lint_catches_what_it_claims_to(bad, problem):
    assert any(problem in message for message in lint(bad)), lint(bad)


def test_base_image_is_a_build_arg_with_cpu_default_and_documented_gpu_variant():
    instructions = dockerfile_instructions(DOCKERFILE)
    assert ("FROM", "${BASE}") in instructions
    assert _arg_defaults(instructions)["BASE"].startswith("python:3.11")
    # The GPU base named in the docs and env example is pinned and the same everywhere.
    for path in (INFRA / "Dockerfile", INFRA / "README.md", INFRA / "env.example"):
        bases = set(re.findall(r"nvidia/cuda:[\w.\-]+", path.read_text()))
        assert bases == {GPU_BASE}, path


def _makefile_install() -> tuple[str, str]:
    """(constraints file, extras) from the `make setup` pip line."""
    makefile = (REPO / "Makefile").read_text()
    match = re.search(r"pip install [^\n]*?-c (\S+) -e '\.\[([\w,]*)\]'", makefile)
    assert match, "the Makefile's setup install line changed shape"
    return match[1], match[2]


def test_image_installs_the_same_dependency_set_as_make_setup():
    constraints, extras = _makefile_install()
    instructions = dockerfile_instructions(DOCKERFILE)
    assert _arg_defaults(instructions)["EXTRAS"] == extras
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    installs = [run for run in runs if "pip install" in run and "-e" in run]
    assert installs, "no editable install of the project"
    for run in installs:
        assert f"-c {constraints}" in run and '-e ".[${EXTRAS}]"' in run, run
    copies = " ".join(args for keyword, args in instructions if keyword == "COPY")
    assert "pyproject.toml" in copies and constraints in copies
    # Nothing installed outside the lock: every pip install in the image goes through the constraints.
    for run in runs:
        for command in re.findall(r"pip install[^;&]*", run):
            assert f"-c {constraints}" in command or '"pip>=24"' in command, command
    assert '"pip>=24"' in (REPO / "Makefile").read_text()


def test_dockerignore_keeps_venv_state_and_env_files_out():
    ignored = {line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()}
    assert {".venv", ".git", ".state", "**/.env"} <= ignored


def test_image_user_matches_the_uid_the_manifests_run_as():
    assert final_user(DOCKERFILE) == "ray"
    assert "--uid 1000" in DOCKERFILE
