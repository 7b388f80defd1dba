"""Every command README.md shows exists as written: `ssd` sub-commands and their options (values checked
against the option's choices), `make` targets, and `prefect deployment run` names and parameters.

The commands themselves run elsewhere (CLI, flow and deployment tests, `make demo`); this keeps the
README from drifting away from the parsers it describes.
"""

from __future__ import annotations

import argparse
import inspect
import re
import shlex
from pathlib import Path

import pytest
import yaml

from ssd_core.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*(\|[A-Z][A-Z0-9_]*)*|<[^>]+>)$")


def _command_lines(program: str) -> list[str]:
    """Lines of indented code blocks and inline code spans that run `program` (comments dropped)."""
    lines = []
    for raw in README.splitlines():
        if raw.startswith("    "):
            lines.append(raw.strip())
    lines += re.findall(r"`([^`\n]+)`", README)
    found = []
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line).rstrip("\\").strip()
        words = line.split()
        if len(words) >= 2 and words[0].split("/")[-1] == program:
            found.append(line)
    return sorted(set(found))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _resolve(parser: argparse.ArgumentParser, words: list[str]) -> list[tuple[argparse.ArgumentParser, list[str]]]:
    """(sub-parser, remaining words) for the sub-command path at the start of `words`; `a|b` expands."""
    choices = _subparsers(parser)
    if not choices or not words or words[0].startswith("-"):
        return [(parser, words)]
    resolved = []
    names = list(choices) if PLACEHOLDER.match(words[0]) else words[0].split("|")  # `ssd COMMAND --help`
    for name in names:
        assert name in choices, f"`{name}` is not a sub-command here (known: {sorted(choices)})"
        resolved += _resolve(choices[name], words[1:])
    return resolved


SSD_LINES = _command_lines("ssd")


def test_readme_shows_the_commands_this_test_reads():
    assert len(SSD_LINES) >= 15, SSD_LINES
    assert {line.split()[1] for line in SSD_LINES} >= {"data", "train", "eval", "predict", "export", "detect",
                                                        "query", "bench"}


@pytest.mark.parametrize("line", SSD_LINES)
def test_readme_ssd_command_matches_the_parser(line):
    words = [w for w in shlex.split(line.replace("[", " ").replace("]", " "))[1:] if w != "..."]
    for parser, rest in _resolve(build_parser(), words):
        options = parser._option_string_actions
        for index, word in enumerate(rest):
            if not word.startswith("--"):
                continue
            assert word in options, f"{line!r}: {parser.prog} has no option {word}"
            action = options[word]
            value = rest[index + 1] if index + 1 < len(rest) else None
            if action.choices and value and not PLACEHOLDER.match(value):
                for alternative in value.split("|"):
                    assert alternative in action.choices, f"{line!r}: {word} {alternative} not in {action.choices}"


def _makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9_-]*):(?!=)", text, re.M))


def test_readme_make_targets_exist():
    named = set()
    for line in _command_lines("make"):
        named |= {word for word in line.split()[1:] if not word.startswith("-") and "=" not in word}
    assert named >= {"demo", "test", "eval", "server", "worker", "deploy"}, named
    missing = named - _makefile_targets()
    assert not missing, f"README names make targets the Makefile lacks: {sorted(missing)}"


def _deployment_flows() -> dict[str, object]:
    """'flow-name/deployment-name' -> the flow function, from prefect.yaml's entrypoints."""
    import importlib

    flows = {}
    for deployment in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        file_part, _, function_name = deployment["entrypoint"].rpartition(":")
        module = importlib.import_module(file_part.removesuffix(".py").replace("/", "."))
        flow = getattr(module, function_name)
        flows[f"{flow.name}/{deployment['name']}"] = flow
    return flows


def test_readme_deployment_runs_name_real_deployments_and_parameters():
    flows = _deployment_flows()
    # Joined continuation lines: a `prefect deployment run` may span two README lines.
    text = re.sub(r"\\\n\s*", " ", README)
    runs = re.findall(r"prefect deployment (?:run|schedule \w+) (\S+)([^\n`]*)", text)
    assert {name for name, _ in runs} >= set(flows), runs
    for name, rest in runs:
        assert name in flows, f"README runs {name}; prefect.yaml deploys {sorted(flows)}"
        parameters = inspect.signature(flows[name].fn).parameters
        for key in re.findall(r"--param (\w+)=", rest):
            assert key in parameters, f"{name} has no parameter {key} (has {sorted(parameters)})"


def test_layout_names_every_module_and_only_real_ones():
    """docs/layout.md has a line for every ssd_core module (sub-commands under `commands/`), and every
    module it names exists."""
    layout = (REPO / "docs" / "layout.md").read_text(encoding="utf-8")
    package = REPO / "ssd_core"
    modules = [p.relative_to(package) for p in package.rglob("*.py")
               if p.name != "__init__.py" and p.parent.name != "commands" and "__pycache__" not in p.parts]
    missing = [str(m) for m in modules if str(m) not in layout and f"`{m.name}`" not in layout]
    assert not missing, f"docs/layout.md does not mention {missing}"
    named = set(re.findall(r"`([a-z_/]+\.py)`", layout))
    assert named and all(list(package.rglob(Path(name).name)) for name in named), named
