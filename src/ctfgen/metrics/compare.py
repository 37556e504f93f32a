"""Tables and figures: the one place results are rendered (`ctfgen eval`, `compare`, `reproduce`,
`study`, `redundancy`).

`markdown` and `text_table` render rows; `plot_panels` draws line panels into one PNG. On top of
them, evaluation records (see ctfgen.metrics.evaluate), single JSON files or run directories holding
RUN/eval/*.json, become one markdown table (`markdown_table`) and figures of each metric against
training epoch (`plot_metrics`); lines are grouped by the record's `name`, so every record of one run
should carry the same name and its own `epoch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

from ctfgen.utils.errors import CorruptFileError, MissingFileError
from ctfgen.utils.fileio import atomic_save, atomic_write_text, read_json

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

# Display names and whether higher is better.
METRIC_INFO = {
    "fid": ("FID", False),
    "sfid": ("sFID", False),
    "fd": ("FD (classifier)", False),
    "kid": ("KID (classifier)", False),
    "is": ("IS", True),
    "is_std": ("IS std", None),
    "precision": ("Precision", True),
    "recall": ("Recall", True),
    "class_consistency": ("Class consistency", True),
    "bits_per_token": ("bits/token", False),
    "sample_seconds_per_image": ("s/img", False),
}


# --- rendering ------------------------------------------------------------------------------------

def markdown(header: list[str], rows: list[list], align: str = "") -> str:
    """A markdown table; `align` holds one "l" or "r" per column (default: all left)."""
    rule = ["---:" if a == "r" else "---" for a in (align or "l" * len(header))]
    lines = [header, rule] + [[str(c) for c in row] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def text_table(header: list[str], rows: list[list]) -> str:
    """Plain aligned columns for a terminal: the first left, the others right."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def plot_panels(panels: list[dict], path: str | Path, width: float = 4.5, height: float = 3.5) -> Path:
    """Panels side by side in one PNG. Each panel: {"title", "xlabel", "lines": [(label, xs, ys[, yerr])],
    optional "points": [(label, xs, ys[, yerr])] (unjoined markers: results that are not a series),
    optional "log2_x": True}."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), dpi=120, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for joined, series in ((True, panel["lines"]), (False, panel.get("points", []))):
            style = {"marker": "o"} if joined else {"marker": "*", "markersize": 11, "linestyle": "none"}
            for label, xs, ys, *err in series:
                if err and err[0] is not None:
                    ax.errorbar(xs, ys, yerr=err[0], capsize=3, label=label, **style)
                else:
                    ax.plot(xs, ys, label=label, **style)
        if panel.get("log2_x"):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(panel["xlabel"])
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save(fig.savefig, path)
    plt.close(fig)
    return Path(path)


def record_summary(record: dict) -> str:
    """One evaluation record for the terminal: what was compared, then one metric per line."""
    head = (f"{record['name']} ({record['metric_set']}): {record['num_samples']} samples vs "
            f"{record['num_reference']} reference ({record['reference']})")
    rows = [[METRIC_INFO.get(k, (k,))[0], f"{v:.4f}"] for k, v in record["metrics"].items()]
    return head + "\n" + "\n".join("  " + line for line in text_table(["metric", "value"], rows).splitlines()[1:])


# --- evaluation records -----------------------------------------------------------------------------


def load_records(run: str | Path) -> list[dict]:
    run = Path(run)
    if run.is_file():
        files = [run]
    elif run.is_dir():
        folder = run / "eval" if (run / "eval").is_dir() else run
        files = sorted(folder.glob("*.json"))
        if not files:
            raise MissingFileError(f"{run} holds no evaluation records (expected {run}/eval/*.json, as "
                                    "written by `ctfgen eval --out`)")
    else:
        raise MissingFileError(f"{run} does not exist (expected an evaluation JSON or a run directory)")
    records = []
    for f in files:
        rec = read_json(f, "give the evaluation records `ctfgen eval --out` writes")
        if not isinstance(rec.get("metrics"), dict):
            raise CorruptFileError(f"{f} is not an evaluation record (needs a 'metrics' object; see `ctfgen eval --out`)")
        # a name given as null (or a number) would make sorting the runs a TypeError
        rec["name"] = str(run.stem if run.is_file() else run.name) if rec.get("name") is None else str(rec["name"])
        rec.setdefault("epoch", None)
        rec["_source"] = str(f)
        records.append(rec)
    return records


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metric_keys(records: list[dict]) -> list[str]:
    # flags such as reproduce's bits_per_token_exact (a bool) are not metrics: they became a column of
    # dashes and a figure of True/False against epoch
    present = {k for r in records for k, v in r["metrics"].items() if _is_number(v)}
    ordered = [k for k in METRIC_INFO if k in present]
    return ordered + sorted(present - set(ordered))


def _header(key: str) -> str:
    label, higher = METRIC_INFO.get(key, (key, None))
    return label + {True: " ↑", False: " ↓", None: ""}[higher]


def _order(v) -> tuple:
    # a total order over what a JSON field may hold: numbers, then anything else by its text, then None;
    # comparing an int epoch with a string one (or a number with None) raised TypeError
    if v is None:
        return (2, 0, "")
    if isinstance(v, (int, float)):
        return (0, v, "")
    return (1, 0, str(v))


def _sort_key(r: dict):
    return (str(r["name"]), _order(r["epoch"]))


def _cell(metrics: dict, key: str) -> str:
    v = metrics.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "–"
    bound = key == "bits_per_token" and metrics.get("bits_per_token_exact") is False
    return f"{v:.4f}" + (" (bound)" if bound else "")  # a bound, not the exact likelihood


def markdown_table(records: list[dict], label: Callable[[dict], str] | None = None,
                   keys: list[str] | None = None) -> str:
    """One row per record. By default the rows are sorted and say run, epoch, metric set and
    samples; with `label` they keep their order under one `model` column made by label(record).
    `keys` chooses the metric columns (default: every metric present)."""
    keys = keys or _metric_keys(records)
    metrics = [_header(k) for k in keys]
    cells = lambda r: [_cell(r["metrics"], k) for k in keys]  # noqa: E731
    if label is not None:
        return markdown(["model", *metrics], [[label(r), *cells(r)] for r in records], "l" + "r" * len(keys))
    rows = [[r["name"], "–" if r["epoch"] is None else r["epoch"], r.get("metric_set", "–"), r.get("num_samples", "–"),
             *cells(r)] for r in sorted(records, key=_sort_key)]
    return markdown(["run", "epoch", "metric set", "samples", *metrics], rows, "lrlr" + "r" * len(keys))


def _epoch_lines(records: list[dict], key: str) -> list[tuple]:
    """Metric `key` against epoch, one line per record name (the paper's Fig. 2 style)."""
    lines = []
    for name in sorted({r["name"] for r in records}):
        pts = sorted(((r["epoch"], r["metrics"][key], r["metrics"].get("is_std")) for r in records
                      if r["name"] == name and _is_number(r["metrics"].get(key))),
                     key=lambda p: tuple(map(_order, p)))
        if pts:
            xs, ys, err = zip(*pts)
            lines.append((name, xs, ys, err if key == "is" and all(e is not None for e in err) else None))
    return lines


def plot_metrics(records: list[dict], out: str | Path, keys: list[str] | None = None,
                 one_figure: bool = False) -> list[Path]:
    """Metrics against training epoch: one PNG per metric in the directory `out`, or with
    `one_figure` all `keys` side by side in the single PNG file `out`."""
    out = Path(out)
    with_epoch = [r for r in records if r["epoch"] is not None]
    keys = [k for k in (keys or _metric_keys(with_epoch)) if k != "is_std"]  # is_std: the IS error bars
    panel = lambda k: {"title": _header(k), "xlabel": "training epoch", "lines": _epoch_lines(with_epoch, k)}  # noqa: E731
    if one_figure:
        return [plot_panels([panel(k) for k in keys], out)]
    return [plot_panels([panel(k)], out / f"{k}.png") for k in keys]


def compare(runs: list[str | Path], out_dir: str | Path | None = None) -> tuple[str, list[Path]]:
    """Table (markdown string) of every record of every run; with `out_dir`, also writes
    out_dir/compare.md and out_dir/<metric>.png. Returns (table, png paths)."""
    records = [rec for run in runs for rec in load_records(run)]
    table = markdown_table(records)
    pngs: list[Path] = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "compare.md", table)
        pngs = plot_metrics(records, out_dir)
    return table, pngs
