"""The commands the READMEs show parse as the CLI takes them: a flag renamed or dropped in
the code, or a required argument the docs leave out, fails here rather than for a reader
(an `eval-pipeline` without its required `-o`, a `bench --precision` that never existed)."""

import functools
import re
import shlex
from pathlib import Path

import pytest
import typer

from service.cli import app  # the `cervixqc` entry point: the pipelines commands and serve

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "weights/README.md", "weights/data/hard_negatives.md")
SHELL_ENDS = ("&&", "|", ">", "&", ";", "2>&1", "done")


def _shown_commands(text: str) -> list[tuple[str, bool]]:
    """(`cervixqc ...`, whole) from shell blocks (continuation lines joined: whole commands)
    and inline code spans (prose may name a command or a flag alone: `cervixqc clean
    --no-pixel-check`, so only the names are held to the CLI there)."""
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"```sh\n(.*?)```", text, re.S)]
    lines = [m.group(1) for b in blocks for line in b.splitlines()
             if (m := re.search(r"(?:^|&&\s*|;\s*do\s+)(cervixqc\s.*)", line.strip()))]
    inline = re.findall(r"`(cervixqc\s[^`]*)`", text.replace("\n", " "))
    return [(c, True) for c in lines] + [(re.sub(r"\s+", " ", c), False) for c in inline]


def _parsed(command: str) -> tuple[str, list[str]] | None:
    """(subcommand, its arguments), or None for a command shown with placeholders."""
    tokens = shlex.split(command.replace("\\|", "|"), comments=True)[1:]
    for i, t in enumerate(tokens):
        if t in SHELL_ENDS or t.endswith(";"):
            tokens = tokens[:i] + ([t[:-1]] if t.endswith(";") and len(t) > 1 else [])
            break
    while tokens[:1] == ["--threads"]:
        tokens = tokens[2:]
    if tokens[:1] and tokens[0] in {o for p in _cli().params for o in p.opts} - {"--threads"}:
        return None  # `cervixqc --version`: the root's own flag, no command
    if not tokens or any(t.startswith("[") or "..." in t or "|" in t for t in tokens):
        return None  # `clean ...`, `--split val|test`, `[--detector D]`: a pattern, not a command
    return tokens[0], tokens[1:]


@functools.cache
def _cli():
    return typer.main.get_command(app)


def _commands() -> list[tuple[str, str, bool]]:
    return [(doc, c, whole) for doc in DOCS for c, whole in _shown_commands((REPO / doc).read_text())]


@pytest.mark.parametrize("doc,command,whole", _commands())
def test_every_command_the_docs_show_parses_with_the_cli(doc, command, whole):
    parsed = _parsed(command)
    if parsed is None:
        pytest.skip("a pattern (`clean ...`, `--split val|test`), not a command: nothing to parse")
    name, args = parsed
    group = _cli()
    assert name in group.commands, f"{doc}: no command {name!r} ({command})"
    command_ = group.commands[name]
    if not whole:  # click's resilient parsing takes unknown options too: each flag held to the command here
        known = {o for p in command_.params for o in (*p.opts, *p.secondary_opts)}
        unknown = [t.split("=")[0] for t in args if t.startswith("-") and t.split("=")[0] not in known]
        assert not unknown, f"{doc}: {command}\n  -> no option {', '.join(unknown)} for {name}"
    try:  # resilient: missing arguments pass, unknown options (above) and bad values do not
        command_.make_context(name, list(args), resilient_parsing=not whole)
    except Exception as e:  # typer vendors click: its UsageError is not click's
        if hasattr(e, "format_message"):
            pytest.fail(f"{doc}: {command}\n  -> {e.format_message()}")
        raise


def test_the_docs_show_whole_commands_at_all():
    assert len([c for _, c, whole in _commands() if whole and _parsed(c)]) > 30
