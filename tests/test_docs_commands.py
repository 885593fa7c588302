"""Every command the docs tell a user to run parses as written.

The ``eval.py`` / ``train.py`` / ``clipib explain|bench|roar`` commands in README.md, docs/*.md (fenced blocks
and inline code), the Makefile and the configs' comments: each ``-c`` file exists, and the command line parses
(LightningCLI ``--print_config`` for eval.py / train.py; clipib's argparse, plus ``train.py`` for the overrides
``clipib roar`` passes on). Placeholders are filled as the text says: ``<name>`` in a path is the first shipped
file that matches, ``...`` / ``…`` elide arguments, ``[...]`` marks optional ones (kept), ``$VAR`` takes a
value from VARS. ``configs/eval/laion.yaml``, which docs/scale.md tells the user to write, is written from that
page's YAML block. Diagrams (blocks with arrows) hold no commands. Nothing is run.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ELLIPSIS = ("...", "…")
VARS = {"p": "noisy", "SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "8", "MASTER": "node0"}
SCRIPT = re.compile(r"(?:^|[\s/])(eval\.py|train\.py|clipib)\s")


class MissingFile(Exception):
    """A documented command names a config file that is not in the repository."""


def _logical_lines(text: str) -> Iterator[str]:
    """Lines with trailing-backslash continuations joined."""
    buf = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield buf + line
        buf = ""
    if buf:
        yield buf


def _snippets() -> Iterator[Tuple[str, str]]:
    """(where, text) of every place a command may be written."""
    for doc in DOCS:
        text = doc.read_text()
        name = doc.relative_to(ROOT)
        for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S):
            if m.group(1) in ("python", "yaml", "json") or "▼" in m.group(2) or "─►" in m.group(2):
                continue
            line = text[:m.start()].count("\n") + 1
            for cmd in _logical_lines(m.group(2)):
                yield f"{name}:{line}", cmd
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for m in re.finditer(r"`([^`\n]+)`", prose):
            if " -c " in m.group(1):  # an inline command with a config; inline option fragments are not commands
                yield f"{name} (inline)", m.group(1)
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t$(PY) "):
            yield "Makefile", line.replace("$(PY)", "python")
    for config in sorted((ROOT / "configs").glob("*/*.yaml")):
        for line in config.read_text().splitlines():
            if line.lstrip().startswith("#"):
                for m in re.finditer(r"(?:python (?:eval|train)\.py|clipib roar) [^`]*", line):
                    yield str(config.relative_to(ROOT)), re.split(r"\s+(?:->|\()", m.group(0))[0]  # `cmd -> file`


def _tokens(cmd: str) -> List[str]:
    lexer = shlex.shlex(cmd, posix=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    out, optional = [], False
    for tok in lexer:
        if tok.startswith("[-"):
            tok, optional = tok[1:], True
        if optional and tok.endswith("]"):
            tok, optional = tok[:-1], False
        out.append(tok)
    return out


def _command(cmd: str) -> Optional[Tuple[str, List[str]]]:
    """(program, arguments) of a command line, or None when it runs none of ours."""
    m = SCRIPT.search(cmd)
    if m is None:
        return None
    tokens = _tokens(cmd[m.start(1):])
    program = tokens[0]
    if program == "clipib" and (len(tokens) < 2 or tokens[1] not in ("explain", "bench", "roar")):
        return None
    if program != "clipib" and (len(tokens) < 2 or tokens[1] not in ("fit", "validate", "test", "predict")):
        return None
    return program, tokens[1:]


def _fill(args: List[str], laion: Path) -> Tuple[List[str], bool]:
    """Placeholders filled; returns (args, elided)."""
    out, elided = [], False
    for i, arg in enumerate(args):
        if arg in ELLIPSIS:
            elided = True
            if out and out[-1] in ("-c", "--config"):  # `-c …`: an elided config
                out.pop()
            continue
        for var in re.findall(r"\$(\w+)", arg):
            assert var in VARS, f"unknown shell variable ${var} in a documented command: add it to VARS"
            arg = arg.replace(f"${var}", VARS[var])
        if i and args[i - 1] in ("-c", "--config", "--maps-config"):
            arg = _config_path(arg, laion)
        out.append(arg)
    return out, elided


def _config_path(arg: str, laion: Path) -> str:
    if arg == "configs/eval/laion.yaml":
        return str(laion)
    if "<" in arg:
        matches = sorted(ROOT.glob(re.sub(r"<[^>]+>", "*", arg)))
        if not matches:
            raise MissingFile(f"no shipped file matches {arg}")
        return "|".join(str(m) for m in matches)  # any one of them (_alternatives)
    if not (ROOT / arg).is_file():
        raise MissingFile(f"{arg} does not exist")
    return str(ROOT / arg)


def _commands(laion: Path) -> Tuple[Dict[Tuple[str, ...], str], List[str]]:
    """``{(program, elided, *args): where it is written}`` (deduplicated), and the commands naming a missing file."""
    found: Dict[Tuple[str, ...], str] = {}
    missing: List[str] = []
    for where, text in _snippets():
        parsed = _command(text)
        if parsed is None:
            continue
        program, args = parsed
        try:
            filled, elided = _fill(args, laion)
        except MissingFile as err:
            missing.append(f"{where}: {text.strip()}\n    {err}")
            continue
        found.setdefault((program, str(elided), *filled), where)
    return found, missing


def _covered_by_test_configs(args: List[str]) -> bool:
    """``test`` with configs only: trainer blocks, then eval / paper configs (what tests/test_configs.py parses)."""
    if args[0] != "test" or len(args) % 2 == 0 or any(flag != "-c" for flag in args[1::2]):
        return False
    kinds = [Path(c).parent.name for path in args[2::2] for c in path.split("|")]
    return all(kind in ("trainer", "eval", "paper") for kind in kinds)


def _alternatives(args: List[str]) -> Iterator[List[str]]:
    """The argument lists a ``<placeholder>`` config path stands for, one file each."""
    at = next((i for i, a in enumerate(args) if i and "|" in a and args[i - 1] in ("-c", "--config", "--maps-config")),
              None)
    if at is None:
        yield args
        return
    for choice in args[at].split("|"):
        yield from _alternatives([*args[:at], choice, *args[at + 1:]])


def _exit_code(fn: Callable[[], object]) -> Tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            fn()
        except SystemExit as exit_info:
            code = exit_info.code
            return (1 if isinstance(code, str) else int(code or 0)), err.getvalue()
    return 0, err.getvalue()


def _lightning(program: str, args: List[str]) -> Tuple[int, str]:
    from clipib.lit.cli import eval_cli, train_cli

    cli = eval_cli if program == "eval.py" else train_cli
    return _exit_code(lambda: cli(args=[*args, "--print_config"]))


def _clipib(args: List[str], elided: bool) -> Tuple[int, str]:
    """Full parse; with elided arguments, only that every option named is one the subcommand offers."""
    from clipib.cli import _parser

    parser = _parser(bench_options=args[0] == "bench")
    if elided:
        sub = parser._subparsers._group_actions[0].choices[args[0]]  # noqa: SLF001 (argparse offers no public view)
        known = {s for action in sub._actions for s in action.option_strings}  # noqa: SLF001
        unknown = [a for a in args[1:] if a.startswith("--") and a != "--" and a not in known]
        return (2 if unknown else 0), f"unknown options {unknown}"
    code, err = _exit_code(lambda: parser.parse_args(args))
    if code or args[0] != "roar":
        return code, err
    ns = parser.parse_args(args)  # the overrides after `--` go to every train.py fit of the sweep
    return _lightning("train.py", ["fit", *(a for c in ns.config for a in ("-c", c)), *ns.overrides])


@pytest.fixture(scope="module")
def laion(tmp_path_factory) -> Path:
    """configs/eval/laion.yaml as docs/scale.md tells the user to write it."""
    text = (ROOT / "docs" / "scale.md").read_text()
    section = text.split("`configs/eval/laion.yaml`", 1)[1]
    path = tmp_path_factory.mktemp("docs") / "laion.yaml"
    path.write_text(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    return path


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_documented_commands_parse(laion, monkeypatch):
    monkeypatch.chdir(ROOT)
    commands, failures = _commands(laion)
    programs = {key[0] for key in commands}
    assert {"eval.py", "train.py", "clipib"} <= programs and len(commands) > 20, commands  # the scan finds them
    for (program, elided, *args), where in commands.items():
        if program != "clipib" and elided == "True" and "-c" not in args:
            continue  # a sketch such as `python eval.py test -c … --trainer.deterministic true`: nothing to parse
        if program == "eval.py" and _covered_by_test_configs(args):
            continue  # its files exist (_fill); tests/test_configs.py parses each config after each trainer block
        for choice in _alternatives(args):  # `-c configs/paper/<config>.yaml`: parses for one of the files
            code, err = _clipib(choice, elided == "True") if program == "clipib" else _lightning(program, choice)
            if not code:
                break
        if code:
            failures.append(f"{where}: {program} {' '.join(args)}\n    {err.strip().splitlines()[-3:]}")
    assert not failures, "\n".join(failures)


def test_the_scan_catches_a_stale_option_and_a_missing_config(laion):
    """The checks above can fail: a misspelt option does not parse, a missing config is named."""
    assert _lightning("eval.py", ["test", "-c", str(ROOT / "configs" / "eval" / "shapes.yaml"),
                                  "--data.init_args.batchsize", "16"])[0] != 0
    assert _clipib(["roar", "-c", "configs/roar/shapes.yaml", "--out", "x", "--map", "y"], elided=True)[0] != 0
    with pytest.raises(MissingFile, match="does not exist"):
        _fill(["test", "-c", "configs/eval/no_such.yaml"], laion)
