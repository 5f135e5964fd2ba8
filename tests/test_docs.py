"""The manual stays true: its links resolve and the commands it quotes parse with today's flags.

README.md and every docs/*.md page are read as GitHub renders them:
* every relative link or image (`[t](path#anchor)`, `<img src=...>`) names a file that exists,
  and its `#anchor` a heading of that page (GitHub's slugs: lower case, punctuation dropped,
  spaces to hyphens, repeats numbered -1, -2, ...);
* every `python main.py ...` (also as `python -m semmae_jax ...` or the installed `semmae ...`),
  `python -m convert ...`, `python bench/NAME.py ...` and `python experiments/NAME.py ...` in a code block or a code span is handed to that command's own entry (`semmae_jax.cli.main`, which
  dispatches through `cli.COMMANDS`; `convert.cli.main`; the bench script's `main(argv)`),
  whose argparse parser reads it and is then stopped: nothing runs. A command added to
  `cli.COMMANDS` is covered without touching this file. The contract this relies on: a
  command parses its flags before it does anything (bad flags fail before anything starts).
  `--config NAME` must name a preset in configs/; `launch ... -- COMMAND` checks COMMAND too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from unittest import mock

import pytest

from semmae_jax.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]+)\"")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
SHELL_BREAK = {"&&", "||", ";", "|", ">", ">>", "<", "&", ">&", "2>", "2>&"}


# ------------------------------------------------------------------------------ markdown


def split_markdown(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): fenced blocks apart, so that `#` in code is not a heading."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif fenced:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading (github-slugger): rendered text, lower case, only word
    characters, hyphens and spaces kept, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every `#anchor` a link into `page` may name."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    prose, _ = split_markdown(page.read_text())
    for line in prose:
        found.update(EXPLICIT_ANCHOR.findall(line))
        if match := HEADING.match(line):
            base = slug(match.group(2))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file or anchor does not exist, with the reason."""
    prose, _ = split_markdown(page.read_text())
    problems = []
    for line in prose:
        line = CODE_SPAN.sub("", line)
        for target in LINK.findall(line) + IMG_SRC.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            if not linked.exists():
                problems.append(f"{page.name}: {target}: no file {linked}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{page.name}: {target}: no heading with the anchor #{anchor} in {linked.name}")
    return problems


# ------------------------------------------------------------------------------ commands


def shell_lines(text: str) -> Iterator[str]:
    """The code of a page as shell lines: fenced blocks (continuations joined) and code spans."""
    prose, code = split_markdown(text)
    yield from re.sub(r"\\\n", " ", "\n".join(code)).splitlines()
    for line in prose:
        yield from (span for _, span in CODE_SPAN.findall(line))


def quoted_commands(text: str) -> list[tuple[str, list[str]]]:
    """Every (program, argv) of `python main.py` (`python -m semmae_jax`, `semmae`), `python -m convert`
    `python bench/X.py` and `python experiments/X.py`."""
    found = []
    for line in shell_lines(text):
        found += _commands_in(line)
    return found


def _commands_in(line: str) -> list[tuple[str, list[str]]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        tokens = list(lexer)
    except ValueError:  # prose in a code span, e.g. an unbalanced quote
        return []
    found = []
    for i, token in enumerate(tokens):
        if " " in token:  # a quoted command line, e.g. ssh's --command "cd x && python main.py ..."
            found += _commands_in(token)
        if token not in ("python", "python3", "semmae"):
            continue
        rest = tokens[i + 1 :]
        end = next((j for j, t in enumerate(rest) if t in SHELL_BREAK), len(rest))
        words = [t.strip("[]") for t in rest[:end] if t.strip("[]")]  # [--flag X]: an optional part, given
        if token == "semmae":  # the installed `python main.py` (the bare name in prose is no command)
            found += [("main.py", words)] if words else []
        elif words[:1] == ["main.py"] or words[:2] == ["-m", "semmae_jax"]:
            found.append(("main.py", words[1 if words[0] == "main.py" else 2 :]))
        elif words[:2] == ["-m", "convert"]:
            found.append(("convert", words[2:]))
        elif words and re.fullmatch(r"(bench|experiments)/\w+\.py", words[0]):
            found.append((words[0], words[1:]))
    return found


class Parsed(BaseException):
    """Raised in place of running a command once its parser has read the flags."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


@contextlib.contextmanager
def stop_after_parsing() -> Iterator[None]:
    """Every `ArgumentParser.parse_args` parses as usual, then stops the command with `Parsed`."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise Parsed(original(self, *args, **kwargs))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        yield


@functools.cache
def entry(program: str) -> Callable[[Sequence[str]], None]:
    """The `main(argv)` that a quoted program line runs."""
    if program == "main.py":
        from semmae_jax import cli

        return cli.main
    if program == "convert":
        from convert import cli as convert_cli

        return convert_cli.main
    return importlib.import_module(f"{Path(program).parent.name}.{Path(program).stem}").main


def parse_problem(program: str, argv: list[str]) -> str | None:
    """Why `program argv` does not parse (None when it does); runs nothing."""
    errors = io.StringIO()
    try:
        with stop_after_parsing(), contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            entry(program)(argv)
    except Parsed as parsed:
        return _parsed_problem(parsed.namespace)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            return None
        return (errors.getvalue().strip().splitlines() or [str(exit_.code)])[-1]
    return "the command ran past its parser without stopping: it does not read its flags with argparse"


def _parsed_problem(namespace: argparse.Namespace) -> str | None:
    preset = getattr(namespace, "config", None)
    if isinstance(preset, str) and not Path(preset).suffix and not (CONFIG_DIR / f"{preset}.py").is_file():
        return f"--config {preset}: no such preset in configs/"
    nested = getattr(namespace, "command", None)  # `launch ... -- COMMAND`
    if isinstance(nested, list) and nested:
        return parse_problem("main.py", nested[1:] if nested[0] == "--" else nested)
    return None


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quoted_commands_parse(page: Path) -> None:
    problems = [f"python {program} {shlex.join(argv)}\n    -> {problem}"
                for program, argv in quoted_commands(page.read_text())
                if (problem := parse_problem(program, argv))]
    assert not problems, "\n".join(problems)


def test_readme_quotes_the_main_job_and_the_manual() -> None:
    """The extractor finds what the door shows (else the test above would pass on nothing)."""
    readme = (ROOT / "README.md").read_text()
    assert ("main.py", ["pretrain"]) in quoted_commands(readme)
    linked = {target.partition("#")[0] for target in LINK.findall(readme)}
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= linked, "README links every docs page"


def test_checks_catch_a_broken_link_and_a_renamed_flag(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## Fine-tuning, evaluation\n")
    page.write_text("# A `page`\n[ok](other.md#fine-tuning-evaluation) [self](#a-page) [gone](missing.md) "
                    "[bad anchor](other.md#nowhere) `[not a link](x.md)`\n\n```bash\n"
                    "python main.py pretrain --epochs 2 \\\n    --no_such_flag 3   # renamed\n"
                    "python -m convert to-flax a.pth out && python bench/memory.py --bogus\n"
                    "semmae eval --nb_classes 4; python -m semmae_jax launch -- pretrain\n```\nthe `semmae` command\n")
    assert [p.split(": ", 2)[1] for p in broken_links(page)] == ["missing.md", "other.md#nowhere"]
    commands = quoted_commands(page.read_text())
    assert commands == [("main.py", ["pretrain", "--epochs", "2", "--no_such_flag", "3"]),
                        ("convert", ["to-flax", "a.pth", "out"]), ("bench/memory.py", ["--bogus"]),
                        ("main.py", ["eval", "--nb_classes", "4"]), ("main.py", ["launch", "--", "pretrain"])]
    assert "--no_such_flag" in parse_problem(*commands[0])
    assert parse_problem(*commands[1]) is None
    assert "--bogus" in parse_problem(*commands[2])
    assert parse_problem(*commands[3]) is parse_problem(*commands[4]) is None
    assert "no such preset" in parse_problem("main.py", ["pretrain", "--config", "gone"])
    assert "--nope" in parse_problem("main.py", ["launch", "-n", "2", "--", "pretrain", "--nope"])
