"""`ctfgen pipeline CONFIG --out DIR [--resume] [key.sub=value ...]`: a whole experiment."""

from __future__ import annotations

import argparse
import sys

from ctfgen.commands._common import collect_trailing_overrides


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run tokenizer training, clustering, code extraction, stage 1, the auxiliary model and the "
        "baseline, then assemble DIR as a CTF pipeline (CTFPipeline.from_pretrained(DIR)) and DIR/baseline. "
        "Works under torchrun (DDP; only rank 0 writes)."
    )
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (configs/*.yaml); with --resume it defaults to the run's DIR/input.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, values parsed as YAML (e.g. train.steps=100 stage1.preset=GPT-mini)")
    parser.add_argument("--out", required=True, help="experiment directory")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out: finished steps are skipped, an interrupted one resumes "
                             "from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs still written)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    collect_trailing_overrides(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from ctfgen.experiment import ExperimentError, load_config, run_experiment
    from ctfgen.train import distributed as D
    from ctfgen.train.loop import NonFiniteLossError

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `ctfgen pipeline --resume --out DIR train.steps=5`
        config = None
    try:
        if args.print_config:
            if config is None:
                raise ExperimentError("--print-config needs a CONFIG")
            print(yaml.safe_dump(load_config(config, overrides), sort_keys=False), end="")
            return 0
        run_experiment(config, args.out, resume=args.resume, overrides=overrides, progress=not args.no_progress)
    except (ExperimentError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        D.cleanup()
    return 0
