"""The command lines README.md and docs/*.md show still work as written, checked without running any
work: every `ctfgen ...`, `python -m ctfgen...`, `torchrun ... ctfgen ...` and `make TARGET VAR=...`
line of a code block or an inline code span parses with the real parser, names only options that
exist (in full: argparse would accept an abbreviation until another option shares its prefix),
names configs/*.yaml files that exist and load, and `make` targets and variables the Makefile has;
what a `make` target runs (`make -n`) is checked the same way.

docs/results.md and docs/results/ record runs made at pinned commits, with the commands of their day;
they are not checked.

A line is a synopsis when it has `[optional]` parts, `...` or `a|b` alternatives: its parts are
checked (each alternative in turn, placeholders such as N or DIR as values) but not that it has every
required argument. So is an inline span, which often names a command and one of its options in prose
(`ctfgen eval --metric-set inception`)."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from torch.distributed.run import get_args_parser

from ctfgen import shipped
from ctfgen.app.cli import COMMANDS, build_parser
from ctfgen.config import ExperimentConfig, ReproduceConfig, load_config, load_stage_config
from ctfgen.experiments.run import load_experiment_config
from ctfgen.utils.errors import CtfgenError

ROOT = Path(__file__).resolve().parents[1]
UNCHECKED = {"docs/results.md"}  # runs at pinned commits: their commands are history
DOCS = sorted(str(p.relative_to(ROOT)) for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
              if str(p.relative_to(ROOT)) not in UNCHECKED)

FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|<[^>]+>")  # N, DIR, RUN, <sha>
CONFIG = re.compile(r"(?<![\w/.])configs/[\w./-]+\.ya?ml")
ELLIPSIS = ("...", "…")


@dataclass
class DocLine:
    where: str      # file:line
    text: str
    inline: bool    # an inline code span, not a code-block line

    def __str__(self):
        return f"{self.where}: `{self.text}`"


# --- finding the lines ---------------------------------------------------------------------------

def code_lines(text: str, name: str):
    """(line number, line) of every fenced and indented code block but python, json and yaml ones,
    `\\` continuations joined, and the text left over with the code blocks blanked out (line numbers kept)."""
    code, prose = [], []
    fence, kind, indented, blank = None, "", False, True
    for i, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                # a fence with text after it does not close the block: all that follows renders as code
                if m.group(2).strip():
                    raise AssertionError(f"{name}:{i}: a closing code fence must stand alone on its line")
                fence = None
            elif kind not in ("python", "json", "yaml"):
                code.append((i, line))
            prose.append("")
        elif m:
            fence, kind = m.group(1), m.group(2).strip().lower()
            prose.append("")
        elif line.startswith("    ") and line.strip() and (blank or indented):  # an indented code block
            indented = True
            code.append((i, line))
            prose.append("")
        else:
            indented &= not line.strip()
            prose.append(line)
        blank = not line.strip()
    if fence is not None:
        raise AssertionError(f"{name}: a code fence is never closed")
    joined, start, parts = [], None, []
    for i, line in code:
        start = i if not parts else start
        parts.append(line.strip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            joined.append((start, " ".join(parts)))
            parts = []
    return joined, "\n".join(prose)


def inline_spans(prose: str):
    """(line number, span) of every inline code span; a span may wrap across lines, never a paragraph."""
    offset = 0
    for paragraph in re.split(r"(\n[ \t]*\n)", prose):
        for m in re.finditer(r"(`+)(.+?)\1", paragraph, flags=re.S):
            yield offset + paragraph[:m.start()].count("\n") + 1, " ".join(m.group(2).split())
        offset += paragraph.count("\n")


def is_command(text: str) -> bool:
    words = text.replace("$(which ctfgen)", "ctfgen").split()
    while words and ENV.match(words[0]):
        words.pop(0)
    if not words:
        return False
    program = words[0].rsplit("/", 1)[-1]
    return (program in ("ctfgen", "make", "torchrun") and len(words) > 1
            or re.fullmatch(r"python[\d.]*", program) is not None and words[1:2] == ["-m"]
            and words[2:3] != [] and words[2].split(".")[0] == "ctfgen")


def doc_lines(name: str) -> list[DocLine]:
    code, prose = code_lines((ROOT / name).read_text(), name)
    found = [DocLine(f"{name}:{i}", t, False) for i, t in code if is_command(t)]
    found += [DocLine(f"{name}:{i}", t, True) for i, t in inline_spans(prose) if is_command(t)]
    return sorted(found, key=lambda d: int(d.where.rsplit(":", 1)[1]))


# --- checking one line ---------------------------------------------------------------------------

def words_of(text: str) -> list[str]:
    """The line's words as a shell splits them, without leading VAR=value assignments."""
    text = text.replace("\\|", "|").replace("$(which ctfgen)", "ctfgen")  # `\|`: a | inside a markdown table
    try:
        words = shlex.split(text, comments=True)
    except ValueError as e:
        raise AssertionError(f"the shell cannot split it: {e}") from None
    while words and ENV.match(words[0]):
        words.pop(0)
    return words


def synopsis_of(words: list[str]) -> tuple[list[str], bool]:
    """The words without [ ] and ..., and whether there were any."""
    out, synopsis = [], False
    for w in words:
        bare = w.lstrip("[").rstrip("]")
        synopsis |= bare != w
        for e in ELLIPSIS:
            if bare.endswith(e):
                bare, synopsis = bare[:-len(e)], True
        if bare:
            out.append(bare)
    return out, synopsis


def run_parser(parse, words):
    """argparse's error, either way it reports one (our ConfigError, or SystemExit and stderr)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse(words)
    except CtfgenError as e:
        raise AssertionError(str(e)) from None
    except SystemExit as e:
        raise AssertionError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else
                             f"exit status {e.code}") from None


def load_named_config(args, path: str, overrides: list[str]) -> None:
    """Read `path` as the command whose arguments are `args` reads its config."""
    load = {
        "pipeline": lambda: load_experiment_config(path, None, False, overrides, args.dry_run),
        "train-tokenizer": lambda: load_config(ExperimentConfig, path, overrides),
        "train": lambda: load_stage_config(path, args.stage, overrides),
        "reproduce": lambda: load_config(ReproduceConfig, path, overrides),
    }.get(args.command)
    if load is not None:
        try:
            load()
        except CtfgenError as e:
            raise AssertionError(f"{Path(path).relative_to(ROOT)} does not load: {e}") from None


def check_ctfgen(words: list[str], loose: bool) -> None:
    words, synopsis = synopsis_of(words)
    loose |= synopsis or any(w in ("-h", "--help") for w in words)
    words = [w for w in words if w not in ("-h", "--help", "--version")]
    if not words:
        return
    for variant in itertools.product(*[w.split("|") if "|" in w and not w.startswith("-") else [w] for w in words]):
        check_ctfgen_variant(list(variant), loose, synopsis)


def check_ctfgen_variant(words: list[str], loose: bool, synopsis: bool) -> None:
    name = next((w for w in words if not w.startswith("-")), None)
    if name not in COMMANDS:
        raise AssertionError(f"no command {name!r} (ctfgen has {', '.join(COMMANDS)})")
    parser = build_parser(only=name)
    sub = next(a for a in parser._subparsers._group_actions).choices[name]
    option = None
    for i, w in enumerate(words):
        if w.startswith("--"):
            flag = w.split("=", 1)[0]
            if flag not in sub._option_string_actions and flag not in parser._option_string_actions:
                raise AssertionError(f"ctfgen {name} has no option {flag}")
            option = sub._option_string_actions.get(flag)
        elif PLACEHOLDER.fullmatch(w) and option is not None:  # N after an int option: any valid value
            if option.choices:
                words[i] = str(next(iter(option.choices)))
            elif option.type in (int, float):
                words[i] = "1"
    if loose:
        for group in sub._mutually_exclusive_groups:
            group.required = False
        for action in sub._actions:
            if action.option_strings:
                action.required = False
            else:  # positionals that may be absent: argparse then matches the later ones too
                action.nargs = {None: "?", "+": "*"}.get(action.nargs, action.nargs)
    args = run_parser(parser.parse_args, words)
    for path in (w for w in words if CONFIG.fullmatch(w)):
        if not (ROOT / path).is_file():
            raise AssertionError(f"{path} does not exist")
        # a synopsis' overrides are placeholders (key.sub=value)
        load_named_config(args, str(ROOT / path), [] if synopsis else getattr(args, "overrides", None) or [])


def check_shipped(words: list[str]) -> None:
    words, _ = synopsis_of(words)

    def ship(*args, **kwargs):
        """Stands in for shipped.ship: the line is parsed, nothing is shipped."""
        calls.append(kwargs)
        return {}

    calls = []
    with mock.patch.object(shipped, "ship", ship):
        run_parser(shipped.main, words)
    dtype = calls[0]["weights_dtype"]
    if not PLACEHOLDER.fullmatch(dtype) and dtype not in shipped.WEIGHTS_DTYPES:
        raise AssertionError(f"--weights-dtype {dtype} is none of {', '.join(shipped.WEIGHTS_DTYPES)}")


def makefile() -> tuple[set[str], str]:
    text = (ROOT / "Makefile").read_text()
    targets = set()
    for line in text.splitlines():
        if (m := re.match(r"^([^\s:=#][^:=#]*?)\s*:(?![:=])", line)) and not line.startswith("\t"):
            targets.update(t for t in m.group(1).split() if not t.startswith(("$", ".")))
    return targets, text


def check_make(words: list[str]) -> None:
    words, synopsis = synopsis_of(words[1:])
    targets, text = makefile()
    for w in words:
        if w.startswith("-"):
            raise AssertionError(f"make option {w}: the docs show targets and VAR=value only")
        if "=" in w:
            var = w.split("=", 1)[0]
            if f"$({var})" not in text:
                raise AssertionError(f"the Makefile uses no variable {var}")
        elif w not in targets:
            raise AssertionError(f"the Makefile has no target {w!r} (it has {', '.join(sorted(targets))})")
    if shutil.which("make") is None:
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "MFLAGS"}
    out = subprocess.run(["make", "-n", "-s", "--no-print-directory", *words], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise AssertionError(f"make -n failed: {out.stderr.strip()}")
    for line in out.stdout.replace("\\\n", " ").splitlines():
        if is_command(line):
            try:
                check_words(words_of(line), loose=synopsis)
            except AssertionError as e:
                raise AssertionError(f"it runs `{line.strip()}`: {e}") from None


def check_torchrun(words: list[str]) -> None:
    args = run_parser(get_args_parser().parse_args, words[1:])
    if args.module:
        if args.training_script != "ctfgen.app.cli":
            raise AssertionError(f"torchrun -m {args.training_script}: the command line is ctfgen.app.cli")
    elif Path(args.training_script).name != "ctfgen":
        raise AssertionError(f"torchrun runs {args.training_script}, not ctfgen")
    check_ctfgen(list(args.training_script_args), loose=False)


def check_words(words: list[str], loose: bool) -> None:
    program = words[0].rsplit("/", 1)[-1]
    if program == "ctfgen":
        check_ctfgen(words[1:], loose)
    elif program == "make":
        check_make(words)
    elif program == "torchrun":
        check_torchrun(words)
    elif words[2] == "ctfgen.app.cli":
        check_ctfgen(words[3:], loose)
    elif words[2] == "ctfgen.shipped":
        check_shipped(words[3:])
    else:
        raise AssertionError(f"python -m {words[2]}: the entry points are ctfgen.app.cli and ctfgen.shipped")


def problem(line: DocLine) -> str | None:
    try:
        check_words(words_of(line.text), loose=line.inline)
    except AssertionError as e:
        return f"{line}\n    {e}"
    return None


# --- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DOCS)
def test_every_command_line_in_the_docs_works_as_written(name):
    lines = doc_lines(name)
    assert lines, f"{name} shows no command line: the extraction is broken, or the file should leave DOCS"
    problems = [p for p in map(problem, lines) if p]
    assert not problems, f"{len(problems)} of {len(lines)} command lines in {name} do not work:\n" + "\n".join(problems)


@pytest.mark.parametrize("text, expected", [
    ("ctfgen sample --klass 0 --out x.png", "ctfgen sample has no option --klass"),
    ("ctfgen sample --batch 8 --out x.png", "ctfgen sample has no option --batch"),  # argparse would take it
    ("ctfgen samples --n 4", "no command 'samples'"),
    ("ctfgen train --stage ar\\|aux\\|fine --codes C --out O", "invalid choice: 'fine'"),
    ("ctfgen sample-many --per-class 10", "required: --out"),
    ("ctfgen pipeline configs/nothing.yaml --out runs/x", "configs/nothing.yaml does not exist"),
    ("ctfgen pipeline configs/tiny.yaml --out runs/x stage1.nope=1", "does not load"),
    ("ctfgen reproduce configs/tiny.yaml --run R", "does not load"),
    ("make shipit", "no target 'shipit'"),
    ("make ship SHIP_DIR=runs/x", "no variable SHIP_DIR"),
    ("python -m ctfgen.shipped RUN --weights-dtype int4", "--weights-dtype int4 is none of"),
    ("torchrun --nproc-per-node=2 -m ctfgen.app.main train", "the command line is ctfgen.app.cli"),
])
def test_a_stale_line_is_caught(text, expected):
    assert expected in (problem(DocLine("doc.md:1", text, inline=False)) or "")


def test_the_lines_are_found_as_written():
    text = ("Run `ctfgen sample --n 4\n--out a.png` or\n\n```bash\nOMP_NUM_THREADS=2 ctfgen bench \\\n"
            "    --models GPT-B   # a comment\n```\n\n    torchrun --nproc_per_node=2 $(which ctfgen) train ...\n\n"
            "```python\nctfgen sample --n 4\n```\n")
    code, prose = code_lines(text, "doc.md")
    assert code == [(5, "OMP_NUM_THREADS=2 ctfgen bench --models GPT-B   # a comment"),
                    (9, "torchrun --nproc_per_node=2 $(which ctfgen) train ...")]  # not the python block
    assert list(inline_spans(prose)) == [(1, "ctfgen sample --n 4 --out a.png")]
    with pytest.raises(AssertionError, match="must stand alone"):
        code_lines("```bash\nctfgen bench\n``` and more text\n", "doc.md")
