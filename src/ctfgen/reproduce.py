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
from pathlib import Path

from ctfgen.config import ExperimentConfig, ReproduceConfig, load_config, read_yaml
from ctfgen.fileio import atomic_write_json, atomic_write_text, publish_dir
from ctfgen.rundir import RunDir


def _say(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


class MainRun(RunDir):
    """The finished `ctfgen pipeline` run the reproduction builds on, and its resolved config."""

    def __init__(self, root):
        super().__init__(root)
        self.require(self.config, self.tokenizer / "config.json", self.codes("train") / "header.json",
                     self.codes("test") / "header.json")
        self.settings = ExperimentConfig.from_raw(read_yaml(self.config))

    def load_tokenizer(self):
        from ctfgen.tokenizer.vq import VQModel

        return VQModel.from_pretrained(str(self.tokenizer)).eval()

    def load_snapshot(self, stage: str, step: int):
        from ctfgen.errors import RunError
        from ctfgen.train.stages import load_stage_model

        path = self.snapshot(stage, step)
        if not path.is_dir():
            raise RunError(f"{path} is missing; the main run's train.snapshot_every must divide {step}")
        return load_stage_model(stage, path)

    @property
    def steps_per_epoch(self) -> float:
        header = json.loads((self.codes("train") / "header.json").read_text())
        return header["num_images"] / int(self.settings.stage1.train.batch_size)


# --- ablation training ----------------------------------------------------------------------------

def train_ablation(run: MainRun, name: str, settings: ReproduceConfig, num_coarse: int, method: str = "kmeans",
                   restrict: bool = True, reuse_stage1_map: bool = False) -> Path:
    """Train stage 1 and/or the aux model of one variant; returns its CTF pipeline directory."""
    from ctfgen.clustering import CoarseMap
    from ctfgen.pipeline import CTFPipeline
    from ctfgen.train.stages import train_stage

    out = run.ablation(name)
    final = out / "ctf"
    if (final / "pipeline.json").exists():
        return final
    out.mkdir(parents=True, exist_ok=True)
    cfg = run.settings
    vq = run.load_tokenizer()
    codes = run.codes("train")
    if reuse_stage1_map:
        cmap = CoarseMap.load(run.ctf / "coarse_map.safetensors")
    else:
        map_path = out / "coarse_map.safetensors"
        if not map_path.exists():
            cmap = CoarseMap.fit(vq, num_coarse, method=method, seed=int(cfg.clustering.seed))
            cmap.save(map_path)
        cmap = CoarseMap.load(map_path)

    def train(stage: str, model_overrides: dict | None = None):
        s = cfg.stage(stage)
        train_cfg = {**s.train.to_dict(), "steps": int(settings.steps), "snapshot_every": 0}
        _say(f"{name}: training {stage} ({s.preset}, {train_cfg['steps']} steps)")
        model, _ = train_stage(stage, codes, out / stage, coarse_map=cmap, preset=s.preset,
                               model={**s.model, **(model_overrides or {})}, train_config=train_cfg,
                               resume=True, run_config={"ablation": name, "main_run": str(run.root)}, desc=f"{name}/{stage}")
        return model.eval()

    ar = run.load_snapshot("ar", int(settings.steps)) if reuse_stage1_map else train("ar")
    aux = train("aux", {"restrict_to_cluster": restrict})
    return publish_dir(CTFPipeline(ar, aux, cmap, vq).save_pretrained, final)


def main_snapshot_pipeline(run: MainRun, step: int, method: str):
    from ctfgen.clustering import CoarseMap
    from ctfgen.pipeline import ARPipeline, CTFPipeline

    vq = run.load_tokenizer()
    if method == "baseline":
        return ARPipeline(run.load_snapshot("baseline", step), vq)
    cmap = CoarseMap.load(run.ctf / "coarse_map.safetensors")
    return CTFPipeline(run.load_snapshot("ar", step), run.load_snapshot("aux", step), cmap, vq)


# --- evaluation -------------------------------------------------------------------------------------

def evaluate_pipeline(pipeline, settings: ReproduceConfig, sampling: dict | None = None, heldout: bool = True,
                      run: MainRun | None = None) -> dict:
    """Offline Fashion-MNIST metrics of `per_class` samples per class, exact held-out bits per
    token, and the sampling time."""
    from ctfgen.metrics.evaluate import evaluate_fmnist, sample_per_class
    from ctfgen.pipeline import heldout_bits_per_token

    e = settings.evaluation
    images, labels, seconds_per_image = sample_per_class(pipeline, int(e.per_class), int(e.seed), int(e.batch_size),
                                                         sampling)
    metrics = evaluate_fmnist(images, labels)
    metrics["sample_seconds_per_image"] = seconds_per_image
    if heldout and run is not None:
        h = heldout_bits_per_token(pipeline, run.codes("test"), int(e.heldout_images), batch_size=500)
        metrics["bits_per_token"], metrics["bits_per_token_exact"] = h["bits_per_token"], h["exact"]
    return metrics


def evaluate_once(run: MainRun, group: str, name: str, make_pipeline, settings: ReproduceConfig, sampling: dict | None = None,
                  epoch: float | None = None, extra: dict | None = None, heldout: bool = True) -> dict:
    from ctfgen.metrics.evaluate import write_record

    path = run.eval_record(group, name)
    if path.exists():
        return json.loads(path.read_text())
    _say(f"evaluating {group}/{name}")
    pipeline = make_pipeline()
    metrics = evaluate_pipeline(pipeline, settings, sampling, heldout=heldout, run=run)
    record = {"name": group if epoch is not None else name, "epoch": epoch, "metric_set": "fmnist",
              "samples": f"{int(settings.evaluation.per_class)} per class, seed {settings.evaluation.seed}",
              "reference": "fashion-mnist-test", "metrics": metrics, "sampling": sampling or {},
              "variant": name, **(extra or {})}
    write_record(record, path)
    return record


def train_independent_ablations(run: MainRun, settings: ReproduceConfig) -> None:
    """The variants that need only the tokenizer and codes, not the main run's models, so they can
    train beside the main run (`ctfgen reproduce --independent-only`)."""
    k_main = int(run.settings.clustering.num_coarse)
    for k in settings.clusters:
        train_ablation(run, f"kmeans-k{k}", settings, int(k))
    if settings.random_clusters:
        train_ablation(run, f"random-k{k_main}", settings, k_main, method="random")


def run_evaluations(run: MainRun, settings: ReproduceConfig) -> dict[str, list[dict]]:
    from ctfgen.pipeline import load_pipeline

    run.require(run.ctf / "pipeline.json", run.baseline / "pipeline.json")
    steps = int(settings.steps)
    per_epoch = run.steps_per_epoch
    k_main = int(run.settings.clustering.num_coarse)
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
        evaluate_once(run, "main", "ctf", lambda: load_pipeline(run.ctf), settings),
        evaluate_once(run, "main", "baseline", lambda: load_pipeline(run.baseline), settings),
    ]

    # Ablations at `steps`, against the main run's snapshot at the same step.
    ref = lambda: main_snapshot_pipeline(run, steps, "ctf")  # noqa: E731
    group = [evaluate_once(run, "ablations", f"kmeans-k{k_main}", ref, settings, extra={"num_coarse": k_main})]
    for k in settings.clusters:
        path = train_ablation(run, f"kmeans-k{k}", settings, int(k))
        group.append(evaluate_once(run, "ablations", f"kmeans-k{k}", lambda: load_pipeline(path), settings,
                                   extra={"num_coarse": int(k)}))
    if settings.random_clusters:
        path = train_ablation(run, f"random-k{k_main}", settings, k_main, method="random")
        group.append(evaluate_once(run, "ablations", f"random-k{k_main}", lambda: load_pipeline(path), settings,
                                   extra={"num_coarse": k_main}))
    if settings.unrestricted_aux:
        path = train_ablation(run, f"unrestricted-k{k_main}", settings, k_main, restrict=False, reuse_stage1_map=True)
        group.append(evaluate_once(run, "ablations", f"unrestricted-k{k_main}", lambda: load_pipeline(path), settings,
                                   extra={"num_coarse": k_main}))
    group.append(evaluate_once(run, "ablations", f"baseline-step{steps}",
                               lambda: main_snapshot_pipeline(run, steps, "baseline"), settings))
    results["ablations"] = group

    # Sampling ablations on the final CTF model: stage-2 argmax, and the two temperatures.
    final = lambda: load_pipeline(run.ctf)  # noqa: E731
    sampling = [evaluate_once(run, "sampling", "argmax-fine", final, settings, {"top_k_fine": 1}, heldout=False)]
    for t in settings.evaluation.temperatures:
        sampling.append(evaluate_once(run, "sampling", f"temperature-{t}", final, settings,
                                      {"temperature": float(t)}, heldout=False))
        sampling.append(evaluate_once(run, "sampling", f"temperature-fine-{t}", final, settings,
                                      {"temperature_fine": float(t)}, heldout=False))
    results["sampling"] = sampling
    return results


# --- report -----------------------------------------------------------------------------------------

COLUMNS = ["fd", "is", "precision", "recall", "class_consistency", "bits_per_token", "sample_seconds_per_image"]


def write_report(run: MainRun, results: dict, settings: ReproduceConfig) -> Path:
    from ctfgen.metrics.compare import markdown_table, plot_metrics

    def table(records, label):
        return markdown_table(records, label=label, keys=COLUMNS)

    e = settings.evaluation
    heldout = json.loads(run.heldout.read_text()) if run.heldout.exists() else None
    parts = [f"# Reproduction results ({run.root})", "",
             f"Samples: {e.per_class} per class, seed {e.seed}; bits/token on the first {e.heldout_images} test "
             "images (exact unless marked).", "",
             "## Final models, default sampling", "", table(results["main"], lambda r: r["variant"])]
    if heldout:
        parts += ["Held-out bits per token on all test images (from the pipeline run): "
                  + ", ".join(f"{k} {v['bits_per_token']:.4f}" for k, v in heldout.items() if isinstance(v, dict)), ""]
    epochs = results.get("epochs_ctf", []) + results.get("epochs_baseline", [])
    parts += ["## Quality against epoch", "", table(epochs, lambda r: f"{r['name']} epoch {r['epoch']}"),
              f"## Ablations at step {settings.steps}", "", table(results["ablations"], lambda r: r["variant"]),
              "## Sampling ablations (final CTF model)", "", table(results["sampling"], lambda r: r["variant"])]
    atomic_write_text(run.results_md, "\n".join(parts))
    atomic_write_json(run.results_json, results)
    plot_metrics(epochs, run.quality_plot, keys=["fd", "class_consistency", "bits_per_token"], one_figure=True)
    return run.results_md


def reproduce(run_dir, settings_path=None, independent_only: bool = False, overrides=None) -> Path | None:
    """`ctfgen reproduce`: the ablations, their evaluation and RUN/results.md."""
    run = MainRun(run_dir)
    settings = load_config(ReproduceConfig, settings_path, overrides)
    if independent_only:
        train_independent_ablations(run, settings)
        return None
    results = run_evaluations(run, settings)
    path = write_report(run, results, settings)
    _say(f"wrote {path}, {run.results_json} and {run.quality_plot}")
    return path
