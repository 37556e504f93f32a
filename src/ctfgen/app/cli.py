"""ctfgen: class-conditional image generation with coarse-to-fine token prediction.

Each subcommand NAME lives in a module `ctfgen.app.commands.<module>` as `configure_NAME(parser)`
and `run_NAME(args)` (dashes as underscores), which parses nothing more, calls the library once and
returns None (success) or an exit status; modules are imported only when one of their commands
runs, so `--help` stays fast. Every mistake a user can fix (a `CtfgenError`, a missing file, a bad
argument) ends as one `error: ...` line and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ctfgen import __version__
from ctfgen.app.commands import HelpFormatter
from ctfgen.utils.errors import ConfigError, CtfgenError
from ctfgen.utils.threads import prefer_short_spin

COMMANDS = {
    # name: (module, one-line help)
    "sample": ("sample", "sample a class-conditional image grid from a trained or shipped model"),
    "sample-many": ("sample", "generate N images per class into an ADM-style .npz (resumable, torchrun-aware)"),
    "train-tokenizer": ("train", "train a VQ tokenizer"),
    "extract-codes": ("train", "tokenize a dataset into memory-mapped code files"),
    "cluster": ("train", "fit a CoarseMap (k-means or random) on a tokenizer's codebook"),
    "train": ("train", "train stage 1 (ar), the auxiliary model (aux) or the baseline on extracted codes"),
    "pipeline": ("train", "run a whole experiment from a YAML config: tokenizer to trained models"),
    "eval": ("evaluate", "FID / IS / precision / recall of a sample set against a reference"),
    "compare": ("evaluate", "render several evaluated runs into one markdown table and figure"),
    "redundancy": ("evaluate", "measure how interchangeable codewords within a cluster are (paper Fig. 1b)"),
    "reproduce": ("evaluate", "ablations, evaluation and the results report on top of a finished pipeline run"),
    "study": ("evaluate", "evaluate the codebook-size study's runs: records, tables and figures"),
    "bench": ("evaluate", "time the baseline and CTF sampling side by side"),
    "demo": ("sample", "serve the interactive web demo on this machine (needs `pip install ctfgen[demo]`)"),
    "train-classifier": ("train", "train the Fashion-MNIST feature classifier used by the offline metrics"),
}


def command(name: str, part: str):
    """`configure_NAME` or `run_NAME` of the command `name`, from its module."""
    module = importlib.import_module(f"ctfgen.app.commands.{COMMANDS[name][0]}")
    return getattr(module, f"{part}_{name.replace('-', '_')}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage + message, as our one error line
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="ctfgen", description=__doc__.splitlines()[0],
        epilog="Run `ctfgen COMMAND --help` for a command's options; docs/ explains the method and the results.")
    parser.add_argument("--version", action="version", version=f"ctfgen {__version__}", help="print ctfgen's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if only is None or name == only:
            command(name, "configure")(p)
    return parser


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test may swap it between commands)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def log_progress() -> None:
    """The library's progress lines (loggers under "ctfgen") on stderr, from rank 0 only (torchrun sets RANK)."""
    logger = logging.getLogger("ctfgen")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    # Before anything loads torch (and OpenMP with it): waiting threads spin briefly, then sleep,
    # so a busy core does not stall sampling (ctfgen.utils.threads, docs/performance.md).
    prefer_short_spin()
    log_progress()
    argv = sys.argv[1:] if argv is None else argv
    name = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(only=name if name in COMMANDS else "")
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(command(args.command, "run")(args) or 0)
    except (CtfgenError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # TrainingInterrupted says where its checkpoint is
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
    finally:
        distributed = sys.modules.get("ctfgen.utils.distributed")  # loaded only if a command used torch
        if distributed is not None:
            distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
