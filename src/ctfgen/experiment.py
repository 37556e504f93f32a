"""`ctfgen pipeline CONFIG --out DIR`: a whole experiment, from images to trained CTF and baseline.

Steps, in order (each leaves `DIR/steps/<step>.json` when finished, so `--resume` skips it; an
interrupted training step continues from its last checkpoint, and every file a step publishes
appears atomically, so a SIGKILL at any moment never leaves a half-written result behind):

    tokenizer   train a VQ tokenizer (or take `tokenizer.pretrained`)   DIR/runs/tokenizer/
    cluster     fit the CoarseMap on its codebook                       DIR/runs/coarse_map.safetensors
    extract     tokenize the train split (and the val and test splits)  DIR/codes/{train,val,test}/
    ar          CTF stage 1: GPT over coarse labels                     DIR/runs/ar/
    baseline    the vanilla GPT over fine tokens (stage 1's size)       DIR/runs/baseline/
    aux         CTF stage 2: the auxiliary fine-token model             DIR/runs/aux/
    matched     the baseline made as large as CTF (`matched.enabled`)   DIR/runs/matched/
    assemble    the finished pipelines                                  DIR/ctf/, DIR/baseline/, DIR/matched/
    heldout     exact held-out bits per token of both                   DIR/heldout.json

`DIR` itself is also a loadable CTF pipeline (`CTFPipeline.from_pretrained(DIR)`). The layout is
`ctfgen.rundir.RunDir`; the config is `ctfgen.config.ExperimentConfig`. Under torchrun every rank
runs this; training and extraction are sharded, rank 0 alone writes, and the others wait at
barriers around the rank-0-only steps.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from ctfgen.config import ExperimentConfig, apply_overrides, check_experiment, dry_run_overrides, dump, read_yaml, to_dict
from ctfgen.errors import RunError
from ctfgen.fingerprint import code_commit
from ctfgen.fileio import atomic_write_json, atomic_write_text, publish_dir
from ctfgen.rundir import RunDir
from ctfgen.train import distributed as D

STEPS = ("tokenizer", "cluster", "extract", "ar", "baseline", "aux", "matched", "assemble", "heldout")

# The config sections each step depends on: a finished step whose sections changed is refused on
# --resume instead of being silently kept.
STEP_SECTIONS = {
    "tokenizer": ("seed", "data", "tokenizer"), "cluster": ("seed", "clustering"), "extract": ("data",),
    "ar": ("seed", "train", "stage1"), "aux": ("seed", "train", "aux"),
    "baseline": ("seed", "train", "stage1", "baseline"),
    "matched": ("seed", "train", "stage1", "aux", "baseline", "matched"), "assemble": (), "heldout": ("heldout",),
}


def say(msg: str) -> None:
    if D.is_main():
        print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def sections(cfg: ExperimentConfig, step: str) -> dict:
    d = to_dict(cfg)
    return json.loads(json.dumps({k: d[k] for k in STEP_SECTIONS[step]}, default=str))


class Experiment:
    """A run directory being filled: its config, its layout and which steps are finished."""

    def __init__(self, cfg: ExperimentConfig, out_dir, resume: bool = False, raw: dict | None = None,
                 on_epoch_end: dict[str, Callable] | None = None, progress: bool = True):
        self.cfg, self.run, self.resume = cfg, RunDir(out_dir), resume
        self.raw = raw if raw is not None else to_dict(cfg)
        self.hooks, self.progress = on_epoch_end or {}, progress
        self.device = D.init_distributed()

    def done(self, step: str) -> dict | None:
        p = self.run.marker(step)
        return json.loads(p.read_text()) if p.is_file() else None

    def once(self, step: str, work: Callable[[], dict | None]) -> None:
        """Run `work` unless `step` is finished, then record it (its info, time and config)."""
        if self.done(step) is not None:
            return
        t0 = time.time()
        info = work() or {}
        if D.is_main():
            atomic_write_json(self.run.marker(step), {
                "step": step, "config": sections(self.cfg, step), "commit": code_commit(),
                "seconds": round(time.time() - t0, 2),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info})
        D.barrier()

    def prepare(self) -> None:
        """Refuse a non-empty DIR without --resume, and on resume finished steps whose config changed."""
        error = self._check_dir() if D.is_main() else None
        error = D.broadcast_object(error)  # every rank stops, not only rank 0
        if error:
            raise RunError(error)
        if D.is_main():
            # config.yaml: everything resolved, for the record. input.yaml: what was asked for, which
            # `--resume` without a CONFIG starts from, so a top-level override still reaches every stage.
            atomic_write_text(self.run.config, dump(self.cfg))
            atomic_write_text(self.run.input_config, yaml.safe_dump(self.raw, sort_keys=False))
        D.barrier()

    def _check_dir(self) -> str | None:
        root = self.run.root
        existing = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        if existing and not self.resume:
            return (f"{root} is not empty (it holds {', '.join(existing[:6])}{' ...' if len(existing) > 6 else ''}). "
                    "Pass --resume to continue the run there, or choose another --out; nothing was changed.")
        changed = []
        for step in STEPS:
            rec = self.done(step)
            if rec is None:
                continue
            # Records are re-read through today's loader, so runs written before a setting was
            # renamed or added compare by the values they resolve to.
            then = sections(ExperimentConfig.from_raw(rec.get("config") or {}), step)
            now = sections(self.cfg, step)
            if then != now:
                changed.append(f"  {step}: " + "; ".join(_diff(then, now)))
        if changed:
            return (f"{root} was run with another config for steps that already finished:\n" + "\n".join(changed)
                    + "\nRevert those settings to continue this run, or start a new one with another --out.")
        return None


# --- the steps -----------------------------------------------------------------------------------

def step_tokenizer(x: Experiment):
    from ctfgen.tokenizer import load_tokenizer

    t = x.cfg.tokenizer
    if t.pretrained:
        x.once("tokenizer", lambda: {"path": str(t.pretrained), "fingerprint": load_tokenizer(t.pretrained).fingerprint})
        return load_tokenizer(t.pretrained).eval()

    def work():
        from ctfgen.data import make_dataset
        from ctfgen.tokenizer.train import train_tokenizer

        say("training the tokenizer")
        dataset = make_dataset(x.cfg.data, "train", channels=t.model.get("in_channels", 3))
        vq = train_tokenizer(t, dataset, x.run.tokenizer_run, resume=True, device=x.device, progress=x.progress)
        quality, test = None, make_dataset(x.cfg.data, "test", channels=vq.config.in_channels)
        if test is not None and D.is_main():  # usage and PSNR over the whole test split, not a recent window
            from ctfgen.tokenizer.codebook import evaluate_tokenizer

            quality = evaluate_tokenizer(vq, test, batch_size=int(x.cfg.data.extract_batch_size))
            say(f"tokenizer on the {quality['images']} test images: {quality['codes_used']} of "
                f"{quality['codebook_size']} codes used ({quality['usage']:.1%}), perplexity {quality['perplexity']:.0f}, "
                f"PSNR {quality['psnr']:.2f} dB")
        return {"path": str(x.run.tokenizer), "fingerprint": vq.fingerprint, "codebook_usage": vq.codebook_usage(),
                "test_split": quality}

    x.once("tokenizer", work)
    return load_tokenizer(x.run.tokenizer).eval()


def step_cluster(x: Experiment, vq):
    from ctfgen.clustering import CoarseMap

    c = x.cfg.clustering

    def work():
        with D.main_first() as first:
            if first:
                say(f"clustering {vq.config.codebook_size} codewords into {c.num_coarse} ({c.method})")
                CoarseMap.fit(vq, int(c.num_coarse), method=c.method, seed=int(c.seed)).save(x.run.coarse_map)
        cmap = CoarseMap.load(x.run.coarse_map)
        return {"fingerprint": cmap.fingerprint, **{k: v for k, v in cmap.stats().items() if k != "fingerprint"}}

    x.once("cluster", work)
    cmap = CoarseMap.load(x.run.coarse_map)
    cmap.check_codebook(vq)
    return cmap


def step_extract(x: Experiment, vq) -> None:
    from ctfgen.data import check_codes, extract_codes, make_dataset, read_header
    from ctfgen.data.factory import TENCROP_RANGE, image_size

    d = x.cfg.data
    splits = {"train": d.augment, "val": "none", "test": "none"}

    def work():
        for split, augment in splits.items():
            out = x.run.codes(split)
            dataset = make_dataset(d, split, channels=vq.config.in_channels, for_codes=True)
            if dataset is None or _valid_codes(out, vq):  # finished before the marker was written
                continue
            say(f"extracting {split} codes ({len(dataset)} images, augment={augment})")
            extract_codes(vq.to(x.device), dataset, out, augment=augment, batch_size=int(d.extract_batch_size),
                          device=x.device, num_workers=int(d.num_workers), dataset_name=f"{d.dataset}:{split}",
                          image_size=image_size(d) if d.dataset == "image_folder" else None,
                          crop_range=TENCROP_RANGE, progress=x.progress)
            vq.cpu()
        return {s: read_header(x.run.codes(s)) for s in splits if x.run.codes(s).is_dir()}

    x.once("extract", work)
    for split in splits:
        if x.run.codes(split).is_dir():
            check_codes(x.run.codes(split), vq)


def _valid_codes(out: Path, vq) -> bool:
    """Whether `out` holds codes of this tokenizer; a stale directory is removed."""
    from ctfgen.data import check_codes

    ok = True
    if out.is_dir():
        try:
            check_codes(out, vq)
        except ValueError:
            ok = False
            D.barrier()
            if D.is_main():
                shutil.rmtree(out)
    D.barrier()
    return ok and out.is_dir()


def step_train(x: Experiment, stage: str, cmap):
    from ctfgen.train.stages import load_stage_model, train_stage

    s = x.cfg.stage(stage)
    if not s.enabled:
        return None

    def work():
        model_config, info = s.model, {}
        if stage == "matched":
            model_config, info = _matched_model(x, cmap)
        say(f"training {stage} ({s.preset}{', %d layers' % model_config['n_layer'] if stage == 'matched' else ''})")
        model, result = train_stage(
            "baseline" if stage == "matched" else stage, x.run.codes("train"), x.run.stage(stage),
            coarse_map=cmap if stage in ("ar", "aux") else None, preset=s.preset, model=model_config,
            train_config={**s.train.to_dict(), "progress": x.progress and s.train.progress},
            resume=True, on_epoch_end=x.hooks.get(stage), run_config={"experiment": str(x.run.root)}, desc=stage)
        last = result.history[-1] if result.history else {}
        return {"steps": result.step, "final_loss": last.get("loss"), "params": sum(p.numel() for p in model.parameters()),
                **info}

    x.once(stage, work)
    return load_stage_model(stage, x.run.model(stage))


def card_inputs(x: Experiment, kind: str, heldout: dict | None = None) -> dict:
    """What a pipeline's model card records (ctfgen.hub.write_model_card): the resolved config and
    the metrics the run's steps recorded (tokenizer quality, each model's training, held-out bits)."""
    metrics = {}
    tok = (x.done("tokenizer") or {}).get("test_split")
    if tok:
        metrics["tokenizer"] = {k: tok[k] for k in ("usage", "perplexity", "psnr") if k in tok}
    for stage in (("ar", "aux") if kind == "ctf" else (kind,)):  # baseline, matched
        rec = x.done(stage) or {}
        metrics[stage] = {k: rec[k] for k in ("steps", "final_loss", "params", "seconds") if rec.get(k) is not None}
    if heldout:
        metrics["heldout"] = {k: heldout[k] for k in ("bits_per_token", "nats_per_image", "exact") if k in heldout}
    return {"training_config": to_dict(x.cfg), "metrics": {k: v for k, v in metrics.items() if v}}

def _matched_model(x: Experiment, cmap) -> tuple[dict, dict]:
    """The matched baseline's model settings: the baseline's, with the depth that gives CTF's
    parameter count (or the depth the config fixes), and the counts for the record."""
    from ctfgen.train.stages import matched_depth

    c = x.cfg
    match = matched_depth(x.run.codes("train"), cmap, (c.stage1.preset, c.stage1.model), (c.aux.preset, c.aux.model),
                          (c.matched.preset, c.matched.model))
    fixed = ((x.raw.get("matched") or {}).get("model") or {}).get("n_layer")
    if fixed is not None:
        from ctfgen.train.stages import parameter_count

        params = parameter_count("baseline", x.run.codes("train"), None, c.matched.preset, {**c.matched.model})
        match = {**match, "n_layer": int(fixed), "params": params, "ratio": round(params / match["ctf_params"], 4)}
    say(f"matched baseline: {match['n_layer']} layers, {match['params']:,} parameters, "
        f"{match['ratio']:.3f}x CTF's {match['ctf_params']:,}")
    return {**c.matched.model, "n_layer": match["n_layer"]}, {"match": match}


def step_assemble(x: Experiment, vq, cmap, ar, aux, base, matched=None) -> None:
    from ctfgen.pipeline import ARPipeline, CTFPipeline

    def work():
        with D.main_first() as first:
            if first:
                sampling = x.cfg.sampling
                if ar is not None:
                    say(f"assembling {x.run.ctf}")
                    ctf = CTFPipeline(ar, aux, cmap, vq, sampling_defaults=sampling.ctf)
                    publish_dir(lambda d: ctf.save_pretrained(d, **card_inputs(x, "ctf")), x.run.ctf)
                if base is not None:
                    say(f"assembling {x.run.baseline}")
                    baseline = ARPipeline(base, vq, sampling_defaults=sampling.baseline)
                    publish_dir(lambda d: baseline.save_pretrained(d, **card_inputs(x, "baseline")), x.run.baseline)
                if matched is not None:
                    say(f"assembling {x.run.matched}")
                    matched_pipe = ARPipeline(matched, vq, sampling_defaults=sampling.baseline)
                    publish_dir(lambda d: matched_pipe.save_pretrained(d, **card_inputs(x, "matched")), x.run.matched)
                _link_top_level(x.run.root, "ctf" if ar is not None else "baseline")
                _write_metrics(x.run)

    x.once("assemble", work)


def step_heldout(x: Experiment) -> None:
    from ctfgen.hub import write_model_card
    from ctfgen.pipeline import ARPipeline, CTFPipeline, heldout_bits_per_token

    h = x.cfg.heldout
    if not h.enabled or not x.run.codes("test").is_dir():
        return

    def work():
        pipes = {"ctf": CTFPipeline.from_pretrained(x.run.ctf)} if x.cfg.ctf_enabled else {}
        if x.cfg.baseline.enabled:
            pipes["baseline"] = ARPipeline.from_pretrained(x.run.baseline)
        if x.cfg.matched.enabled:
            pipes["matched"] = ARPipeline.from_pretrained(x.run.matched)
        results = {}
        for name, pipe in pipes.items():
            r = heldout_bits_per_token(pipe.to(x.device), x.run.codes("test"), h.limit, int(h.batch_size))
            results[name] = {k: r[k] for k in ("nats_per_image", "bits_per_token", "exact")}
        results.update(images=r["images"], image_tokens=r["image_tokens"])
        if D.is_main():
            atomic_write_json(x.run.heldout, results)
            line = ", ".join(f"{k} {v['bits_per_token']:.4f}" for k, v in results.items() if isinstance(v, dict))
            say(f"held-out bits per token on {results['images']} test images: {line}")
            for name in pipes:  # the model cards gain the held-out numbers
                write_model_card(getattr(x.run, name), **card_inputs(x, name, results[name]))
        return results

    x.once("heldout", work)


def _write_metrics(run: RunDir) -> None:
    """RUN/metrics.csv: every training log in one table, with the stage it came from."""
    rows, columns = [], ["stage"]
    tok_log = run.tokenizer_run / "metrics.csv"
    if not tok_log.is_file():
        tok_log = run.tokenizer_run / "log.csv"  # runs made before the one training loop
    for stage, path in [("tokenizer", tok_log)] + [(s, run.stage(s) / "metrics.csv") for s in ("ar", "aux", "baseline", "matched")]:
        if path.is_file():
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    rows.append({"stage": stage, **r})
                    columns += [k for k in r if k not in columns]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(run.metrics, out.getvalue())


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} then, {b!r} now")
    return out


def next_steps(root, ctf: bool = True, baseline: bool = True) -> list[str]:
    """Commands that work on a finished run, as the pipeline prints them at its end."""
    import shlex

    run = RunDir(root)
    model = run.ctf if ctf else run.baseline
    out = shlex.quote(str(run / "samples.png"))
    sample = f"ctfgen sample --model {shlex.quote(str(model))} --class 0 --n 16 --out {out}"
    lines = [sample + (" --compare-baseline --stages" if ctf and baseline else " --stages" if ctf else "")]
    if ctf:
        lines.append(f"ctfgen demo --model {shlex.quote(str(model))}")
    lines.append(f"in Python: ctfgen.load_pipeline({json.dumps(str(model))})")
    return lines


def _link_top_level(root: Path, sub: str) -> None:
    """Make `root` itself a loadable pipeline: pipeline.json copied, parts linked (relative links,
    so the directory can be moved; copies where the filesystem has no symlinks)."""
    for entry in (root / sub).iterdir():
        target = root / entry.name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        if entry.name == "pipeline.json":
            shutil.copyfile(entry, target)
            continue
        try:
            os.symlink(Path(sub) / entry.name, target, target_is_directory=entry.is_dir())
        except OSError:
            (shutil.copytree if entry.is_dir() else shutil.copyfile)(entry, target)


# --- the driver ----------------------------------------------------------------------------------

def load_experiment_config(config, out_dir=None, resume: bool = False, overrides=None,
                           dry_run: bool = False) -> tuple[ExperimentConfig, dict]:
    """(resolved config, what was asked for) from a YAML path or a dict; None (with resume) takes
    the run's own input.yaml. `dry_run` shrinks it to two steps of everything (see config.py)."""
    if config is None:
        config = RunDir(out_dir).input_config if out_dir is not None else None
        if not (resume and config is not None and config.is_file()):
            raise RunError(f"no config given and no {config} to resume from; pass a CONFIG")
    raw = apply_overrides(config if isinstance(config, dict) else read_yaml(config),
                          (dry_run_overrides() if dry_run else []) + list(overrides or []))
    cfg = ExperimentConfig.from_raw(raw)
    check_experiment(cfg)
    return cfg, raw


def run_experiment(config, out_dir, resume: bool = False, overrides: list[str] | None = None,
                   on_epoch_end: dict[str, Callable] | None = None, progress: bool = True,
                   dry_run: bool = False) -> Path:
    """Python entry point of `ctfgen pipeline`. `on_epoch_end` maps a stage ("ar", "aux",
    "baseline") to a hook(epoch, model) run after each of its epochs."""
    cfg, raw = load_experiment_config(config, out_dir, resume, overrides, dry_run)
    x = Experiment(cfg, out_dir, resume=resume, raw=raw, on_epoch_end=on_epoch_end, progress=progress)
    t_all = time.time()
    x.prepare()
    vq = step_tokenizer(x)
    cmap = step_cluster(x, vq)
    step_extract(x, vq)
    # The baseline before the auxiliary model: stage 1 and the baseline are the like-for-like pair, and
    # the auxiliary model (the largest) is the step most worth resuming in a later session.
    ar, base, aux = step_train(x, "ar", cmap), step_train(x, "baseline", None), step_train(x, "aux", cmap)
    matched = step_train(x, "matched", cmap)
    step_assemble(x, vq, cmap, ar, aux, base, matched)
    step_heldout(x)
    if D.is_main():
        atomic_write_json(x.run.summary, {"seconds_this_run": round(time.time() - t_all, 2), "world_size": D.get_world_size(),
                                          "step_seconds": {s: (x.done(s) or {}).get("seconds") for s in STEPS}})
        say(f"done in {time.time() - t_all:.1f}s. Next:\n" + "\n".join(
            "  " + line for line in next_steps(x.run.root, ctf=ar is not None, baseline=base is not None)))
    D.barrier()
    return x.run.root
