"""Several evaluated runs -> one markdown table and one figure per metric against training epoch.

Inputs are evaluation records (see ctfgen.metrics.evaluate): single JSON files, or run directories
holding RUN/eval/*.json (one record per evaluated epoch). Lines in the figures are grouped by the
record's `name`, so every record of one run should carry the same name and its own `epoch`.
"""

from __future__ import annotations

import json
from pathlib import Path

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
            raise ValueError(f"{f} is not valid JSON: {err}") from err
        if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
            raise ValueError(f"{f} is not an evaluation record (needs a 'metrics' object; see `ctfgen eval --out`)")
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


def markdown_table(records: list[dict]) -> str:
    keys = _metric_keys(records)
    lines = ["| run | epoch | metric set | samples | " + " | ".join(_header(k) for k in keys) + " |",
             "|---|---:|---|---:|" + "---:|" * len(keys)]
    for r in sorted(records, key=_sort_key):
        cells = [f"{r['metrics'][k]:.4f}" if isinstance(r["metrics"].get(k), (int, float)) else "–" for k in keys]
        epoch = "–" if r["epoch"] is None else str(r["epoch"])
        lines.append(f"| {r['name']} | {epoch} | {r.get('metric_set', '–')} | {r.get('num_samples', '–')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_metrics(records: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per metric (the paper's Fig. 2 style: metric vs training epoch, a line per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    with_epoch = [r for r in records if r["epoch"] is not None]
    paths = []
    for key in _metric_keys(with_epoch):
        if key == "is_std":  # drawn as the IS error bars
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
        for name in sorted({r["name"] for r in with_epoch}):
            pts = sorted((r["epoch"], r["metrics"][key], r["metrics"].get("is_std")) for r in with_epoch
                         if r["name"] == name and isinstance(r["metrics"].get(key), (int, float)))
            if not pts:
                continue
            xs, ys, err = zip(*pts)
            if key == "is" and all(e is not None for e in err):
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
            else:
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("training epoch")
        ax.set_ylabel(_header(key))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / f"{key}.png")
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(paths[-1])
        plt.close(fig)
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
        (out_dir / "compare.md").write_text(table)
        pngs = plot_metrics(records, out_dir)
    return table, pngs
