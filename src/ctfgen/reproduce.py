"""The reproduction's second half: ablations, evaluation and the report, on top of a finished
`ctfgen pipeline` run (see configs/fashion_mnist.yaml and docs/results.md).

    ctfgen pipeline configs/fashion_mnist.yaml --out runs/fashion_mnist
    ctfgen reproduce configs/fashion_mnist_ablations.yaml --run runs/fashion_mnist

Everything lands under RUN: ablation models in `ablations/<name>/`, one evaluation record per
model and sampling setting in `eval/<group>/<name>.json` (the `ctfgen compare` format), and
`results.md`, `results.json` and `quality_vs_epoch.png`. Each finished piece is kept, so a killed
run continues where it stopped.

Ablations train for `steps` steps with the main run's settings and seed. The main run's lr is
constant after warm-up and it saved snapshots, so its snapshot at the same step is an exact
reference for them (same data order, same initialisation).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

DEFAULTS = {
    "steps": 470,                       # ablation training steps; the main run must have a snapshot there
    "clusters": [64, 1024],             # besides the main run's
    "random_clusters": True,            # k-means vs balanced random groups, at the main run's K
    "unrestricted_aux": True,           # aux model over the whole codebook vs restricted to the cluster
    "evaluation": {
        "per_class": 100,               # samples per class for every evaluation
        "batch_size": 500,
        "seed": 0,
        "heldout_images": 2000,         # test images for the exact bits per token
        "temperatures": [0.9, 1.0, 1.1],
    },
}


def load_settings(path: str | Path | None) -> dict:
    settings = json.loads(json.dumps(DEFAULTS))
    if path is not None:
        given = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(given) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown reproduce settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        for key, value in given.items():
            if isinstance(value, dict):
                bad = set(value) - set(DEFAULTS[key])
                if bad:
                    raise ValueError(f"unknown {key} settings {sorted(bad)}; known: {sorted(DEFAULTS[key])}")
                settings[key].update(value)
            else:
                settings[key] = value
    return settings


def _say(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


@dataclass
class MainRun:
    """Paths and settings of the finished `ctfgen pipeline` run."""

    dir: Path

    def __post_init__(self):
        self.dir = Path(self.dir)
        self.require("config.yaml", "runs/tokenizer/tokenizer/config.json", "codes/train/header.json",
                     "codes/test/header.json")
        self.config = yaml.safe_load((self.dir / "config.yaml").read_text())

    def require(self, *paths: str) -> None:
        for needed in paths:
            if not (self.dir / needed).exists():
                raise FileNotFoundError(
                    f"{self.dir / needed} is missing: run (or --resume) the main experiment first "
                    f"(ctfgen pipeline configs/fashion_mnist.yaml --out {self.dir})")

    @property
    def tokenizer(self):
        from ctfgen.tokenizer.vq import VQModel

        return VQModel.from_pretrained(str(self.dir / "runs" / "tokenizer" / "tokenizer")).eval()

    def snapshot_steps(self, stage: str) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in (self.dir / "runs" / stage / "snapshots").glob("step-*"))

    def snapshot(self, stage: str, step: int):
        from ctfgen.models.transformer import GPT, AuxModel

        path = self.dir / "runs" / stage / "snapshots" / f"step-{step:06d}"
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is missing; the main run's train.snapshot_every must divide {step}")
        return (AuxModel if stage == "aux" else GPT).from_pretrained(str(path)).eval()

    @property
    def steps_per_epoch(self) -> float:
        header = json.loads((self.dir / "codes" / "train" / "header.json").read_text())
        return header["num_images"] / int(self.config["stage1"]["train"]["batch_size"])


# --- ablation training ----------------------------------------------------------------------------

def train_ablation(run: MainRun, name: str, settings: dict, num_coarse: int, method: str = "kmeans",
                   restrict: bool = True, reuse_stage1_map: bool = False) -> Path:
    """Train stage 1 and/or the aux model of one variant; returns its CTF pipeline directory."""
    from ctfgen.clustering import CoarseMap
    from ctfgen.pipeline import CTFPipeline
    from ctfgen.train.stages import train_stage

    out = run.dir / "ablations" / name
    final = out / "ctf"
    if (final / "pipeline.json").exists():
        return final
    out.mkdir(parents=True, exist_ok=True)
    cfg = run.config
    vq = run.tokenizer
    codes = run.dir / "codes" / "train"
    if reuse_stage1_map:
        cmap = CoarseMap.load(run.dir / "ctf" / "coarse_map.safetensors")
    else:
        map_path = out / "coarse_map.safetensors"
        if not map_path.exists():
            seed = cfg["clustering"].get("seed")
            cmap = CoarseMap.fit(vq, num_coarse, method=method, seed=int(cfg["seed"] if seed is None else seed))
            cmap.save(map_path)
        cmap = CoarseMap.load(map_path)

    def train(stage: str, section: str, model_overrides: dict | None = None):
        s = cfg[section]
        train_cfg = {**s["train"], "steps": int(settings["steps"]), "snapshot_every": 0}
        _say(f"{name}: training {stage} ({s['preset']}, {train_cfg['steps']} steps)")
        model, _ = train_stage(stage, codes, out / stage, coarse_map=cmap, preset=s["preset"],
                               model={**s["model"], **(model_overrides or {})}, train_config=train_cfg,
                               resume=True, run_config={"ablation": name, "main_run": str(run.dir)}, desc=f"{name}/{stage}")
        return model.eval()

    ar = run.snapshot("ar", int(settings["steps"])) if reuse_stage1_map else train("ar", "stage1")
    aux = train("aux", "aux", {"restrict_to_cluster": restrict})
    tmp = out / "ctf.tmp"
    CTFPipeline(ar, aux, cmap, vq).save_pretrained(tmp)
    tmp.rename(final)
    return final


def main_snapshot_pipeline(run: MainRun, step: int, method: str):
    from ctfgen.clustering import CoarseMap
    from ctfgen.pipeline import ARPipeline, CTFPipeline

    vq = run.tokenizer
    if method == "baseline":
        return ARPipeline(run.snapshot("baseline", step), vq)
    cmap = CoarseMap.load(run.dir / "ctf" / "coarse_map.safetensors")
    return CTFPipeline(run.snapshot("ar", step), run.snapshot("aux", step), cmap, vq)


# --- evaluation -------------------------------------------------------------------------------------

def evaluate_pipeline(pipeline, settings: dict, sampling: dict | None = None, heldout: bool = True,
                      run: MainRun | None = None) -> dict:
    """Offline Fashion-MNIST metrics of `per_class` samples per class, exact held-out bits per
    token, and the sampling time."""
    from ctfgen.data.codes import CodeDataset
    from ctfgen.metrics.evaluate import evaluate_fmnist, sample_per_class
    from ctfgen.pipeline import heldout_bits_per_token

    e = settings["evaluation"]
    images, labels, seconds_per_image = sample_per_class(pipeline, int(e["per_class"]), int(e["seed"]),
                                                         int(e["batch_size"]), sampling)
    metrics = evaluate_fmnist(images, labels)
    metrics["sample_seconds_per_image"] = seconds_per_image
    if heldout and run is not None:
        held = heldout_bits_per_token(pipeline, CodeDataset(run.dir / "codes" / "test", augmentation=0),
                                      int(e["heldout_images"]))
        metrics["bits_per_token"], metrics["bits_per_token_exact"] = held["bits_per_token"], held["exact"]
    return metrics


def _record_path(run: MainRun, group: str, name: str) -> Path:
    return run.dir / "eval" / group / f"{name}.json"


def evaluate_once(run: MainRun, group: str, name: str, make_pipeline, settings: dict, sampling: dict | None = None,
                  epoch: float | None = None, extra: dict | None = None, heldout: bool = True) -> dict:
    from ctfgen.metrics.evaluate import write_record

    path = _record_path(run, group, name)
    if path.exists():
        return json.loads(path.read_text())
    _say(f"evaluating {group}/{name}")
    pipeline = make_pipeline()
    metrics = evaluate_pipeline(pipeline, settings, sampling, heldout=heldout, run=run)
    record = {"name": group if epoch is not None else name, "epoch": epoch, "metric_set": "fmnist",
              "samples": f"{int(settings['evaluation']['per_class'])} per class, seed {settings['evaluation']['seed']}",
              "reference": "fashion-mnist-test", "metrics": metrics, "sampling": sampling or {},
              "variant": name, **(extra or {})}
    write_record(record, path)
    return record


def train_independent_ablations(run: MainRun, settings: dict) -> None:
    """The variants that need only the tokenizer and codes, not the main run's models, so they can
    train beside the main run (`ctfgen reproduce --independent-only`)."""
    k_main = int(run.config["clustering"]["num_coarse"])
    for k in settings["clusters"]:
        train_ablation(run, f"kmeans-k{k}", settings, int(k))
    if settings["random_clusters"]:
        train_ablation(run, f"random-k{k_main}", settings, k_main, method="random")


def run_evaluations(run: MainRun, settings: dict) -> dict[str, list[dict]]:
    from ctfgen.pipeline import load_pipeline

    run.require("ctf/pipeline.json", "baseline/pipeline.json")
    steps = int(settings["steps"])
    per_epoch = run.steps_per_epoch
    k_main = int(run.config["clustering"]["num_coarse"])
    results: dict[str, list[dict]] = {}

    # Quality against training epoch (the paper's Fig. 2): the main run's snapshots.
    for method in ("ctf", "baseline"):
        stage = "ar" if method == "ctf" else "baseline"
        for step in run.snapshot_steps(stage):
            results.setdefault(f"epochs_{method}", []).append(evaluate_once(
                run, method, f"step-{step:06d}", lambda: main_snapshot_pipeline(run, step, method), settings,
                epoch=round(step / per_epoch, 3), extra={"step": step}))

    # The final models with their default sampling (the headline comparison).
    results["main"] = [
        evaluate_once(run, "main", "ctf", lambda: load_pipeline(run.dir / "ctf"), settings),
        evaluate_once(run, "main", "baseline", lambda: load_pipeline(run.dir / "baseline"), settings),
    ]

    # Ablations at `steps`, against the main run's snapshot at the same step.
    ref = lambda: main_snapshot_pipeline(run, steps, "ctf")  # noqa: E731
    group = [evaluate_once(run, "ablations", f"kmeans-k{k_main}", ref, settings, extra={"num_coarse": k_main})]
    for k in settings["clusters"]:
        path = train_ablation(run, f"kmeans-k{k}", settings, int(k))
        group.append(evaluate_once(run, "ablations", f"kmeans-k{k}", lambda: load_pipeline(path), settings,
                                   extra={"num_coarse": int(k)}))
    if settings["random_clusters"]:
        path = train_ablation(run, f"random-k{k_main}", settings, k_main, method="random")
        group.append(evaluate_once(run, "ablations", f"random-k{k_main}", lambda: load_pipeline(path), settings,
                                   extra={"num_coarse": k_main}))
    if settings["unrestricted_aux"]:
        path = train_ablation(run, f"unrestricted-k{k_main}", settings, k_main, restrict=False, reuse_stage1_map=True)
        group.append(evaluate_once(run, "ablations", f"unrestricted-k{k_main}", lambda: load_pipeline(path), settings,
                                   extra={"num_coarse": k_main}))
    group.append(evaluate_once(run, "ablations", f"baseline-step{steps}",
                               lambda: main_snapshot_pipeline(run, steps, "baseline"), settings))
    results["ablations"] = group

    # Sampling ablations on the final CTF model: stage-2 argmax, and the two temperatures.
    final = lambda: load_pipeline(run.dir / "ctf")  # noqa: E731
    sampling = [evaluate_once(run, "sampling", "argmax-fine", final, settings, {"top_k_fine": 1}, heldout=False)]
    for t in settings["evaluation"]["temperatures"]:
        sampling.append(evaluate_once(run, "sampling", f"temperature-{t}", final, settings,
                                      {"temperature": float(t)}, heldout=False))
        sampling.append(evaluate_once(run, "sampling", f"temperature-fine-{t}", final, settings,
                                      {"temperature_fine": float(t)}, heldout=False))
    results["sampling"] = sampling
    return results


# --- report -----------------------------------------------------------------------------------------

COLUMNS = [("fd", "FD ↓", "{:.2f}"), ("is", "IS ↑", "{:.2f}"), ("precision", "Prec ↑", "{:.3f}"),
           ("recall", "Rec ↑", "{:.3f}"), ("class_consistency", "Class acc ↑", "{:.3f}"),
           ("bits_per_token", "bits/token ↓", "{:.3f}"), ("sample_seconds_per_image", "ms/img", "{:.1f}")]


def table(records: list[dict], label) -> str:
    head = "| " + " | ".join(["model"] + [c[1] for c in COLUMNS]) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in records:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r["metrics"].get(key)
            if v is None:
                cells.append("–")
            elif key == "sample_seconds_per_image":
                cells.append(fmt.format(v * 1000))
            else:
                cells.append(fmt.format(v) + ("" if key != "bits_per_token" or r["metrics"].get("bits_per_token_exact", True) else " (bound)"))
        lines.append("| " + " | ".join([label(r)] + cells) + " |")
    return "\n".join(lines)


def plot_epochs(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("fd", "Fréchet distance (classifier space) ↓"), ("class_consistency", "class consistency ↑"),
            ("bits_per_token", "held-out bits/token ↓")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, (key, title) in zip(axes, keys):
        for method, style in (("ctf", "o-"), ("baseline", "s--")):
            recs = results.get(f"epochs_{method}", [])
            ax.plot([r["epoch"] for r in recs], [r["metrics"].get(key) for r in recs], style,
                    label="CTF" if method == "ctf" else "baseline")
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run: MainRun, results: dict, settings: dict) -> Path:
    steps = int(settings["steps"])
    heldout = json.loads((run.dir / "heldout.json").read_text()) if (run.dir / "heldout.json").exists() else None
    parts = [f"# Reproduction results ({run.dir})", "",
             f"Samples: {settings['evaluation']['per_class']} per class, seed {settings['evaluation']['seed']}; "
             f"bits/token on the first {settings['evaluation']['heldout_images']} test images (exact unless marked).", "",
             "## Final models, default sampling", "", table(results["main"], lambda r: r["variant"]), ""]
    if heldout:
        parts += ["Held-out bits per token on all test images (from the pipeline run): "
                  + ", ".join(f"{k} {v['bits_per_token']:.4f}" for k, v in heldout.items() if isinstance(v, dict)), ""]
    parts += ["## Quality against epoch", "",
              table(results.get("epochs_ctf", []) + results.get("epochs_baseline", []),
                    lambda r: f"{r['name']} epoch {r['epoch']}"), "",
              f"## Ablations at step {steps}", "", table(results["ablations"], lambda r: r["variant"]), "",
              "## Sampling ablations (final CTF model)", "", table(results["sampling"], lambda r: r["variant"]), ""]
    path = run.dir / "results.md"
    path.write_text("\n".join(parts))
    (run.dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_epochs(results, run.dir / "quality_vs_epoch.png")
    return path


def reproduce(run_dir: str | Path, settings_path: str | Path | None = None, independent_only: bool = False) -> Path | None:
    run = MainRun(run_dir)
    settings = load_settings(settings_path)
    if independent_only:
        train_independent_ablations(run, settings)
        return None
    results = run_evaluations(run, settings)
    path = write_report(run, results, settings)
    _say(f"wrote {path}, {run.dir / 'results.json'} and {run.dir / 'quality_vs_epoch.png'}")
    return path
