"""`ctfgen train --stage ar|aux|baseline`: train one model on extracted codes."""

from __future__ import annotations

import argparse
import sys

from ctfgen.commands._common import collect_trailing_overrides


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=["ar", "aux", "baseline"],
                        help="ar: CTF stage 1 over coarse labels; aux: the auxiliary fine-token model; "
                             "baseline: the vanilla GPT over fine tokens")
    parser.add_argument("--codes", required=True, help="code directory from `ctfgen extract-codes`")
    parser.add_argument("--coarse-map", default=None, help="CoarseMap file from `ctfgen cluster` (ar and aux)")
    parser.add_argument("--config", default=None,
                        help="YAML with `preset`, `model` (config overrides) and `train` (TrainConfig) keys, or "
                             "an experiment config (its stage1 / aux / baseline section is used)")
    parser.add_argument("--preset", default=None, help="model preset (default: GPT-B / Aux-B, or the config's)")
    parser.add_argument("--out", required=True, help="output directory: checkpoints/, metrics.csv, model/")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides of the stage config, e.g. train.steps=1000 train.lr=3e-4 model.dim=256")
    collect_trailing_overrides(parser)


SECTION = {"ar": "stage1", "aux": "aux", "baseline": "baseline"}


def stage_config(path, stage: str, overrides: list[str]) -> dict:
    """{preset, model, train} for `stage` from a stage YAML or an experiment YAML, with overrides."""
    import yaml

    from ctfgen.experiment import apply_overrides, resolve_config

    raw = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    if any(k in raw for k in ("stage1", "aux", "baseline", "tokenizer", "data")):
        cfg = resolve_config(raw)[SECTION[stage]]
    else:
        unknown = sorted(set(raw) - {"preset", "model", "train"})
        if unknown:
            raise SystemExit(f"{path}: unknown keys {unknown}; a stage config has preset, model and train")
        cfg = {"preset": raw.get("preset"), "model": raw.get("model") or {}, "train": raw.get("train") or {}}
    cfg = apply_overrides(cfg, overrides)
    bad = [k for k in cfg if k not in ("preset", "model", "train")]
    if bad:
        raise SystemExit(f"overrides must start with preset, model. or train., got {bad}")
    cfg["train"] = dict(cfg.get("train") or {})
    cfg["train"].setdefault("steps", None)
    return cfg


def run(args: argparse.Namespace) -> int:
    from ctfgen.train import distributed as D
    from ctfgen.train.loop import NonFiniteLossError
    from ctfgen.train.stages import MODEL_DIR, StageMismatchError, train_stage

    cfg = stage_config(args.config, args.stage, args.overrides)
    if cfg["train"].get("steps") is None and cfg["train"].get("epochs") is None:
        raise SystemExit("say how long to train: train.steps=N or train.epochs=N (in --config or as an override)")
    if args.stage in ("ar", "aux") and not args.coarse_map:
        raise SystemExit(f"--stage {args.stage} needs --coarse-map FILE (from `ctfgen cluster`)")
    D.init_distributed()
    try:
        model, result = train_stage(
            args.stage, args.codes, args.out, coarse_map=args.coarse_map if args.stage != "baseline" else None,
            preset=args.preset or cfg["preset"], model=cfg["model"], train_config=cfg["train"],
            resume=args.resume, run_config={"command": "train", "codes": args.codes, "coarse_map": args.coarse_map},
        )
        if D.is_main():
            print(f"{args.stage}: {result.step} steps in {result.seconds:.1f}s; model saved to {args.out}/{MODEL_DIR}")
    except (StageMismatchError, NonFiniteLossError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        D.cleanup()
    return 0
