"""Docs that run: every ``sipo ...`` command in a fenced code block of README.md and docs/*.md.

What is checked, for every command (also those of a block marked as needing real weights or a GPU,
whose flags must exist all the same):

- it parses with the CLI's own parser (every subcommand and flag a doc names exists and takes the
  values written), placeholders aside: ``[--x N]`` reads as ``--x N``, ``...`` as a placeholder value,
  ``key=value`` as no override;
- its ``key=value`` overrides are valid config keys with valid values, resolved with the config it
  names (a packaged name, or a file of this repository's configs/; another file is the reader's own,
  and the overrides are resolved against the defaults).

Run end to end against the tiny models (each named in ``END_TO_END``): every ``sipo config`` command
and ``sipo --version``; README's ablation command ``sipo train --config configs/sd15_pickapic_lora.yaml
objective.name=sipo objective.tau=0.8 objective.beta=2000`` with the tiny SD1.5 and a tiny manifest
appended as overrides (model, resolution, data, output_dir, 1 step); and docs/models.md's ``sipo export
--run RUN_DIR --format comfyui`` on that run.

A block preceded (last non-blank line before its opening fence) by ``SKIP_MARKER`` needs real weights
or a GPU: parsed and its overrides checked, never run.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from sipo.cli import build_parser, main
from sipo.config import load_config, packaged_config_names
from train_fixtures import write_jsonl_pairs

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP_MARKER = "<!-- docs-test: skip (needs real weights or a GPU) -->"
SUBCOMMANDS = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 (argparse keeps them there)
#: a command line: ``sipo``, ``python -m sipo`` or ``accelerate launch ... -m sipo``, then the arguments
COMMAND = re.compile(r"^(?:\$\s+)?(?:sipo|python -m sipo|accelerate launch\b.*?-m sipo)\s+(?P<args>.*)$")
OVERRIDE = re.compile(r"^[a-z_]+\.[a-z_0-9]+=")


@dataclass(frozen=True)
class DocCommand:
    file: str
    line: int
    text: str  # the arguments after ``sipo``, continuation lines joined, comment dropped
    skipped: bool  # its block carries SKIP_MARKER

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: sipo {self.text}"


def doc_commands() -> list[DocCommand]:
    """Every sipo command of the fenced code blocks of README.md and docs/*.md, in order."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_block, skipped, pending, start = False, False, "", 0
        for number, line in enumerate(lines, start=1):
            if line.strip().startswith("```"):
                if not in_block:
                    before = [previous for previous in lines[: number - 1] if previous.strip()]
                    skipped = bool(before) and before[-1].strip() == SKIP_MARKER
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            text = _without_comment(line).strip()
            if pending:
                text, start = pending + " " + text, start
            else:
                start = number
            if text.endswith("\\"):
                pending = text[:-1].strip()
                continue
            pending = ""
            match = COMMAND.match(text)
            if match is None:
                continue
            args = match.group("args").strip()
            first = args.split()[0] if args else ""
            if first in SUBCOMMANDS or first in ("--version", "--help"):  # not output such as "sipo - dpo: ..."
                found.append(DocCommand(str(path.relative_to(REPO)), start, args, skipped))
    return found


def _without_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` inside quotes stays)."""
    quote = None
    for index, char in enumerate(line):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def argv_of(command: DocCommand) -> list[str]:
    """The command's arguments as the parser gets them, placeholders read as the module docstring says."""
    tokens = []
    for token in shlex.split(command.text):
        token = token.replace("[", "").replace("]", "")
        if token in ("", "key=value"):
            continue
        if token == "..." or token.startswith("..."):
            if tokens and tokens[-1].startswith("--"):  # the value of an option: a placeholder
                tokens.append("PLACEHOLDER")
            continue
        tokens.append(token)
    return tokens


COMMANDS = doc_commands()


def test_the_docs_hold_commands_and_the_marker_is_used():
    assert len(COMMANDS) >= 30
    assert any(c.skipped for c in COMMANDS) and any(not c.skipped for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_doc_command_parses_and_its_overrides_are_valid(command, capsys):
    argv = argv_of(command)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stopped:
        if argv[:1] in (["--version"], ["--help"]) and stopped.code == 0:
            return
        pytest.fail(f"{command} does not parse: {capsys.readouterr().err.strip()}")
    overrides = [t for t in getattr(args, "overrides", []) if OVERRIDE.match(t)]
    unknown = [t for t in getattr(args, "overrides", []) if not OVERRIDE.match(t) and t != "PLACEHOLDER"]
    assert not unknown, f"{command}: {unknown} are no key=value overrides"
    config = getattr(args, "config", None)
    known = config is not None and (config in packaged_config_names() or (REPO / config).is_file())
    load_config(str(REPO / config) if known and (REPO / config).is_file() else config if known else None, overrides)


# ----------------------------------------------------------------------------- end to end
def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stopped:  # --version, --help
        return int(stopped.code or 0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The working directory the docs assume: configs/ of this repository, and the reader's own my.yaml."""
    root = tmp_path_factory.mktemp("docs_cwd")
    (root / "configs").symlink_to(REPO / "configs")
    (root / "my.yaml").write_text("objective:\n  name: sipo\n")
    return root


CONFIG_COMMANDS = [c for c in COMMANDS if argv_of(c)[:1] in (["config"], ["--version"])]


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=str)
def test_sipo_config_commands_run(command, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert _run(argv_of(command)) == 0, capsys.readouterr().err


END_TO_END = ("sipo train --config configs/sd15_pickapic_lora.yaml objective.name=sipo objective.tau=0.8 objective.beta=2000",
              "sipo export --run RUN_DIR --format comfyui")


def test_readme_ablation_and_the_comfyui_export_run_on_the_tiny_model(tiny_sd15_dir, workdir, monkeypatch, tmp_path,
                                                                       capsys):
    by_text = {f"sipo {c.text}": c for c in COMMANDS}
    train_command, export_command = (by_text[text] for text in END_TO_END)  # still in the docs, as written
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=2)
    run = tmp_path / "run"
    tiny = [f"model.pretrained_path={tiny_sd15_dir}", "model.resolution=32", "data.format=jsonl",
            f"data.path={manifest}", f"train.output_dir={run}", "train.max_steps=1", "train.batch_size=2",
            "train.lora_rank=4", "train.lora_alpha=4", "train.checkpoint_every=0", "train.report_to=none",
            "train.mixed_precision=no", "model.num_inference_steps=50"]
    monkeypatch.chdir(workdir)
    assert _run([*argv_of(train_command), *tiny, "--no-progress"]) == 0, capsys.readouterr().err
    saved = (run / "config.yaml").read_text()
    assert "name: sipo" in saved and "tau: 0.8" in saved and "beta: 2000.0" in saved  # the doc's overrides held
    argv = [str(run) if token == "RUN_DIR" else token for token in argv_of(export_command)]
    assert _run(argv) == 0, capsys.readouterr().err
    assert (run / "pytorch_lora_weights_comfyui.safetensors").is_file()
