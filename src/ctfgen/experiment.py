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
    assemble    the finished pipelines                                  DIR/ctf/, DIR/baseline/
    heldout     exact held-out bits per token of both                   DIR/heldout.json

`DIR` itself is also a loadable CTF pipeline (`CTFPipeline.from_pretrained(DIR)`): its top level
holds `pipeline.json` and links to the parts in `DIR/ctf/`. `DIR/config.yaml` is the resolved
config and `DIR/metrics.csv` gathers every training stage's log (with a `stage` column).

Configs are YAML files (see configs/*.yaml and `DEFAULTS`); `key.sub=value` overrides are parsed
as YAML values (`train.steps=10`, `stage1.preset=GPT-mini`, `data.train_limit=null`).
Under torchrun every rank runs this; training and extraction are sharded, rank 0 alone writes,
and the others wait at barriers around the rank-0-only steps.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ctfgen.fileio import atomic_write_text
from ctfgen.train import distributed as D

INPUT_CONFIG = "input.yaml"
STEPS = ("tokenizer", "cluster", "extract", "ar", "baseline", "aux", "assemble", "heldout")

DEFAULTS: dict[str, Any] = {
    "name": None,
    "seed": 0,
    "data": {
        "dataset": "fashion_mnist",   # fashion_mnist | image_folder
        "root": None,                 # Fashion-MNIST IDX directory, or the train image folder
        "test_root": None,            # image_folder: held-out images (class-per-folder)
        "image_size": None,           # image_folder: crop size (default 256); fashion_mnist: 28
        "channels": None,             # image_folder: 1 or 3 (default 3)
        "train_limit": None,          # class-balanced subset sizes (fashion_mnist)
        "test_limit": None,
        "validation_images": 0,       # fashion_mnist: class-balanced training images held out as DIR/codes/val
        "augment": "none",            # none | flip | tencrop, for the train codes
        "extract_batch_size": 256,
        "num_workers": 0,
    },
    "tokenizer": {
        "pretrained": None,           # a VQModel directory to use instead of training one
        "model": {},                  # VQConfig fields
        "train": {},                  # ctfgen.tokenizer.train.DEFAULT_TRAIN keys
    },
    "clustering": {"num_coarse": 512, "method": "kmeans", "seed": None},
    "train": {},                      # TrainConfig defaults shared by ar, aux and baseline
    "stage1": {"preset": "GPT-B", "model": {}, "train": {}},
    "aux": {"preset": "Aux-B", "model": {}, "train": {}},
    # The baseline is stage 1's size, steps and seed unless given here (paper: same stage-1 size).
    "baseline": {"enabled": True, "preset": None, "model": None, "train": None},
    "heldout": {"enabled": True, "limit": None, "batch_size": 64},
}

# Which parts of the config each step depends on: a finished step whose parts changed is refused
# on --resume instead of being silently kept.
STEP_SECTIONS = {
    "tokenizer": ("seed", "data", "tokenizer"),
    "cluster": ("seed", "clustering"),
    "extract": ("data",),
    "ar": ("seed", "train", "stage1"),
    "aux": ("seed", "train", "aux"),
    "baseline": ("seed", "train", "stage1", "baseline"),
    "assemble": (),
    "heldout": ("heldout",),
}


class ExperimentError(RuntimeError):
    """The experiment cannot start or continue as asked; the message says why and what to do."""


# --- config ------------------------------------------------------------------------------------

def _merge(base: dict, new: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        where = f"{path}{k}"
        if k not in out and not _free_form(path):
            raise ExperimentError(f"unknown config key {where!r}; known at this level: {', '.join(sorted(out))}")
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not _free_form(where + "."):
            out[k] = _merge(out[k], v, where + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def _free_form(path: str) -> bool:
    # model/train sub-dicts are checked by their own dataclasses, which list the valid fields.
    return path.endswith(("model.", "train.")) or path == "train."


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ExperimentError(f"override {text!r} is not key.sub=value (e.g. train.steps=100)")
    key, value = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ExperimentError(f"override {text!r} has an empty key")
    return keys, parse_value(value)


def parse_value(text: str) -> Any:
    """A YAML scalar, except that exponent floats like 3e-4 (strings to YAML 1.1) are floats."""
    if not text.strip():
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") and value.strip() not in ("e", ".") else value
        except ValueError:
            return value
    return value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for text in overrides or []:
        keys, value = parse_override(text)
        node = cfg
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ExperimentError(f"override {text!r}: {'.'.join(keys[:i + 1])} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return cfg


def resolve_config(raw: dict | None, overrides: list[str] | None = None) -> dict:
    """Defaults <- YAML <- overrides, validated, with every inherited value filled in."""
    cfg = _merge(DEFAULTS, apply_overrides(raw or {}, overrides or []))
    seed = int(cfg["seed"])
    if cfg["clustering"]["seed"] is None:
        cfg["clustering"]["seed"] = seed
    cfg["tokenizer"]["train"] = {"seed": seed, **(cfg["tokenizer"]["train"] or {})}
    base = cfg["baseline"]
    s1 = cfg["stage1"]
    for k in ("preset", "model", "train"):
        if base.get(k) is None:
            base[k] = copy.deepcopy(s1.get(k))
    for section in ("stage1", "aux", "baseline"):
        st = cfg[section]
        st["model"] = dict(st.get("model") or {})
        st["train"] = {"seed": seed, **(cfg["train"] or {}), **(st.get("train") or {})}
        # Validate now, not an hour into the run.
        from ctfgen.train.loop import TrainConfig

        try:
            TrainConfig.from_dict(st["train"])
        except (ValueError, TypeError) as e:
            raise ExperimentError(f"{section}.train: {e}") from e
    if cfg["data"]["dataset"] not in ("fashion_mnist", "image_folder"):
        raise ExperimentError(f"data.dataset must be fashion_mnist or image_folder, got {cfg['data']['dataset']!r}")
    if cfg["clustering"]["method"] not in ("kmeans", "random"):
        raise ExperimentError(f"clustering.method must be kmeans or random, got {cfg['clustering']['method']!r}")
    return cfg


def load_raw_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """The YAML file with the overrides applied, before defaults and inheritance."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"config file {path} not found (see configs/*.yaml)")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path} must hold a YAML mapping at the top level")
    return apply_overrides(raw, overrides or [])


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    return resolve_config(load_raw_config(path, overrides))


# --- small file helpers --------------------------------------------------------------------------

def _say(msg: str) -> None:
    if D.is_main():
        print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


class Experiment:
    """One experiment directory. `run()` performs whatever steps are not finished yet."""

    def __init__(self, config: dict, out_dir: str | os.PathLike, resume: bool = False,
                 on_epoch_end: dict[str, Callable] | None = None, progress: bool = True,
                 raw_config: dict | None = None):
        self.cfg = config
        self.raw = raw_config if raw_config is not None else config
        self.dir = Path(out_dir)
        self.resume = resume
        self.hooks = on_epoch_end or {}
        self.progress = progress
        self.device = D.init_distributed()
        self.times: dict[str, float] = {}

    # paths
    @property
    def steps_dir(self) -> Path:
        return self.dir / "steps"

    def marker(self, step: str) -> Path:
        return self.steps_dir / f"{step}.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "runs" / "tokenizer"

    @property
    def coarse_map_path(self) -> Path:
        return self.dir / "runs" / "coarse_map.safetensors"

    def codes_dir(self, split: str) -> Path:
        return self.dir / "codes" / split

    def stage_dir(self, stage: str) -> Path:
        return self.dir / "runs" / stage

    # --- bookkeeping -------------------------------------------------------------------------

    def _sections(self, step: str) -> dict:
        return {k: self.cfg[k] for k in STEP_SECTIONS[step]}

    def done(self, step: str) -> dict | None:
        p = self.marker(step)
        if not p.is_file():
            return None
        return json.loads(p.read_text())

    def mark(self, step: str, **info) -> None:
        if D.is_main():
            record = {"step": step, "config": self._sections(step), "seconds": round(self.times.get(step, 0.0), 2),
                      "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
            atomic_write_text(self.marker(step), json.dumps(record, indent=2, default=str) + "\n")
        D.barrier()

    def prepare(self) -> None:
        """Refuse a non-empty DIR without --resume; on resume refuse changed finished steps."""
        error = None
        if D.is_main():
            error = self._check_dir()
            if error is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                # config.yaml: everything resolved, for the record. input.yaml: what was asked for
                # (file + overrides), which `--resume` without a CONFIG starts from, so that a
                # top-level override such as train.steps=N still reaches every stage.
                atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(self.cfg, sort_keys=False))
                atomic_write_text(self.dir / INPUT_CONFIG, yaml.safe_dump(self.raw, sort_keys=False))
        error = D.broadcast_object(error)  # every rank stops, not only rank 0
        if error:
            raise ExperimentError(error)

    def _check_dir(self) -> str | None:
        existing = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
        if existing and not self.resume:
            return (f"{self.dir} is not empty (it holds {', '.join(existing[:6])}{' ...' if len(existing) > 6 else ''}). "
                    "Pass --resume to continue the run there, or choose another --out; nothing was changed.")
        changed = []
        for step in STEPS:
            rec = self.done(step)
            if rec is None:
                continue
            now = json.loads(json.dumps(self._sections(step), default=str))
            if rec.get("config") != now:
                changed.append(f"  {step}: " + "; ".join(_diff(rec.get("config") or {}, now)))
        if changed:
            return (f"{self.dir} was run with another config for steps that already finished:\n" + "\n".join(changed)
                    + "\nRevert those settings to continue this run, or start a new one with another --out.")
        return None

    # --- steps -------------------------------------------------------------------------------

    def datasets(self, split: str, for_codes: bool = False):
        d = self.cfg["data"]
        if d["dataset"] == "fashion_mnist":
            from ctfgen.data.fashion_mnist import FashionMNIST

            if split == "val" and not d["validation_images"]:
                return None
            limit = {"train": d["train_limit"], "test": d["test_limit"]}.get(split)
            return FashionMNIST(split, root=d["root"], limit=limit, image_size=d["image_size"] or 28,
                                validation=int(d["validation_images"] or 0))
        if split == "val":
            return None
        from ctfgen.data.folder import ImageFolder

        root = d["root"] if split == "train" else d["test_root"]
        if root is None:
            return None
        size = d["image_size"] or 256
        if split == "train" and d["augment"] == "tencrop" and for_codes:
            size = int(size * 1.1)  # LlamaGen: ten crops of image_size from a centre crop 1.1x larger
        channels = d["channels"] or self.cfg["tokenizer"]["model"].get("in_channels", 3)
        return ImageFolder(root, image_size=size, channels=channels)

    def step_tokenizer(self):
        from ctfgen.tokenizer.vq import VQModel

        t = self.cfg["tokenizer"]
        if t["pretrained"]:
            if self.done("tokenizer") is None:
                vq = VQModel.from_pretrained(str(t["pretrained"]))
                self.mark("tokenizer", path=str(t["pretrained"]), fingerprint=vq.fingerprint)
            return VQModel.from_pretrained(str(t["pretrained"])).eval()
        final = self.tokenizer_dir / "tokenizer"
        if self.done("tokenizer") is None:
            from ctfgen.tokenizer.train import train_tokenizer

            _say("training the tokenizer")
            t0 = time.time()
            train_tokenizer({"model": t["model"], "train": t["train"]}, self.datasets("train"), self.tokenizer_dir,
                            resume=True, device=self.device, progress=self.progress)
            self.times["tokenizer"] = time.time() - t0
            vq = VQModel.from_pretrained(str(final))
            quality = None
            test = self.datasets("test")
            if test is not None and D.is_main():
                from ctfgen.tokenizer.codebook import evaluate_tokenizer

                quality = evaluate_tokenizer(vq, test, batch_size=int(self.cfg["data"]["extract_batch_size"]))
                _say(f"tokenizer on the {quality['images']} test images: {quality['codes_used']} of "
                     f"{quality['codebook_size']} codes used ({quality['usage']:.1%}), PSNR {quality['psnr']:.2f} dB")
            self.mark("tokenizer", path=str(final), fingerprint=vq.fingerprint, codebook_usage=vq.codebook_usage(),
                      test_split=quality)
        return VQModel.from_pretrained(str(final)).eval()

    def step_cluster(self, vq):
        from ctfgen.clustering import CoarseMap

        c = self.cfg["clustering"]
        if self.done("cluster") is None:
            t0 = time.time()
            with D.main_first() as first:
                if first:
                    _say(f"clustering {vq.config.codebook_size} codewords into {c['num_coarse']} ({c['method']})")
                    cmap = CoarseMap.fit(vq, int(c["num_coarse"]), method=c["method"], seed=int(c["seed"]))
                    cmap.save(self.coarse_map_path)
            self.times["cluster"] = time.time() - t0
            cmap = CoarseMap.load(self.coarse_map_path)
            self.mark("cluster", fingerprint=cmap.fingerprint, **{k: v for k, v in cmap.stats().items()
                                                                   if k not in ("fingerprint",)})
        cmap = CoarseMap.load(self.coarse_map_path)
        cmap.check_codebook(vq)
        return cmap

    def step_extract(self, vq):
        from ctfgen.data.codes import check_codes, read_header
        from ctfgen.data.extract import extract_codes

        d = self.cfg["data"]
        splits = {"train": d["augment"], "val": "none", "test": "none"}
        if self.done("extract") is None:
            t0 = time.time()
            for split, augment in splits.items():
                out = self.codes_dir(split)
                dataset = self.datasets(split, for_codes=True)
                if dataset is None:
                    continue
                if out.is_dir():  # finished before the marker was written
                    try:
                        check_codes(out, vq)
                        continue
                    except ValueError:
                        D.barrier()
                        if D.is_main():
                            shutil.rmtree(out)
                D.barrier()
                _say(f"extracting {split} codes ({len(dataset)} images, augment={augment})")
                extract_codes(vq.to(self.device), dataset, out, augment=augment,
                              batch_size=int(d["extract_batch_size"]), device=self.device,
                              num_workers=int(d["num_workers"]), dataset_name=f"{d['dataset']}:{split}",
                              image_size=(d["image_size"] or 256) if d["dataset"] == "image_folder" else None,
                              progress=self.progress)
                vq.cpu()
            self.times["extract"] = time.time() - t0
            self.mark("extract", **{s: read_header(self.codes_dir(s)) for s in splits if self.codes_dir(s).is_dir()})
        for split in splits:
            if self.codes_dir(split).is_dir():
                check_codes(self.codes_dir(split), vq)

    def step_train(self, stage: str, section: str, cmap):
        from ctfgen.models.transformer import GPT, AuxModel
        from ctfgen.train.stages import MODEL_DIR, train_stage

        cls = AuxModel if stage == "aux" else GPT
        out = self.stage_dir(stage)
        if self.done(stage) is None:
            s = self.cfg[section]
            _say(f"training {stage} ({s['preset']})")
            t0 = time.time()
            _, result = train_stage(
                stage, self.codes_dir("train"), out, coarse_map=cmap if stage != "baseline" else None,
                preset=s["preset"], model=s["model"], train_config={**s["train"], "progress": self.progress and s["train"].get("progress", True)},
                resume=True, on_epoch_end=self.hooks.get(stage), run_config={"experiment": str(self.dir)},
                desc=stage,
            )
            self.times[stage] = time.time() - t0
            last = result.history[-1] if result.history else {}
            self.mark(stage, steps=result.step, final_loss=last.get("loss"), params=sum(
                p.numel() for p in cls.from_pretrained(str(out / MODEL_DIR)).parameters()))
        return cls.from_pretrained(str(out / MODEL_DIR)).eval()

    def step_assemble(self, vq, cmap, ar, aux, base):
        from ctfgen.pipeline import ARPipeline, CTFPipeline

        if self.done("assemble") is not None:
            return
        t0 = time.time()
        with D.main_first() as first:
            if first:
                _say(f"assembling {self.dir / 'ctf'} and {self.dir / 'baseline'}")
                _publish_dir(lambda d: CTFPipeline(ar, aux, cmap, vq).save_pretrained(d), self.dir / "ctf")
                if base is not None:
                    _publish_dir(lambda d: ARPipeline(base, vq).save_pretrained(d), self.dir / "baseline")
                _link_top_level(self.dir, "ctf")
                self._write_metrics()
        self.times["assemble"] = time.time() - t0
        self.mark("assemble")

    def step_heldout(self, ctf_dir: Path, base_dir: Path | None):
        h = self.cfg["heldout"]
        if not h["enabled"] or not self.codes_dir("test").is_dir() or self.done("heldout") is not None:
            return
        from ctfgen.data.codes import CodeDataset
        from ctfgen.pipeline import ARPipeline, CTFPipeline, heldout_bits_per_token

        t0 = time.time()
        codes = CodeDataset(self.codes_dir("test"), augmentation=0)
        pipes = {"ctf": CTFPipeline.from_pretrained(ctf_dir)}
        if base_dir is not None:
            pipes["baseline"] = ARPipeline.from_pretrained(base_dir)
        results = {}
        for name, pipe in pipes.items():
            held = heldout_bits_per_token(pipe.to(self.device), codes, h["limit"], int(h["batch_size"]))
            n = held.pop("images")
            results[name] = held
        results["images"] = n
        results["image_tokens"] = codes.image_tokens
        if D.is_main():
            atomic_write_text(self.dir / "heldout.json", json.dumps(results, indent=2) + "\n")
            line = ", ".join(f"{k} {v['bits_per_token']:.4f}" for k, v in results.items() if isinstance(v, dict))
            _say(f"held-out bits per token on {n} test images: {line}")
        self.times["heldout"] = time.time() - t0
        self.mark("heldout", **results)

    def _write_metrics(self) -> None:
        """DIR/metrics.csv: every training log in one table, with the stage it came from."""
        rows, columns = [], ["stage"]
        sources = [("tokenizer", self.tokenizer_dir / "log.csv")] + [
            (s, self.stage_dir(s) / "metrics.csv") for s in ("ar", "aux", "baseline")]
        for stage, path in sources:
            if not path.is_file():
                continue
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    rows.append({"stage": stage, **r})
                    columns += [k for k in r if k not in columns]
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.dir / "metrics.csv", out.getvalue())

    # --- driver ------------------------------------------------------------------------------

    def run(self) -> Path:
        t_all = time.time()
        self.prepare()
        vq = self.step_tokenizer()
        cmap = self.step_cluster(vq)
        self.step_extract(vq)
        ar = self.step_train("ar", "stage1", cmap)
        # The baseline before the auxiliary model: stage 1 and the baseline are the like-for-like pair,
        # and the auxiliary model (the largest) is the step most worth resuming in a later session.
        base = self.step_train("baseline", "baseline", None) if self.cfg["baseline"]["enabled"] else None
        aux = self.step_train("aux", "aux", cmap)
        self.step_assemble(vq, cmap, ar, aux, base)
        self.step_heldout(self.dir / "ctf", self.dir / "baseline" if base is not None else None)
        if D.is_main():
            summary = {s: (self.done(s) or {}).get("seconds") for s in STEPS}
            atomic_write_text(self.dir / "summary.json", json.dumps(
                {"seconds_this_run": round(time.time() - t_all, 2), "step_seconds": summary,
                 "world_size": D.get_world_size()}, indent=2) + "\n")
            _say(f"done in {time.time() - t_all:.1f}s: CTFPipeline.from_pretrained({str(self.dir)!r}); "
                 f"baseline in {self.dir / 'baseline'}")
        D.barrier()
        return self.dir


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} then, {b!r} now")
    return out


def _publish_dir(write: Callable[[Path], Any], final: Path) -> None:
    """Write a directory under a temporary name and rename it into place (replacing a stale one)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _link_top_level(root: Path, sub: str) -> None:
    """Make `root` itself a loadable pipeline: pipeline.json copied, parts linked (relative links,
    so the directory can be moved; copies where the filesystem has no symlinks)."""
    src = root / sub
    for entry in src.iterdir():
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


def run_experiment(config: dict | str | os.PathLike | None, out_dir, resume: bool = False,
                   overrides: list[str] | None = None, on_epoch_end: dict[str, Callable] | None = None,
                   progress: bool = True) -> Path:
    """Python entry point of `ctfgen pipeline`. `config` is a YAML path or a dict of the same
    shape; None (with resume) takes the run's own DIR/input.yaml. `on_epoch_end` maps a stage
    ("ar", "aux", "baseline") to a hook(epoch, model) run after each of its epochs."""
    if config is None:
        config = Path(out_dir) / INPUT_CONFIG
        if not (resume and config.is_file()):
            raise ExperimentError(f"no config given and no {config} to resume from; pass a CONFIG")
    raw = apply_overrides(config, overrides or []) if isinstance(config, dict) else load_raw_config(config, overrides)
    cfg = resolve_config(raw)
    return Experiment(cfg, out_dir, resume=resume, on_epoch_end=on_epoch_end, progress=progress,
                      raw_config=raw).run()
