"""The reproduction's second half: ablations, evaluation and the report, on top of a finished
`ctfgen pipeline` run (see configs/fashion_mnist.yaml and docs/results.md).

    ctfgen pipeline configs/fashion_mnist.yaml --out runs/fashion_mnist
    ctfgen reproduce configs/fashion_mnist_ablations.yaml --run runs/fashion_mnist

Everything lands under RUN: ablation models in `ablations/<name>/`, one evaluation record per
model and sampling setting in `eval/<group>/<name>.json` (the `ctfgen compare` format), and
`results.md`, `results.json` and `quality_vs_epoch.png`. Each finished piece is kept, so a killed
run continues where it stopped; a record made from other settings, models or code is refused
(`--force` recomputes it).

Ablations train for `steps` steps with the main run's settings and seed. The main run's lr is
constant after warm-up and it saved snapshots, so its snapshot at the same step is an exact
reference for them (same data order, same initialisation).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
from pathlib import Path

from ctfgen.clustering import CoarseMap
from ctfgen.config import ReproduceConfig
from ctfgen.data.codes import read_header
from ctfgen.experiments.run import STAGES_OF, FinishedRun
from ctfgen.metrics.compare import markdown_table, plot_metrics
from ctfgen.metrics.evaluate import evaluate_fmnist, sample_per_class
from ctfgen.pipeline import CTFPipeline, heldout_bits_per_token, load_pipeline
from ctfgen.train.checkpoint import list_checkpoints
from ctfgen.train.stages import train_stage
from ctfgen.utils.errors import ConfigError, RunError
from ctfgen.utils.fileio import atomic_write_json, atomic_write_text, publish_dir, read_json
from ctfgen.utils.fingerprint import directory_fingerprint
from ctfgen.utils.rundir import Records, WriterLock

logger = logging.getLogger("ctfgen.experiments.reproduce")
COLUMNS = ["fd", "is", "precision", "recall", "class_consistency", "bits_per_token", "sample_seconds_per_image"]


# --- ablation training ----------------------------------------------------------------------------

def ablations(run: FinishedRun, settings: ReproduceConfig, independent_only: bool = False
              ) -> list[tuple[str, int, dict]]:
    """(name, number of coarse labels, train_ablation options) of each ablation; `independent_only`:
    those that need only the tokenizer and codes, not the main run's models, so they can train beside
    the main run (`ctfgen reproduce --independent-only`)."""
    k_main = int(run.settings.clustering.num_coarse)
    # kmeans-k<K> names the main run's snapshot's record at its own K: an ablation of that K was trained, and
    # then its record was refused as one made from other models.
    if k_main in settings.clusters:
        raise ConfigError(f"clusters {list(settings.clusters)} holds the main run's num_coarse={k_main}, whose "
                          "ablation is the main run's snapshot (evaluated anyway); drop it from clusters")
    # Checked before any ablation trains, so that none is trained for nothing.
    codebook = int(read_header(run.codes("train"))["codebook_size"])
    if too_many := [k for k in settings.clusters if k > codebook]:
        raise ConfigError(f"clusters {too_many} exceed the run's codebook of {codebook} codes; give each at most "
                          f"{codebook}")
    for stage in ("ar", "baseline"):  # the main run's snapshots at `steps` are the ablations' references
        every = run.settings.stage(stage).train.snapshot_every
        if not every or int(settings.steps) % every:
            raise ConfigError(f"steps={settings.steps}: the main run's {stage} snapshots (train.snapshot_every="
                              f"{every}) hold none at that step, and the ablations are compared with them there; "
                              "set steps to a multiple of snapshot_every")
    variants = [(f"kmeans-k{k}", int(k), {}) for k in settings.clusters]
    if settings.random_clusters:
        variants.append((f"random-k{k_main}", k_main, {"method": "random"}))
    if settings.unrestricted_aux and not independent_only:
        variants.append((f"unrestricted-k{k_main}", k_main, {"restrict": False, "reuse_stage1_map": True}))
    return variants


def train_ablation(run: FinishedRun, name: str, settings: ReproduceConfig, num_coarse: int, method: str = "kmeans",
                   restrict: bool = True, reuse_stage1_map: bool = False) -> Path:
    """Train stage 1 and/or the aux model of one variant; returns its CTF pipeline directory."""
    out = run.ablation(name)
    final = out / "ctf"
    done, steps = (final / "pipeline.json").exists(), int(settings.steps)
    # Its evaluation record names its files, not how long they were trained: a model of another length would
    # stand silently beside the main run's snapshot at today's `steps` (and a resume past `steps` trains none).
    for stage in ("ar", "aux"):  # no ar/ when stage 1 is the main run's snapshot
        last = (list_checkpoints(out / stage / "checkpoints") or [(None,)])[-1][0]
        if last is not None and (last > steps or done and last != steps):
            raise RunError(f"{out / stage} was trained for {last} steps, but steps is {steps}: delete {out} "
                           f"to train the ablation again, or set steps: {last}")
    if done:
        return final
    cfg, map_path = run.settings, out / "coarse_map.safetensors"
    if not reuse_stage1_map and not map_path.exists():
        CoarseMap.fit(run.load_tokenizer(), num_coarse, method=method, seed=int(cfg.clustering.seed)).save(map_path)
    cmap = run.load_coarse_map() if reuse_stage1_map else CoarseMap.load(map_path)

    def train(stage: str, **model_overrides):
        s = cfg.stage(stage)
        logger.info(f"{name}: training {stage} ({s.preset}, {settings.steps} steps)")
        model, _ = train_stage(stage, run.codes("train"), out / stage, coarse_map=cmap, preset=s.preset,
                               model={**s.model, **model_overrides},
                               train_config=dataclasses.replace(s.train, steps=int(settings.steps), snapshot_every=0),
                               resume=True, run_config={"ablation": name, "main_run": str(run.root)},
                               desc=f"{name}/{stage}")
        return model.eval()

    ar = run.snapshot_model("ar", int(settings.steps)) if reuse_stage1_map else train("ar")
    aux = train("aux", restrict_to_cluster=restrict)
    return publish_dir(CTFPipeline(ar, aux, cmap, run.load_tokenizer()).save_pretrained, final)


# --- evaluation -------------------------------------------------------------------------------------

def run_evaluations(run: FinishedRun, settings: ReproduceConfig, force: bool = False) -> dict[str, list[dict]]:
    """Every evaluation record of the run: RUN/eval/<group>/<name>.json, each made once from its
    settings and models (`ctfgen.utils.rundir.Records`)."""
    run.require(run.part("ctf"), run.part("baseline"))
    e, steps, k_main = settings.evaluation, int(settings.steps), int(run.settings.clustering.num_coarse)
    trained = ablations(run, settings)  # settings it refuses stop the run here, before any evaluation

    def once(group: str, name: str, model_dirs: list[Path], make_pipeline, sampling: dict | None = None,
             heldout: bool = True, **extra) -> dict:
        """The record of one model at one sampling setting; `extra` (epoch, step, num_coarse) goes into it."""
        inputs = {"per_class": e.per_class, "seed": e.seed, "batch_size": e.batch_size, "sampling": sampling or {},
                  "heldout_images": e.heldout_images if heldout else None,
                  "models": {str(d.relative_to(run.root)): directory_fingerprint(d) for d in model_dirs}}

        def compute():
            pipe = make_pipeline()
            images, labels, seconds = sample_per_class(pipe, int(e.per_class), int(e.seed), int(e.batch_size), sampling)
            metrics = {**evaluate_fmnist(images, labels), "sample_seconds_per_image": seconds}
            if heldout:
                h = heldout_bits_per_token(pipe, run.codes("test"), int(e.heldout_images), batch_size=500)
                metrics["bits_per_token"], metrics["bits_per_token_exact"] = h["bits_per_token"], h["exact"]
            # a snapshot's record takes its group's name: `ctfgen compare` draws one line per name against epoch
            return {"name": group if "epoch" in extra else name, "epoch": None, "metric_set": "fmnist",
                    "samples": f"{int(e.per_class)} per class, seed {e.seed}", "reference": "fashion-mnist-test",
                    "metrics": metrics, "sampling": sampling or {}, "variant": name, **extra}

        records = Records(run.evaluations(group), force=force, say=lambda what: logger.info(f"evaluating {what}"))
        return records.once(name, inputs, compute)

    def snapshot(method: str, at: int, group: str, name: str, **extra) -> dict:
        return once(group, name, [run.snapshot(s, at) for s in STAGES_OF[method]],
                    lambda: run.snapshot_pipeline(method, at), **extra)

    # Quality against training epoch (the paper's Fig. 2): the main run's snapshots.
    results: dict[str, list[dict]] = {}
    for method, stage in (("ctf", "ar"), ("baseline", "baseline")):
        for step in run.snapshot_steps(stage):
            epoch = round(step / run.steps_per_epoch(stage), 3)
            results.setdefault(f"epochs_{method}", []).append(
                snapshot(method, step, method, f"step-{step:06d}", epoch=epoch, step=step))

    # The final models with their default sampling (the headline comparison).
    results["main"] = [once("main", m, [run.pipeline_dir(m)], lambda: run.pipeline(m)) for m in ("ctf", "baseline")]

    # Ablations at `steps`, against the main run's snapshot at the same step.
    group = [snapshot("ctf", steps, "ablations", f"kmeans-k{k_main}", num_coarse=k_main)]
    for name, k, options in trained:
        path = train_ablation(run, name, settings, k, **options)
        group.append(once("ablations", name, [path], lambda: load_pipeline(path), num_coarse=k))
    results["ablations"] = group + [snapshot("baseline", steps, "ablations", f"baseline-step{steps}")]

    # Sampling ablations on the final CTF model: stage-2 argmax, and the two temperatures.
    variants = [("argmax-fine", {"top_k_fine": 1}), *((f"{k.replace('_', '-')}-{t}", {k: float(t)})
                for t in e.temperatures for k in ("temperature", "temperature_fine"))]
    results["sampling"] = [once("sampling", name, [run.ctf], lambda: run.pipeline("ctf"), sampling, heldout=False)
                           for name, sampling in variants]
    return results


# --- report -----------------------------------------------------------------------------------------

def write_report(run: FinishedRun, results: dict, settings: ReproduceConfig) -> Path:
    table, variant = functools.partial(markdown_table, keys=COLUMNS), operator.itemgetter("variant")
    e = settings.evaluation
    heldout = None
    if run.heldout.exists():
        heldout = read_json(run.heldout, "delete it and run `ctfgen pipeline --resume` to measure it again")
    parts = [f"# Reproduction results ({run.root})", "",
             f"Samples: {e.per_class} per class, seed {e.seed}; bits/token on the first {e.heldout_images} test "
             "images (exact unless marked).", "",
             "## Final models, default sampling", "", table(results["main"], variant)]
    if heldout:
        parts += ["Held-out bits per token on all test images (from the pipeline run): "
                  + ", ".join(f"{k} {v['bits_per_token']:.4f}" for k, v in heldout.items() if isinstance(v, dict)), ""]
    epochs = results.get("epochs_ctf", []) + results.get("epochs_baseline", [])
    parts += ["## Quality against epoch", "", table(epochs, lambda r: f"{r['name']} epoch {r['epoch']}"),
              f"## Ablations at step {settings.steps}", "", table(results["ablations"], variant),
              "## Sampling ablations (final CTF model)", "", table(results["sampling"], variant)]
    atomic_write_text(run.results_md, "\n".join(parts))
    atomic_write_json(run.results_json, results)
    plot_metrics(epochs, run.quality_plot, keys=["fd", "class_consistency", "bits_per_token"], one_figure=True)
    return run.results_md


def reproduce(run_dir, settings: ReproduceConfig | None = None, independent_only: bool = False,
              force: bool = False) -> Path | None:
    """`ctfgen reproduce`: the ablations, their evaluation and RUN/results.md. `force` recomputes
    evaluation records made from other settings, models or code instead of refusing them."""
    settings = settings or ReproduceConfig()
    run = FinishedRun(run_dir, "tokenizer", "train", "test")
    with WriterLock(run.root, "reproduce"):
        if independent_only:
            for name, k, options in ablations(run, settings, independent_only=True):
                train_ablation(run, name, settings, k, **options)
            return None
        path = write_report(run, run_evaluations(run, settings, force), settings)
    logger.info(f"wrote {path}, {run.results_json} and {run.quality_plot}")
    return path
