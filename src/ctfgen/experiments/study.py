"""The codebook-size study: CTF against the same-size and the parameter-matched baseline as the codebook grows.

Each codebook size is one finished `ctfgen pipeline` run of `configs/study/fmnist_v<V>.yaml`; this
module evaluates it and writes one small JSON record per measurement, so a killed study continues
where it stopped and every number in docs/results.md has its record:

    ctfgen study runs/study/v16384 runs/study/v4096 runs/study/v1024 --records docs/results/study

RECORDS/<run>/
    tokenizer.json            codebook usage, code perplexity and PSNR over the whole test split
    epoch-<n>.json            at every epoch snapshot: held-out bits/token of every method and the
                              teacher-forced coarse prediction of stage 1 vs the baseline (diagnosis)
    select-<method>.json      guidance x stage-1 temperature, scored on the validation split with
                              its own seed (`select_seed`), never the test streams
    test-<method>-<setting>-seed<s>.json   test-split metrics at the chosen setting and the defaults
    fd-<method>-epoch-<n>.json   test-split metrics of every epoch snapshot at the chosen setting, with its
                              own seed (`epoch_seed`) and fewer samples (`epoch_per_class`)
    diagnosis.json            stage-wise sample sets built from one half of the test split (per class)
                              and scored against the other half, which none of them was made from
    baselines-from.json       only for a run compared with another run's baselines (below): which
                              run, the fingerprints the two share, the depths of its stage 1 and
                              auxiliary model

Methods: `ctf`, `baseline` (stage 1's size: the paper's comparison) and `matched` (the baseline with
CTF's parameter count), when the run has it.

A run that trains no baselines of its own (the auxiliary model at 1x, on the V = 16384 run's tokenizer:
configs/study/fmnist_v16384_aux1x.yaml gives the commands) is studied `--baselines-from` a reference run,
studied first. The two must share the tokenizer, the coarse map and the test and validation codes
(checked by fingerprint); the run gets CTF's records only, and where they compare with the baseline
(coarse prediction, diagnosis) they use the reference's baseline at the reference's chosen setting.

Every record stores what it was computed from: the settings that shape it, the fingerprints of the
model files and the code's commit (`ctfgen.utils.rundir.Records`). A record whose inputs differ from
the current ones is refused, never silently reused. RECORDS/summary.md and figures: `write_report`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from ctfgen.config import StudySettings
from ctfgen.experiments.diagnosis import coarse_prediction, most_frequent_members, stagewise_sets
from ctfgen.experiments.run import METHODS, STAGES_OF, FinishedRun
from ctfgen.metrics.compare import markdown, plot_panels
from ctfgen.metrics.evaluate import evaluate_fmnist, sample_per_class
from ctfgen.pipeline import heldout_bits_per_token
from ctfgen.tokenizer.codebook import evaluate_tokenizer
from ctfgen.utils.errors import ConfigError, MismatchError, RunError
from ctfgen.utils.fingerprint import directory_fingerprint
from ctfgen.utils.images import to_uint8
from ctfgen.utils.rundir import Records, WriterLock, diff_lines

logger = logging.getLogger("ctfgen.experiments.study")


def _sample_and_score(pipe, per_class: int, seed: int, batch_size: int, sampling: dict, ref) -> dict:
    images, labels, seconds = sample_per_class(pipe, per_class, seed, batch_size, sampling)
    return {**evaluate_fmnist(images, labels, ref=ref), "sample_seconds_per_image": seconds}


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


def study_run(run_dir, records_dir, settings: StudySettings | None = None, force: bool = False,
              baselines_from=None) -> dict:
    """Evaluate one finished study run; returns {record name: record}. Idempotent; `force` recomputes
    records made from other inputs instead of refusing them. `baselines_from`: the finished run whose
    baselines a run without any of its own is compared with (`--baselines-from`, see above)."""
    s = settings or StudySettings()
    run = FinishedRun(run_dir, "ctf", "test", "val")
    reference = None
    if baselines_from is None:
        if not run.settings.baseline.enabled:
            raise ConfigError(f"{run.root} holds CTF but no baseline of its own (baseline.enabled: false): name the "
                              f"run whose baselines it is compared with (`ctfgen study {run.root} --baselines-from "
                              "RUN`, or study_run(..., baselines_from=RUN))")
        run.require(run.part("baseline"))
    else:
        if run.settings.baseline.enabled:
            raise ConfigError(f"{run.root} has a baseline of its own: --baselines-from is for a run without one "
                              "(baseline.enabled: false)")
        reference = FinishedRun(baselines_from, "test", "val")
        if not reference.settings.baseline.enabled:
            raise ConfigError(f"{reference.root} has no baseline of its own to compare {run.root} with: "
                              "--baselines-from names a run that trained one")
        reference.require(reference.part("baseline"))
        if reference.name == run.name:
            raise ConfigError(f"{run.root} and {reference.root} share the name {run.name!r}, so their records would "
                              "share one directory: rename one of them")
        shared = shared_fingerprints(run, reference)
    records = Path(records_dir)
    rec = Records(records / run.name, force=force, say=logger.info)
    with WriterLock(rec.dir, "study"):
        if reference is None:
            return _study(run, rec, s, {m: run for m in run.methods})
        ctf = run.pipeline("ctf")
        lent = rec.once("baselines-from", {"run": reference.name, "shared": shared}, lambda: {
            "run": reference.name, "shared": shared, "codebook_size": ctf.coarse_map.vocab_size,
            "stage1_layers": ctf.ar.config.n_layer, "aux_layers": ctf.aux.config.n_layer})
        cited = Records(records / reference.name)
        return {"baselines-from": lent, **_study(run, rec, s, {"ctf": run, "baseline": reference}, cited)}


def shared_fingerprints(run: FinishedRun, reference: FinishedRun) -> dict:
    """The fingerprints of the parts two runs must share for one to take the other's baselines (the
    tokenizer, the coarse map, the test and validation codes); a difference is refused."""
    parts = {"tokenizer": lambda r: directory_fingerprint(r.tokenizer),
             "coarse map": lambda r: r.load_coarse_map().fingerprint,
             "test codes": lambda r: directory_fingerprint(r.codes("test")),
             "validation codes": lambda r: directory_fingerprint(r.codes("val"))}
    shared = {}
    for part, fingerprint in parts.items():
        mine, theirs = fingerprint(run), fingerprint(reference)
        if mine != theirs:
            raise MismatchError(f"{reference.root} cannot lend its baselines to {run.root}: their {part} differ "
                                f"({theirs} there, {mine} here); name the run whose tokenizer, clustering and codes "
                                f"{run.name} shares (its tokenizer.pretrained: {run.settings.tokenizer.pretrained})")
        shared[part.replace(" ", "_")] = mine
    return shared


def _select_inputs(s: StudySettings, models: dict) -> dict:
    return {"guidance": s.guidance, "temperatures": s.temperatures, "per_class": s.select_per_class,
            "seed": s.select_seed, "batch_size": s.batch_size, "models": models}


def _study(run: FinishedRun, rec: Records, s: StudySettings, holders: dict[str, FinishedRun],
           cited: Records | None = None) -> dict:
    """`holders`: the run holding each method's pipeline (the run itself, or for the baseline of a
    run without one the reference, whose records `cited` holds); records are made for `run.methods`.
    `once` calls each compute function at once, inside its loop iteration."""
    out = {}
    pipes = {m: holders[m].pipeline(m) for m in holders}
    ctf, test = pipes["ctf"], run.code_dataset("test")
    vocab = ctf.coarse_map.vocab_size

    def once(name: str, inputs: dict, compute) -> dict:
        out[name] = rec.once(name, inputs, compute)
        return out[name]

    def fingerprints(*methods: str, step: int | None = None) -> dict:
        """Of the model files of `methods`: their finished pipelines, or their stages' snapshots at `step`."""
        if step is None:
            return {m: directory_fingerprint(holders[m].pipeline_dir(m)) for m in methods}
        return {st: directory_fingerprint(holders[m].snapshot(st, step)) for m in methods for st in STAGES_OF[m]}

    def scored(pipe, method: str, per_class: int, stream: int, sampling: dict, **about) -> dict:
        """`pipe`'s test-split metrics at `sampling`, sampled from seed `stream`: a test cell, or a snapshot's FD."""
        return {"codebook_size": vocab, "method": method, **about, "sampling": {**pipe.sampling_defaults, **sampling},
                "per_class": per_class, "reference": "fashion-mnist-test",
                "metrics": _sample_and_score(pipe, per_class, stream, s.batch_size, sampling, "test")}

    chosen = {}
    if cited is not None:  # the reference's baseline at the setting the reference's study chose, checked first
        reference = holders["baseline"]
        chosen["baseline"] = cited.cited("select-baseline", _select_inputs(s, fingerprints("baseline")),
                                         f"study {reference.root} with the same settings first (ctfgen study "
                                         f"{reference.root} --records {cited.dir.parent})")["chosen"]

    def tokenizer_record():
        data = run.image_dataset("test")
        if s.tokenizer_images is not None and s.tokenizer_images < len(data):
            data = Subset(data, range(int(s.tokenizer_images)))
        return {"codebook_size": vocab, "num_coarse": ctf.coarse_map.num_coarse,
                **evaluate_tokenizer(ctf.tokenizer, data)}

    once("tokenizer", {"tokenizer_images": s.tokenizer_images,
                       "models": {"tokenizer": directory_fingerprint(run.tokenizer)}}, tokenizer_record)

    x_coarse, y_coarse = test.get_batch(list(range(min(len(test), s.coarse_images))))
    steps = set.intersection(*(set(holders[m].snapshot_steps(st)) for m in pipes for st in STAGES_OF[m]))
    epochs = {step: step / run.steps_per_epoch("ar") for step in sorted(steps)}
    for step, epoch in epochs.items():
        def epoch_record():
            snaps = {m: holders[m].snapshot_pipeline(m, step) for m in dict.fromkeys((*run.methods, "baseline"))}
            return {"codebook_size": vocab, "step": step, "epoch": round(epoch, 3),
                    "heldout": {m: heldout_bits_per_token(snaps[m], test, s.heldout_images) for m in run.methods},
                    "coarse_prediction": coarse_prediction(snaps["ctf"].ar, snaps["baseline"].gpt, ctf.coarse_map,
                                                           x_coarse, y_coarse)}

        once(f"epoch-{epoch:.2f}", {"heldout_images": s.heldout_images, "coarse_images": s.coarse_images,
                                    "models": fingerprints(*pipes, step=step)}, epoch_record)

    val = run.images("val")[0]
    for method in run.methods:
        pipe = pipes[method]

        def select_record():
            rows = [{"sampling": g, **_sample_and_score(pipe, s.select_per_class, s.select_seed, s.batch_size, g, val)}
                    for g in ({"cfg_scale": g, "temperature": t} for g in s.guidance for t in s.temperatures)]
            best = min(rows, key=lambda r: r["fd"])["sampling"]
            axes = {"cfg_scale": s.guidance, "temperature": s.temperatures}  # at an edge, the best may lie beyond
            return {"codebook_size": vocab, "reference": f"validation split ({len(val)} training images held out)",
                    "per_class": s.select_per_class, "seed": s.select_seed, "grid": rows, "chosen": best,
                    "chosen_by": "fd", "kid_would_choose": min(rows, key=lambda r: r["kid"])["sampling"],
                    "at_edge": [k for k, v in axes.items() if len(v) > 1 and best[k] in (min(v), max(v))]}

        selection = once(f"select-{method}", _select_inputs(s, fingerprints(method)), select_record)
        if selection["at_edge"]:
            logger.info(f"{run.name}: {method}'s chosen {selection['chosen']} is at the edge of the grid in "
                        f"{', '.join(selection['at_edge'])}: the best setting may lie beyond it")
        chosen[method] = selection["chosen"]
        for setting, sampling in (("chosen", chosen[method]), ("default", {})):
            for seed in s.seeds:
                once(f"test-{method}-{setting}-seed{seed}",
                     {"sampling": {**pipe.sampling_defaults, **sampling}, "per_class": s.test_per_class, "seed": seed,
                      "batch_size": s.batch_size, "models": fingerprints(method)},
                     lambda: scored(pipe, method, s.test_per_class, seed, sampling, setting=setting, seed=seed))

    # Fréchet distance against epoch: each snapshot at its method's chosen setting, on the epoch stream.
    for step, epoch in epochs.items():
        for method in run.methods:
            once(_fd_record(method, epoch), {"sampling": chosen[method], "per_class": s.epoch_per_class,
                                             "seed": s.epoch_seed, "batch_size": s.batch_size,
                                             "models": fingerprints(method, step=step)},
                 lambda: scored(holders[method].snapshot_pipeline(method, step), method, s.epoch_per_class,
                                s.epoch_seed, chosen[method], step=step, epoch=round(epoch, 3)))

    sampling = {m: chosen[m] for m in ("ctf", "baseline")}

    def diagnosis_record():
        train_codes = run.code_dataset("train")
        reps = most_frequent_members(ctf.coarse_map, train_codes.get_batch(list(range(len(train_codes))))[0])
        images, labels = run.images("test")
        if not np.array_equal(labels, np.asarray(test.labels)):
            raise RunError(f"{run.codes('test')} does not hold the test images in the order the dataset gives them; "
                           "extract the codes again (ctfgen pipeline --resume after deleting the codes)")
        source, reference = split_halves(labels, s.diagnosis_per_class)
        x, y = test.get_batch(source.tolist())
        sets: dict[str, list] = {}  # name -> [(images, labels) of each batch]
        for name, batch, batch_labels in stagewise_sets(ctf, pipes["baseline"], x, y, reps, batch_size=s.batch_size,
                                                        seed=s.diagnosis_seed, ctf_sampling=chosen["ctf"],
                                                        baseline_sampling=chosen["baseline"]):
            sets.setdefault(name, []).append((to_uint8(batch), batch_labels.numpy()))
        ref = images[reference]
        return {"codebook_size": vocab, "images": int(len(x)), "reference_images": int(len(ref)), "sampling": sampling,
                "source": f"the first {s.diagnosis_per_class} test images of each class (their codes, and their "
                          "classes for the sampled sets)",
                "reference": "the other test images, which no set was made from",
                "representatives": "most frequent member of each cluster in the training codes",
                "sets": {name: evaluate_fmnist(*(np.concatenate(a) for a in zip(*batches)), ref=ref)
                         for name, batches in sets.items()}}

    once("diagnosis", {"per_class": s.diagnosis_per_class, "seed": s.diagnosis_seed, "batch_size": s.batch_size,
                       "sampling": sampling, "models": fingerprints("ctf", "baseline")}, diagnosis_record)
    return out


# --- the report -------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> str:
    spread = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{np.mean(values):.2f}{spread}"


def _number(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _fd_record(method: str, epoch: float) -> str:
    """The name of the record of `method`'s Fréchet distance at `epoch`'s snapshot."""
    return f"fd-{method}-epoch-{epoch:.2f}"


def _fd_by_step(recs: dict) -> dict:
    """The FD-against-epoch records by (method, step). Never by the name made from an epoch record's
    `epoch`: that is rounded to 3 places, the name was made from the unrounded epoch, and the two can
    print differently at 2 (step 1430 at 859 steps an epoch: 1.66473 names fd-*-epoch-1.66, 1.665 prints 1.67)."""
    return {(v["method"], v["step"]): v for k, v in recs.items() if k.startswith("fd-")}


def _epochs(recs: dict) -> list[dict]:
    return sorted((v for k, v in recs.items() if k.startswith("epoch-")), key=lambda v: v["step"])


def _check_one_cell(run_records: Path, tests: dict[str, dict]) -> None:
    """Refuse seeds of one table cell made from other inputs than each other: a seed the study no longer
    runs keeps its record (of older models, another setting or sample count), and its mean would mix them."""
    def apart(record: dict) -> dict:
        return {k: v for k, v in (record.get("inputs") or {}).items() if k != "seed"}

    (first, then), *others = tests.items()
    for name, record in others:
        if changed := diff_lines(apart(then), apart(record), "inputs."):
            raise RunError(f"{run_records / first}.json and {name}.json beside it, seeds of one cell, were made "
                           f"from other inputs ({'; '.join(changed)}): delete the records of seeds the study no "
                           "longer runs, or compute them again with the others' settings (ctfgen study --seeds ... "
                           "--force)")


def _fd_line(label: str, cells: list[tuple]) -> tuple:
    """Mean and spread of the Fréchet distance of (codebook size, FDs of the seeds, bits) cells, by size."""
    cells = sorted(cells, key=lambda c: c[0])
    return (label, [c[0] for c in cells], [np.mean(c[1]) for c in cells],
            [np.std(c[1], ddof=1) if len(c[1]) > 1 else 0 for c in cells])


def _bits_line(label: str, cells: list[tuple]) -> tuple:
    cells = sorted((c for c in cells if c[2] is not None), key=lambda c: c[0])
    return label, [c[0] for c in cells], [c[2] for c in cells]


def write_report(records_dir, figure_dir=None) -> str:
    """Markdown tables of every study record under `records_dir`, and figures of Fréchet distance and
    bits/token against codebook size and against epoch (PNG files in `figure_dir`). A run that took
    another's baselines (the auxiliary model at 1x) is labelled with its auxiliary model's depth, sits
    beside the run at its codebook size, takes the baselines' numbers from that run, and is drawn as
    separate markers, not as another size. Returns the markdown."""
    root = Path(records_dir)
    runs = {d.name: {p.stem: Records(d).read(p.stem) for p in sorted(d.glob("*.json"))}
            for d in sorted(root.iterdir()) if d.is_dir()} if root.is_dir() else {}
    if not runs:
        raise RunError(f"no study records under {records_dir}: run `ctfgen study RUN... --records {records_dir}`")
    rows, lent, edges, diag, gaps = [], [], [], [], []
    by_size, apart = {m: [] for m in METHODS}, {m: [] for m in METHODS}  # chosen cells: (name, (size, FDs, bits))
    fd_lines, bits_lines, gap_lines = [], [], []
    # a run with another's baselines right after the run of its size
    for r in sorted(runs, key=lambda r: (runs[r].get("tokenizer", {}).get("codebook_size", 0),
                                         "baselines-from" in runs[r])):
        recs, tok, b = runs[r], runs[r].get("tokenizer", {}), runs[r].get("baselines-from")
        size = tok.get("codebook_size", r)
        name = size if b is None else f"{size}, aux {b['aux_layers'] / b['stage1_layers']:g}x"
        lender = runs.get(b["run"], {}) if b else {}
        nan = float("nan")
        codes = [tok.get("num_coarse", ""), f"{tok.get('usage', nan):.1%}", f"{tok.get('perplexity', nan):.0f}",
                 f"{tok.get('psnr', nan):.2f}"]
        if b:
            lent.append(f"- {name} (run {r}): CTF with an auxiliary model of {b['aux_layers']} layers against stage "
                        f"1's {b['stage1_layers']}; it trained no baselines: its baselines are the rows of run "
                        f"{b['run']}, with which it shares the tokenizer, the coarse map and the test and validation "
                        "codes (checked by fingerprint).")
        epochs = _epochs(recs)
        last = epochs[-1]["heldout"] if epochs else {}
        for method in METHODS:
            selection = recs.get(f"select-{method}", {})
            if selection.get("at_edge"):
                edges.append(f"- V = {name}, {method}: the chosen {selection['chosen']} is at the edge of the grid in "
                             f"{', '.join(selection['at_edge'])}.")
            for setting in ("chosen", "default"):
                tests = {k: v for k, v in recs.items() if k.startswith(f"test-{method}-{setting}-seed")}
                if not tests:
                    continue
                _check_one_cell(root / r, tests)
                tests = list(tests.values())
                cells = [t["metrics"] for t in tests]
                bits = last.get(method, {}).get("bits_per_token")
                kid = _mean_std([100 * c["kid"] for c in cells]) if all("kid" in c for c in cells) else "–"
                g = tests[0]["sampling"]
                rows.append([name, *codes, method, f"{setting} (g {g['cfg_scale']}, T {g['temperature']})",
                             _mean_std([c["fd"] for c in cells]), kid,
                             *(_mean_std([c[m] for c in cells]) for m in ("precision", "recall", "class_consistency")),
                             _number(bits, ".3f")])
                if setting == "chosen":  # a run with another's baselines is no point of the size series
                    (apart if b else by_size)[method].append((name, (size, [c["fd"] for c in cells], bits)))
        if "diagnosis" in recs:
            diag.append((name, recs["diagnosis"]["sets"]))
        # the numbers of baselines it took from another run: that run's records of the same step
        lent_heldout, own_fd = {e["step"]: e["heldout"] for e in _epochs(lender)}, _fd_by_step(recs)
        seen_fd = {**_fd_by_step(lender), **own_fd}
        for e in epochs:
            heldout, cp = {**lent_heldout.get(e["step"], {}), **e["heldout"]}, e["coarse_prediction"]
            stage1, summed = cp["stage1"], cp["baseline_cluster_summed"]
            fds = [seen_fd.get((m, e["step"])) for m in METHODS]
            gaps.append([name, f"{e['epoch']:.2f}",
                         *(_number(heldout.get(m, {}).get("bits_per_token"), ".3f") for m in ("ctf", "baseline")),
                         " / ".join(_number(fd and fd["metrics"]["fd"], ".2f") for fd in fds),
                         f"{stage1['bits_per_token']:.3f}", f"{summed['bits_per_token']:.3f}", f"{cp['gap_bits']:+.3f}",
                         f"{stage1['top1']:.3f} / {summed['top1']:.3f}"])
        if epochs:  # the figures draw each run's own records only
            x = [e["epoch"] for e in epochs]
            fd_lines += [(f"{m} V={name}", x, [own_fd[m, e["step"]]["metrics"]["fd"] for e in epochs])
                         for m in METHODS if all((m, e["step"]) in own_fd for e in epochs)]
            bits_lines += [(f"{m} V={name}", x, [e["heldout"][m]["bits_per_token"] for e in epochs])
                           for m in METHODS if m in epochs[0]["heldout"]]
            gap_lines.append((f"V={name}", x, [e["coarse_prediction"]["gap_bits"] for e in epochs]))

    md = ["## Test-split metrics per codebook size", "",
          markdown(["codebook", "K", "codes used (test)", "code perplexity", "PSNR dB", "method", "setting", "FD ↓",
                    "KID×100 ↓", "Prec ↑", "Rec ↑", "Class acc ↑", "bits/token ↓"], rows)]
    if lent:
        md += ["Runs compared with another run's baselines:", "", *lent, ""]
    if edges:
        md += ["Sampling choices at the edge of the validation grid (a better setting may lie beyond):", "", *edges, ""]
    if diag:
        names = list(diag[0][1])
        md += ["## Stage-wise diagnosis (Fréchet distance against the test images no set was made from)", "",
               markdown(["codebook", *names], [[label, *(f"{sets[n]['fd']:.2f}" for n in names)]
                                               for label, sets in diag])]
    if gaps:
        md += ["## Against epoch: held-out bits/token and teacher-forced coarse prediction", "",
               markdown(["codebook", "epoch", "CTF bits/token", "baseline bits/token",
                         "FD ↓ " + " / ".join(METHODS), "stage-1 coarse bits",
                         "baseline cluster-summed coarse bits", "gap", "top-1 stage 1 / baseline"], gaps)]

    if figure_dir is not None:
        def panel(title: str, line) -> dict:
            return {"title": title, "xlabel": "codebook size", "log2_x": True,
                    "lines": [line(m, [cell for _, cell in cells]) for m, cells in by_size.items() if cells],
                    "points": [line(f"{m} V={name}", [cell]) for m in METHODS for name, cell in apart[m]]}

        plot_panels([panel("Fréchet distance (test) ↓", _fd_line), panel("held-out bits/token ↓", _bits_line)],
                    Path(figure_dir) / "study_vs_codebook.png")
        plot_panels([{"title": "Fréchet distance (test) ↓", "xlabel": "epoch", "lines": fd_lines},
                     {"title": "held-out bits/token ↓", "xlabel": "epoch", "lines": bits_lines},
                     {"title": "coarse bits: stage 1 − baseline summed", "xlabel": "epoch", "lines": gap_lines}],
                    Path(figure_dir) / "study_vs_epoch.png")
    return "\n".join(md)
