"""`ctfgen compare RUN...`: one markdown table of several evaluated runs and a figure per metric vs epoch."""

from __future__ import annotations

from ctfgen.metrics.compare import compare


def configure(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="an evaluation JSON (from `ctfgen eval --out`) or a run directory holding RUN/eval/*.json")
    parser.add_argument("--out", default=None,
                        help="directory for compare.md and one <metric>.png per metric (against training epoch)")


def run(args):
    table, pngs = compare(args.runs, args.out)
    print(table, end="")
    if args.out:
        print(f"wrote {args.out}/compare.md" + (f" and {len(pngs)} figures" if pngs else
                                                 " (no figures: no record has an epoch)"))
    return 0
