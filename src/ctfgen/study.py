"""The codebook-size study (issue 9): CTF against the same-size baseline as the codebook grows.

Each codebook size is one finished `ctfgen pipeline` run of `configs/study/fmnist_v<V>.yaml`; this
module evaluates it and writes one small JSON record per measurement, so a killed study continues
where it stopped and every number in docs/results.md has its record:

    ctfgen study ~/study/v16384 ~/study/v4096 ~/study/v1024 --records docs/results/study

RECORDS/<run>/
    tokenizer.json            codebook usage and PSNR over the whole test split
    epoch-<n>.json            at every epoch snapshot: held-out bits/token of both methods and the
                              teacher-forced coarse prediction of stage 1 vs the baseline (diagnosis)
    select-<method>.json      guidance x stage-1 temperature, scored on the validation split
    test-<method>-<setting>-seed<s>.json   test-split metrics at the chosen setting and the defaults
    diagnosis.json            stage-wise sample sets scored on the test split
RECORDS/summary.md and figures: `write_report`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["StudySettings", "study_run", "write_report"]


@dataclass
class StudySettings:
    guidance: tuple[float, ...] = (1.5, 2.0, 3.0)
    temperatures: tuple[float, ...] = (0.9, 1.0, 1.1)  # stage 1 for CTF, the only one for the baseline
    select_per_class: int = 100         # validation samples per class for each grid point
    test_per_class: int = 500           # test samples per class for each reported cell (5000 in all)
    seeds: tuple[int, ...] = (0,)       # sampling seeds of the test cells (two: a spread to judge noise by)
    tokenizer_images: int | None = None  # test images for codebook usage and PSNR (None: the whole split)
    heldout_images: int = 10000         # test images for bits/token at every epoch
    coarse_images: int = 2000           # test images for the teacher-forced coarse prediction
    diagnosis_images: int = 5000        # test images (and as many samples) per stage-wise set
    batch_size: int = 250

    def __post_init__(self):
        for name in ("select_per_class", "test_per_class", "heldout_images", "coarse_images", "diagnosis_images",
                     "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"study setting {name} must be >= 1, got {getattr(self, name)}")
        self.guidance, self.temperatures = tuple(map(float, self.guidance)), tuple(map(float, self.temperatures))
        self.seeds = tuple(map(int, self.seeds))


def _say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


class _Records:
    """RECORDS/<run>/<name>.json, each computed once."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def once(self, name: str, compute) -> dict:
        from ctfgen.fileio import atomic_write_text

        path = self.dir / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        _say(f"{self.dir.name}/{name}")
        t0 = time.perf_counter()
        record = {"name": name, **compute(), "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        return record


class _Run:
    """A finished `ctfgen pipeline` run directory, read-only."""

    def __init__(self, directory):
        import yaml

        self.dir = Path(directory).expanduser()
        for needed in ("config.yaml", "ctf/pipeline.json", "baseline/pipeline.json", "codes/test/header.json",
                       "codes/val/header.json"):
            if not (self.dir / needed).exists():
                raise FileNotFoundError(
                    f"{self.dir / needed} is missing: finish the run first (ctfgen pipeline "
                    f"configs/study/fmnist_v<V>.yaml --out {self.dir} --resume); the study needs its validation "
                    "split (data.validation_images > 0)")
        self.config = yaml.safe_load((self.dir / "config.yaml").read_text())
        self.name = self.dir.name

    def pipelines(self):
        from ctfgen.pipeline import ARPipeline, CTFPipeline

        return CTFPipeline.from_pretrained(self.dir / "ctf"), ARPipeline.from_pretrained(self.dir / "baseline")

    def codes(self, split: str):
        from ctfgen.data.codes import CodeDataset

        return CodeDataset(self.dir / "codes" / split, augmentation=0)

    def snapshot_steps(self) -> list[int]:
        steps = [sorted(int(p.name.split("-")[1]) for p in (self.dir / "runs" / s / "snapshots").glob("step-*"))
                 for s in ("ar", "aux", "baseline")]
        return sorted(set(steps[0]) & set(steps[1]) & set(steps[2]))

    def snapshot_pipelines(self, step: int):
        from ctfgen.models.transformer import GPT, AuxModel
        from ctfgen.pipeline import ARPipeline, CTFPipeline

        ctf, base = self.pipelines()
        snap = lambda stage, cls: cls.from_pretrained(str(self.dir / "runs" / stage / "snapshots" / f"step-{step:06d}"))  # noqa: E731
        return (CTFPipeline(snap("ar", GPT), snap("aux", AuxModel), ctf.coarse_map, ctf.tokenizer),
                ARPipeline(snap("baseline", GPT), base.tokenizer))

    @property
    def steps_per_epoch(self) -> float:
        header = json.loads((self.dir / "codes" / "train" / "header.json").read_text())
        return header["num_images"] / int(self.config["train"]["batch_size"])

    def validation_images(self) -> np.ndarray:
        from ctfgen.data.fashion_mnist import FashionMNIST

        val = FashionMNIST("val", root=self.config["data"]["root"], validation=int(self.config["data"]["validation_images"]))
        return val.images[val.indices]


def _sample_and_score(pipe, per_class: int, seed: int, batch_size: int, sampling: dict, ref) -> dict:
    from ctfgen.metrics.evaluate import evaluate_fmnist, sample_per_class

    images, labels, seconds = sample_per_class(pipe, per_class, seed, batch_size, sampling)
    return {**evaluate_fmnist(images, labels, ref=ref), "sample_seconds_per_image": seconds}


def _grid(settings: StudySettings) -> list[dict]:
    return [{"cfg_scale": g, "temperature": t} for g in settings.guidance for t in settings.temperatures]


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
    ctf, base = run.pipelines()
    test = run.codes("test")
    vocab = ctf.coarse_map.vocab_size

    def tokenizer_record():
        from ctfgen.data.fashion_mnist import FashionMNIST
        from ctfgen.tokenizer.codebook import evaluate_tokenizer

        r = evaluate_tokenizer(ctf.tokenizer, FashionMNIST("test", root=run.config["data"]["root"], limit=s.tokenizer_images))
        return {"codebook_size": vocab, "num_coarse": ctf.coarse_map.num_coarse, **r}

    out["tokenizer"] = rec.once("tokenizer", tokenizer_record)

    x_coarse, y_coarse = test.get_batch(list(range(min(len(test), s.coarse_images))))
    for step in run.snapshot_steps():
        epoch = step / run.steps_per_epoch

        def epoch_record(step=step, epoch=epoch):
            c, b = run.snapshot_pipelines(step)
            return {"codebook_size": vocab, "step": step, "epoch": round(epoch, 3),
                    "heldout": {"ctf": heldout_bits_per_token(c, test, s.heldout_images),
                                "baseline": heldout_bits_per_token(b, test, s.heldout_images)},
                    "coarse_prediction": coarse_prediction(c.ar, b.gpt, c.coarse_map, x_coarse, y_coarse)}

        out[f"epoch-{epoch:.2f}"] = rec.once(f"epoch-{epoch:.2f}", epoch_record)

    val = run.validation_images()
    chosen = {}
    for method, pipe in (("ctf", ctf), ("baseline", base)):
        def select_record(pipe=pipe):
            rows = [{"sampling": g, **_sample_and_score(pipe, s.select_per_class, 0, s.batch_size, g, val)}
                    for g in _grid(s)]
            best = min(rows, key=lambda r: r["fd"])
            return {"codebook_size": vocab, "reference": f"validation split ({len(val)} training images held out)",
                    "per_class": s.select_per_class, "grid": rows, "chosen": best["sampling"]}

        chosen[method] = rec.once(f"select-{method}", select_record)["chosen"]
        out[f"select-{method}"] = chosen[method]
        for setting, sampling in (("chosen", chosen[method]), ("default", {})):
            for seed in s.seeds:
                name = f"test-{method}-{setting}-seed{seed}"

                def test_record(pipe=pipe, sampling=sampling, seed=seed):
                    return {"codebook_size": vocab, "method": method, "setting": setting, "seed": seed,
                            "sampling": {**pipe.sampling_defaults, **sampling}, "per_class": s.test_per_class,
                            "reference": "fashion-mnist-test",
                            "metrics": _sample_and_score(pipe, s.test_per_class, seed, s.batch_size, sampling, "test")}

                out[name] = rec.once(name, test_record)

    def diagnosis_record():
        train_codes = run.codes("train")
        counts_from = train_codes.get_batch(list(range(len(train_codes))))[0]
        reps = most_frequent_members(ctf.coarse_map, counts_from)
        x, y = test.get_batch(list(range(min(len(test), s.diagnosis_images))))
        sets: dict[str, list] = {}
        for name, images, labels in stagewise_sets(ctf, base, x, y, reps, batch_size=s.batch_size,
                                                   ctf_sampling=chosen["ctf"], baseline_sampling=chosen["baseline"]):
            sets.setdefault(name, [[], []])
            sets[name][0].append(to_uint8(images))
            sets[name][1].append(labels.numpy())
        return {"codebook_size": vocab, "images": int(len(x)), "sampling": chosen,
                "representatives": "most frequent member of each cluster in the training codes",
                "sets": {name: evaluate_fmnist(np.concatenate(i), np.concatenate(lab)) for name, (i, lab) in sets.items()}}

    out["diagnosis"] = rec.once("diagnosis", diagnosis_record)
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
        raise FileNotFoundError(f"no study records under {records_dir}: run `ctfgen study RUN... --records {records_dir}`")
    order = sorted(runs, key=lambda r: runs[r].get("tokenizer", {}).get("codebook_size", 0))
    lines = ["| codebook | K | codes used (test) | PSNR dB | method | setting | FD ↓ | Prec ↑ | Rec ↑ | Class acc ↑ | bits/token ↓ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_size = {"ctf": {}, "baseline": {}}
    for r in order:
        recs = runs[r]
        tok = recs.get("tokenizer", {})
        epochs = sorted((v for k, v in recs.items() if k.startswith("epoch-")), key=lambda v: v["step"])
        last = epochs[-1]["heldout"] if epochs else {}
        for method in ("ctf", "baseline"):
            for setting in ("chosen", "default"):
                cells = [v["metrics"] for k, v in recs.items() if k.startswith(f"test-{method}-{setting}-seed")]
                if not cells:
                    continue
                sampling = next(v["sampling"] for k, v in recs.items() if k.startswith(f"test-{method}-{setting}-seed"))
                desc = f"{setting} (g {sampling['cfg_scale']}, T {sampling['temperature']})"
                bits = last.get(method, {}).get("bits_per_token")
                lines.append(f"| {tok.get('codebook_size', r)} | {tok.get('num_coarse', '')} | "
                             f"{tok.get('usage', float('nan')):.1%} | {tok.get('psnr', float('nan')):.2f} | {method} | {desc} | "
                             + " | ".join(_mean_std([c[m] for c in cells]) for m in ("fd", "precision", "recall", "class_consistency"))
                             + (f" | {bits:.3f} |" if bits is not None else " | – |"))
                if setting == "chosen":
                    by_size[method][tok.get("codebook_size")] = ([c["fd"] for c in cells], bits)
    md = ["## Test-split metrics per codebook size", "", *lines, ""]

    diag = [(r, runs[r]["diagnosis"]) for r in order if "diagnosis" in runs[r]]
    if diag:
        names = list(diag[0][1]["sets"])
        md += ["## Stage-wise diagnosis (Fréchet distance on the test split)", "",
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
        for method, style in (("ctf", "o-"), ("baseline", "s--")):
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
            for method, style in (("ctf", "o-"), ("baseline", "s--")):
                axes[0].plot(x, [e["heldout"][method]["bits_per_token"] for e in epochs], style, label=f"{method} V={size}")
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
