"""jobs/*.sbatch: valid bash, and every hpcstain command/option they use exists."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from hpcstain.cli import build_parser
from hpcstain.executors.array import main as array_main

JOBS = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.sbatch"))


def test_there_are_templates_for_train_stain_and_fuse() -> None:
    assert {p.name for p in JOBS} >= {"train.sbatch", "stain-array.sbatch", "fuse.sbatch"}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_template_is_valid_bash_with_sbatch_headers(path: Path) -> None:
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert re.search(r"^#SBATCH --job-name=hpcstain-", text, re.M)
    assert re.search(r"^#SBATCH --time=", text, re.M)


def _subcommand_options(verb: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {opt for a in sub.choices[verb]._actions for opt in a.option_strings}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_hpcstain_calls_use_real_verbs_and_options(path: Path) -> None:
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or "hpcstain " not in line:
            continue
        words = shlex.split(line.split("hpcstain ", 1)[1].replace('"$@"', ""))
        verb = words[0]
        if verb.startswith("train") or verb in ("fuse", "stain"):
            options = _subcommand_options(verb)
            for word in words[1:]:
                if word.startswith("--"):
                    assert word in options, f"{path.name}: hpcstain {verb} has no {word}"


def test_array_entry_point_options_exist(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        array_main(["--help"])
    help_text = capsys.readouterr().out
    for option in ("--device", "--batch-size", "--task-id", "--n-tasks"):
        assert option in help_text
