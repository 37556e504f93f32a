"""The codebook-size study: CTF against the same-size and the parameter-matched baseline as the codebook grows.

Each codebook size is one finished `ctfgen pipeline` run of `configs/study/fmnist_v<V>.yaml`; this
module evaluates it and writes one small JSON record per measurement, so a killed study continues
where it stopped and every number in docs/results.md has its record:

    ctfgen study ~/study/v16384 ~/study/v4096 ~/study/v1024 --records docs/results/study

RECORDS/<run>/
    tokenizer.json            codebook usage, code perplexity and PSNR over the whole test split
    epoch-<n>.json            at every epoch snapshot: held-out bits/token of every method and the
                              teacher-forced coarse prediction of stage 1 vs the baseline (diagnosis)
    select-<method>.json      guidance x stage-1 temperature, scored on the validation split with
                              its own seed (`select_seed`), never the test streams
    test-<method>-<setting>-seed<s>.json   test-split metrics at the chosen setting and the defaults
    diagnosis.json            stage-wise sample sets built from one half of the test split (per class)
                              and scored against the other half, which none of them was made from

Methods: `ctf`, `baseline` (stage 1's size: the paper's comparison) and `matched` (the baseline with
CTF's parameter count), when the run has it. Every record stores what it was computed from: the
settings that shape it, the fingerprints of the model files and the code's commit. A record whose
inputs differ from the current ones is refused, never silently reused.
RECORDS/summary.md and figures: `write_report`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctfgen.config import ExperimentConfig, read_yaml
from ctfgen.errors import ConfigError, RunError
from ctfgen.fileio import atomic_write_text
from ctfgen.fingerprint import code_commit, directory_fingerprint
from ctfgen.rundir import RunDir

__all__ = ["StudySettings", "study_run", "write_report", "METHODS"]

METHODS = ("ctf", "baseline", "matched")


@dataclass
class StudySettings:
    guidance: tuple[float, ...] = (1.5, 2.0, 3.0)
    temperatures: tuple[float, ...] = (0.9, 1.0, 1.1)  # stage 1 for CTF, the only one for the baselines
    select_per_class: int = 200         # validation samples per class for each grid point (2000 in all)
    select_seed: int = 1000             # the selection's sampling stream, apart from every test seed
    test_per_class: int = 500           # test samples per class for each reported cell (5000 in all)
    seeds: tuple[int, ...] = (0,)       # sampling seeds of the test cells (two: a spread to judge noise by)
    tokenizer_images: int | None = None  # test images for codebook usage and PSNR (None: the whole split)
    heldout_images: int = 10000         # test images for bits/token at every epoch
    coarse_images: int = 2000           # test images for the teacher-forced coarse prediction
    diagnosis_per_class: int = 500      # test images per class whose codes make the diagnosis sets; the
                                        # other test images of each class are their reference
    diagnosis_seed: int = 2000          # the diagnosis' sampling stream
    batch_size: int = 250

    def __post_init__(self):
        for name in ("select_per_class", "test_per_class", "heldout_images", "coarse_images", "diagnosis_per_class",
                     "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"study setting {name} must be >= 1, got {getattr(self, name)}")
        if self.tokenizer_images is not None and int(self.tokenizer_images) < 1:
            raise ConfigError(f"study setting tokenizer_images must be >= 1, got {self.tokenizer_images}")
        self.guidance, self.temperatures = tuple(map(float, self.guidance)), tuple(map(float, self.temperatures))
        self.seeds = tuple(map(int, self.seeds))
        if not (self.guidance and self.temperatures and self.seeds):
            raise ConfigError("the study needs at least one guidance scale, temperature and seed")
        shared = {self.select_seed, self.diagnosis_seed} & set(self.seeds)
        if shared or self.select_seed == self.diagnosis_seed:
            raise ConfigError(f"the test seeds {list(self.seeds)}, select_seed {self.select_seed} and diagnosis_seed "
                              f"{self.diagnosis_seed} must all differ: each sample set gets its own stream")


def _say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


class _Records:
    """RECORDS/<run>/<name>.json, each computed once from named inputs.

    `inputs` are what shapes the record (settings, model fingerprints); they are stored with the code's
    commit and compared on every later call, so a changed grid, seed, sample count, model or code
    is refused instead of answered by an old record.
    """

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.commit = code_commit()

    def once(self, name: str, inputs: dict, compute) -> dict:
        path = self.dir / f"{name}.json"
        inputs = json.loads(json.dumps(inputs, default=str))
        if path.is_file():
            record = json.loads(path.read_text())
            then = {"inputs": record.get("inputs"), "commit": record.get("commit")}
            now = {"inputs": inputs, "commit": self.commit}
            if then != now:
                raise RunError(f"{path} was computed from other inputs than today's:\n  " + "\n  ".join(_diff(then, now))
                               + f"\nRun the study with what made it (the commit's pinned install, the same settings "
                                 f"and models), or delete {path} to recompute it.")
            return record
        _say(f"{self.dir.name}/{name}")
        t0 = time.perf_counter()
        record = {"name": name, "inputs": inputs, "commit": self.commit, **compute(),
                  "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        return record


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new)) for line in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} then, {new!r} now"]


class _Run(RunDir):
    """A finished `ctfgen pipeline` run directory, read-only."""

    def __init__(self, directory):
        super().__init__(Path(directory).expanduser())
        self.require(self.config, self.ctf / "pipeline.json", self.baseline / "pipeline.json",
                     self.codes("test") / "header.json")
        if not self.codes("val").exists():
            raise RunError(f"{self.codes('val')} is missing: the study needs the run's validation split "
                           "(data.validation_images > 0 in configs/study/fmnist_v<V>.yaml)")
        self.settings = ExperimentConfig.from_raw(read_yaml(self.config))
        self.name = self.root.name
        self.methods = tuple(m for m in METHODS if self.pipeline_dir(m) is not None)

    def pipeline_dir(self, method: str) -> Path | None:
        d = {"ctf": self.ctf, "baseline": self.baseline, "matched": self.matched}[method]
        return d if (d / "pipeline.json").is_file() else None

    def pipelines(self) -> dict:
        from ctfgen.pipeline import ARPipeline, CTFPipeline

        return {m: (CTFPipeline if m == "ctf" else ARPipeline).from_pretrained(self.pipeline_dir(m)) for m in self.methods}

    def fingerprints(self, *methods: str) -> dict:
        return {m: directory_fingerprint(self.pipeline_dir(m)) for m in methods}

    def code_dataset(self, split: str):
        from ctfgen.data.codes import CodeDataset

        return CodeDataset(self.codes(split), augmentation=0)

    def snapshot_stages(self) -> tuple[str, ...]:
        return ("ar", "aux", "baseline") + (("matched",) if "matched" in self.methods else ())

    def common_snapshot_steps(self) -> list[int]:
        steps = [set(self.snapshot_steps(s)) for s in self.snapshot_stages()]
        return sorted(set.intersection(*steps))

    def snapshot_pipelines(self, step: int, pipes: dict) -> dict:
        from ctfgen.models.transformer import GPT, AuxModel
        from ctfgen.pipeline import ARPipeline, CTFPipeline

        snap = lambda stage, cls: cls.from_pretrained(str(self.snapshot(stage, step)))  # noqa: E731
        ctf = pipes["ctf"]
        out = {"ctf": CTFPipeline(snap("ar", GPT), snap("aux", AuxModel), ctf.coarse_map, ctf.tokenizer),
               "baseline": ARPipeline(snap("baseline", GPT), pipes["baseline"].tokenizer)}
        if "matched" in self.methods:
            out["matched"] = ARPipeline(snap("matched", GPT), pipes["matched"].tokenizer)
        return out

    def snapshot_fingerprints(self, step: int) -> dict:
        return {s: directory_fingerprint(self.snapshot(s, step)) for s in self.snapshot_stages()}

    @property
    def steps_per_epoch(self) -> float:
        header = json.loads((self.codes("train") / "header.json").read_text())
        return header["num_images"] / int(self.settings.train.batch_size)

    def images(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 28, 28) images and labels of a split, in the order its codes were extracted."""
        from ctfgen.data import make_dataset

        ds = make_dataset(self.settings.data, split, channels=1)
        return ds.images[ds.indices], ds.labels[ds.indices]


def _sample_and_score(pipe, per_class: int, seed: int, batch_size: int, sampling: dict, ref) -> dict:
    from ctfgen.metrics.evaluate import evaluate_fmnist, sample_per_class

    images, labels, seconds = sample_per_class(pipe, per_class, seed, batch_size, sampling)
    return {**evaluate_fmnist(images, labels, ref=ref), "sample_seconds_per_image": seconds}


def _grid(settings: StudySettings) -> list[dict]:
    return [{"cfg_scale": g, "temperature": t} for g in settings.guidance for t in settings.temperatures]


def _at_edge(chosen: dict, settings: StudySettings) -> list[str]:
    """The settings whose chosen value is the grid's smallest or largest: the best may lie beyond."""
    axes = {"cfg_scale": settings.guidance, "temperature": settings.temperatures}
    return [k for k, values in axes.items() if len(values) > 1 and chosen[k] in (min(values), max(values))]


def split_halves(labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, reference) indices: the first `per_class` images of each class, and all the others."""
    labels = np.asarray(labels)
    source = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= per_class:
            raise ConfigError(f"diagnosis_per_class={per_class} leaves no reference image of class {c}, which has "
                              f"{len(idx)} test images; lower it")
        source.append(idx[:per_class])
    source = np.sort(np.concatenate(source))
    return source, np.setdiff1d(np.arange(len(labels)), source)


def study_run(run_dir, records_dir, settings: StudySettings | None = None) -> dict:
    """Evaluate one finished study run; returns {record name: record}. Idempotent."""
    from ctfgen.diagnosis import coarse_prediction, most_frequent_members, stagewise_sets
    from ctfgen.images import to_uint8
    from ctfgen.metrics.evaluate import evaluate_fmnist
    from ctfgen.pipeline import heldout_bits_per_token

    s = settings or StudySettings()
    run = _Run(run_dir)
    rec = _Records(Path(records_dir) / run.name)
    out = {}
    pipes = run.pipelines()
    ctf = pipes["ctf"]
    test = run.code_dataset("test")
    vocab = ctf.coarse_map.vocab_size

    def tokenizer_record():
        from ctfgen.data import make_dataset
        from ctfgen.tokenizer.codebook import evaluate_tokenizer

        data = make_dataset(run.settings.data, "test", channels=1)
        if s.tokenizer_images is not None and s.tokenizer_images < len(data):
            from torch.utils.data import Subset

            data = Subset(data, range(int(s.tokenizer_images)))
        r = evaluate_tokenizer(ctf.tokenizer, data)
        return {"codebook_size": vocab, "num_coarse": ctf.coarse_map.num_coarse, **r}

    out["tokenizer"] = rec.once("tokenizer", {"tokenizer_images": s.tokenizer_images,
                                              "models": {"tokenizer": directory_fingerprint(run.tokenizer)}},
                                tokenizer_record)

    x_coarse, y_coarse = test.get_batch(list(range(min(len(test), s.coarse_images))))
    for step in run.common_snapshot_steps():
        epoch = step / run.steps_per_epoch

        def epoch_record(step=step, epoch=epoch):
            snaps = run.snapshot_pipelines(step, pipes)
            return {"codebook_size": vocab, "step": step, "epoch": round(epoch, 3),
                    "heldout": {m: heldout_bits_per_token(p, test, s.heldout_images) for m, p in snaps.items()},
                    "coarse_prediction": coarse_prediction(snaps["ctf"].ar, snaps["baseline"].gpt, ctf.coarse_map,
                                                           x_coarse, y_coarse)}

        name = f"epoch-{epoch:.2f}"
        out[name] = rec.once(name, {"heldout_images": s.heldout_images, "coarse_images": s.coarse_images,
                                    "models": run.snapshot_fingerprints(step)}, epoch_record)

    val = run.images("val")[0]
    chosen = {}
    for method, pipe in pipes.items():
        def select_record(pipe=pipe):
            rows = [{"sampling": g, **_sample_and_score(pipe, s.select_per_class, s.select_seed, s.batch_size, g, val)}
                    for g in _grid(s)]
            best = min(rows, key=lambda r: r["fd"])
            by_kid = min(rows, key=lambda r: r["kid"])
            return {"codebook_size": vocab, "reference": f"validation split ({len(val)} training images held out)",
                    "per_class": s.select_per_class, "seed": s.select_seed, "grid": rows, "chosen": best["sampling"],
                    "chosen_by": "fd", "kid_would_choose": by_kid["sampling"],
                    "at_edge": _at_edge(best["sampling"], s)}

        inputs = {"guidance": s.guidance, "temperatures": s.temperatures, "per_class": s.select_per_class,
                  "seed": s.select_seed, "batch_size": s.batch_size, "models": run.fingerprints(method)}
        selection = rec.once(f"select-{method}", inputs, select_record)
        if selection["at_edge"]:
            _say(f"{run.name}: {method}'s chosen {selection['chosen']} is at the edge of the grid in "
                 f"{', '.join(selection['at_edge'])}: the best setting may lie beyond it")
        chosen[method] = selection["chosen"]
        out[f"select-{method}"] = selection
        for setting, sampling in (("chosen", chosen[method]), ("default", {})):
            for seed in s.seeds:
                name = f"test-{method}-{setting}-seed{seed}"
                resolved = {**pipe.sampling_defaults, **sampling}

                def test_record(pipe=pipe, sampling=sampling, seed=seed, setting=setting, resolved=resolved,
                                method=method):
                    return {"codebook_size": vocab, "method": method, "setting": setting, "seed": seed,
                            "sampling": resolved, "per_class": s.test_per_class, "reference": "fashion-mnist-test",
                            "metrics": _sample_and_score(pipe, s.test_per_class, seed, s.batch_size, sampling, "test")}

                out[name] = rec.once(name, {"sampling": resolved, "per_class": s.test_per_class, "seed": seed,
                                            "batch_size": s.batch_size, "models": run.fingerprints(method)}, test_record)

    def diagnosis_record():
        base = pipes["baseline"]
        train_codes = run.code_dataset("train")
        counts_from = train_codes.get_batch(list(range(len(train_codes))))[0]
        reps = most_frequent_members(ctf.coarse_map, counts_from)
        images, labels = run.images("test")
        if not np.array_equal(labels, np.asarray(test.labels)):
            raise RunError(f"{run.codes('test')} does not hold the test images in the order the dataset gives them; "
                           "extract the codes again (ctfgen pipeline --resume after deleting the codes)")
        source, reference = split_halves(labels, s.diagnosis_per_class)
        x, y = test.get_batch(source.tolist())
        sets: dict[str, list] = {}
        for name, batch, batch_labels in stagewise_sets(ctf, base, x, y, reps, batch_size=s.batch_size,
                                                        seed=s.diagnosis_seed, ctf_sampling=chosen["ctf"],
                                                        baseline_sampling=chosen["baseline"]):
            sets.setdefault(name, [[], []])
            sets[name][0].append(to_uint8(batch))
            sets[name][1].append(batch_labels.numpy())
        ref = images[reference]
        return {"codebook_size": vocab, "images": int(len(x)), "reference_images": int(len(ref)),
                "sampling": {m: chosen[m] for m in ("ctf", "baseline")},
                "source": f"the first {s.diagnosis_per_class} test images of each class (their codes, and their "
                          "classes for the sampled sets)",
                "reference": "the other test images, which no set was made from",
                "representatives": "most frequent member of each cluster in the training codes",
                "sets": {name: evaluate_fmnist(np.concatenate(i), np.concatenate(lab), ref=ref)
                         for name, (i, lab) in sets.items()}}

    out["diagnosis"] = rec.once("diagnosis", {"per_class": s.diagnosis_per_class, "seed": s.diagnosis_seed,
                                              "batch_size": s.batch_size,
                                              "sampling": {m: chosen[m] for m in ("ctf", "baseline")},
                                              "models": run.fingerprints("ctf", "baseline")}, diagnosis_record)
    return out


# --- the report -------------------------------------------------------------------------------------

def _load(records_dir: Path) -> dict[str, dict[str, dict]]:
    runs = {}
    for d in sorted(p for p in Path(records_dir).iterdir() if p.is_dir()):
        runs[d.name] = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}
    return runs


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def write_report(records_dir, figure_dir=None) -> str:
    """Markdown tables of every study record under `records_dir`, and figures of Fréchet distance and
    bits/token against codebook size and against epoch (PNG files in `figure_dir`). Returns the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _load(Path(records_dir))
    if not runs:
        raise RunError(f"no study records under {records_dir}: run `ctfgen study RUN... --records {records_dir}`")
    order = sorted(runs, key=lambda r: runs[r].get("tokenizer", {}).get("codebook_size", 0))
    lines = ["| codebook | K | codes used (test) | code perplexity | PSNR dB | method | setting | FD ↓ | KID×100 ↓ | Prec ↑ | Rec ↑ "
             "| Class acc ↑ | bits/token ↓ |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_size = {m: {} for m in METHODS}
    edges = []
    for r in order:
        recs = runs[r]
        tok = recs.get("tokenizer", {})
        epochs = sorted((v for k, v in recs.items() if k.startswith("epoch-")), key=lambda v: v["step"])
        last = epochs[-1]["heldout"] if epochs else {}
        for method in METHODS:
            if recs.get(f"select-{method}", {}).get("at_edge"):
                edges.append(f"- V = {tok.get('codebook_size', r)}, {method}: the chosen "
                             f"{recs[f'select-{method}']['chosen']} is at the edge of the grid in "
                             f"{', '.join(recs[f'select-{method}']['at_edge'])}.")
            for setting in ("chosen", "default"):
                cells = [v["metrics"] for k, v in recs.items() if k.startswith(f"test-{method}-{setting}-seed")]
                if not cells:
                    continue
                sampling = next(v["sampling"] for k, v in recs.items() if k.startswith(f"test-{method}-{setting}-seed"))
                desc = f"{setting} (g {sampling['cfg_scale']}, T {sampling['temperature']})"
                bits = last.get(method, {}).get("bits_per_token")
                kid = _mean_std([100 * c["kid"] for c in cells]) if all("kid" in c for c in cells) else "–"
                lines.append(f"| {tok.get('codebook_size', r)} | {tok.get('num_coarse', '')} | "
                             f"{tok.get('usage', float('nan')):.1%} | {tok.get('perplexity', float('nan')):.0f} | "
                             f"{tok.get('psnr', float('nan')):.2f} | {method} | {desc} | {_mean_std([c['fd'] for c in cells])} | "
                             f"{kid} | "
                             + " | ".join(_mean_std([c[m] for c in cells]) for m in ("precision", "recall", "class_consistency"))
                             + (f" | {bits:.3f} |" if bits is not None else " | – |"))
                if setting == "chosen":
                    by_size[method][tok.get("codebook_size")] = ([c["fd"] for c in cells], bits)
    md = ["## Test-split metrics per codebook size", "", *lines, ""]
    if edges:
        md += ["Sampling choices at the edge of the validation grid (a better setting may lie beyond):", "", *edges, ""]

    diag = [(r, runs[r]["diagnosis"]) for r in order if "diagnosis" in runs[r]]
    if diag:
        names = list(diag[0][1]["sets"])
        md += ["## Stage-wise diagnosis (Fréchet distance against the test images no set was made from)", "",
               "| codebook | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        md += [f"| {d['codebook_size']} | " + " | ".join(f"{d['sets'][n]['fd']:.2f}" for n in names) + " |" for _, d in diag]
        md.append("")

    gaps = []
    for r in order:
        for k, v in sorted(runs[r].items(), key=lambda kv: kv[1].get("step", 0)):
            if k.startswith("epoch-"):
                cp = v["coarse_prediction"]
                gaps.append(f"| {v['codebook_size']} | {v['epoch']:.2f} | {v['heldout']['ctf']['bits_per_token']:.3f} | "
                            f"{v['heldout']['baseline']['bits_per_token']:.3f} | {cp['stage1']['bits_per_token']:.3f} | "
                            f"{cp['baseline_cluster_summed']['bits_per_token']:.3f} | {cp['gap_bits']:+.3f} | "
                            f"{cp['stage1']['top1']:.3f} / {cp['baseline_cluster_summed']['top1']:.3f} |")
    if gaps:
        md += ["## Against epoch: held-out bits/token and teacher-forced coarse prediction", "",
               "| codebook | epoch | CTF bits/token | baseline bits/token | stage-1 coarse bits | baseline cluster-summed coarse bits | gap | top-1 stage 1 / baseline |",
               "|---|---|---|---|---|---|---|---|", *gaps, ""]

    if figure_dir is not None:
        figure_dir = Path(figure_dir)
        figure_dir.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for method, style in (("ctf", "o-"), ("baseline", "s--"), ("matched", "^:")):
            sizes = sorted(k for k in by_size[method] if k)
            if not sizes:
                continue
            fds = [by_size[method][v][0] for v in sizes]
            axes[0].errorbar(sizes, [np.mean(f) for f in fds], yerr=[np.std(f, ddof=1) if len(f) > 1 else 0 for f in fds],
                             fmt=style, label=method, capsize=3)
            axes[1].plot(sizes, [by_size[method][v][1] for v in sizes], style, label=method)
        for ax, title in zip(axes, ("Fréchet distance (test) ↓", "held-out bits/token ↓")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("codebook size")
            ax.set_title(title)
            ax.legend()
        fig.tight_layout()
        fig.savefig(figure_dir / "study_vs_codebook.png", dpi=110)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for r in order:
            epochs = sorted((v for k, v in runs[r].items() if k.startswith("epoch-")), key=lambda v: v["step"])
            if not epochs:
                continue
            x = [e["epoch"] for e in epochs]
            size = epochs[0]["codebook_size"]
            for method, style in (("ctf", "o-"), ("baseline", "s--"), ("matched", "^:")):
                if method in epochs[0]["heldout"]:
                    axes[0].plot(x, [e["heldout"][method]["bits_per_token"] for e in epochs], style,
                                 label=f"{method} V={size}")
            axes[1].plot(x, [e["coarse_prediction"]["gap_bits"] for e in epochs], "o-", label=f"V={size}")
        axes[0].set_title("held-out bits/token ↓")
        axes[1].set_title("coarse bits: stage 1 − baseline summed")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figure_dir / "study_vs_epoch.png", dpi=110)
        plt.close(fig)
    return "\n".join(md)
