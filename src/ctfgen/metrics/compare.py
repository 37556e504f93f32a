"""Several evaluated runs -> one markdown table and one figure per metric against training epoch.

Inputs are evaluation records (see ctfgen.metrics.evaluate): single JSON files, or run directories
holding RUN/eval/*.json (one record per evaluated epoch). Lines in the figures are grouped by the
record's `name`, so every record of one run should carry the same name and its own `epoch`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ctfgen.errors import CorruptFileError
from ctfgen.fileio import atomic_write_text
from ctfgen.metrics.evaluate import METRIC_INFO


def load_records(run: str | Path) -> list[dict]:
    run = Path(run)
    if run.is_file():
        files = [run]
    elif run.is_dir():
        folder = run / "eval" if (run / "eval").is_dir() else run
        files = sorted(folder.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{run} holds no evaluation records (expected {run}/eval/*.json, as "
                                    "written by `ctfgen eval --out`)")
    else:
        raise FileNotFoundError(f"{run} does not exist (expected an evaluation JSON or a run directory)")
    records = []
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise CorruptFileError(f"{f} is not valid JSON: {err}") from err
        if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
            raise CorruptFileError(f"{f} is not an evaluation record (needs a 'metrics' object; see `ctfgen eval --out`)")
        rec.setdefault("name", run.stem if run.is_file() else run.name)
        rec.setdefault("epoch", None)
        rec["_source"] = str(f)
        records.append(rec)
    return records


def _metric_keys(records: list[dict]) -> list[str]:
    present = {k for r in records for k in r["metrics"]}
    ordered = [k for k in METRIC_INFO if k in present]
    return ordered + sorted(present - set(ordered))


def _header(key: str) -> str:
    label, higher = METRIC_INFO.get(key, (key, None))
    return label + {True: " ↑", False: " ↓", None: ""}[higher]


def _sort_key(r: dict):
    return (str(r["name"]), r["epoch"] is None, r["epoch"] if r["epoch"] is not None else 0)


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
    metric_head = " | ".join(_header(k) for k in keys)
    if label is not None:
        lines = [f"| model | {metric_head} |", "|---|" + "---:|" * len(keys)]
        lines += [f"| {label(r)} | " + " | ".join(_cell(r["metrics"], k) for k in keys) + " |" for r in records]
        return "\n".join(lines) + "\n"
    lines = [f"| run | epoch | metric set | samples | {metric_head} |", "|---|---:|---|---:|" + "---:|" * len(keys)]
    for r in sorted(records, key=_sort_key):
        epoch = "–" if r["epoch"] is None else str(r["epoch"])
        lines.append(f"| {r['name']} | {epoch} | {r.get('metric_set', '–')} | {r.get('num_samples', '–')} | "
                     + " | ".join(_cell(r["metrics"], k) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _draw(ax, records: list[dict], key: str) -> None:
    """Metric `key` against epoch, one line per record name (the paper's Fig. 2 style)."""
    for name in sorted({r["name"] for r in records}):
        pts = sorted((r["epoch"], r["metrics"][key], r["metrics"].get("is_std")) for r in records
                     if r["name"] == name and isinstance(r["metrics"].get(key), (int, float)))
        if not pts:
            continue
        xs, ys, err = zip(*pts)
        if key == "is" and all(e is not None for e in err):
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("training epoch")
    ax.set_title(_header(key), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_metrics(records: list[dict], out: str | Path, keys: list[str] | None = None,
                 one_figure: bool = False) -> list[Path]:
    """Metrics against training epoch: one PNG per metric in the directory `out`, or with
    `one_figure` all `keys` side by side in the single PNG file `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    with_epoch = [r for r in records if r["epoch"] is not None]
    keys = [k for k in (keys or _metric_keys(with_epoch)) if k != "is_std"]  # is_std: the IS error bars
    figures = [(keys, out)] if one_figure else [([k], out / f"{k}.png") for k in keys]
    paths = []
    for panel_keys, path in figures:
        fig, axes = plt.subplots(1, len(panel_keys), figsize=(4.5 * len(panel_keys), 3.5), dpi=120, squeeze=False)
        for ax, key in zip(axes[0], panel_keys):
            _draw(ax, with_epoch, key)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


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
