"""Options and helpers shared by the commands: model and sampling options, number checks, model loading,
trailing overrides and --print-config."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ctfgen.config import dump
from ctfgen.data.fashion_mnist import CLASS_NAMES, class_index
from ctfgen.pipeline import ARPipeline, CTFPipeline
from ctfgen.shipped import PRETRAINED, pretrained
from ctfgen.utils.errors import ConfigError
from ctfgen.utils.options import (COUNTS, SAMPLING, SEED, Option, check_device, check_output_dir, check_output_file,
                                  cli_help)
from ctfgen.utils.precision import DTYPE_CHOICES
from ctfgen.utils.threads import count_parameters, use_sampling_threads


def add_device_argument(parser, default: str | None = "auto") -> None:
    """--device ("auto": cuda when available, else cpu; None: the library chooses), checked by check_args."""
    parser.add_argument("--device", default=default, help="cpu, cuda, cuda:N, mps ... (only devices this torch build "
                        "and machine have; default: cuda when available, else cpu)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="fashion-mnist", help="a pipeline directory (from `ctfgen pipeline`: the run's "
                   "root RUN, RUN/ctf or RUN/baseline), a Hugging Face Hub repo id (org/name; cached, honours "
                   "HF_HUB_OFFLINE), or a shipped name: fashion-mnist, fashion-mnist-baseline")
    add_device_argument(g)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (unset options take the model's defaults: the paper's for CTF)")
    for option in SAMPLING.values():
        g.add_argument(option.flag, type=int if option.integer else float, default=None, help=cli_help(option))
    g.add_argument("--seed", type=int, default=0, help=cli_help(SEED))
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="sampling precision; auto = bfloat16 on CUDA and on CPUs with native bf16, float32 elsewhere; "
                        "int8 / int8-weight = dynamic / weight-only int8 linear layers through torchao (pip install "
                        "'ctfgen[quant]'), int8-fbgemm = dynamic int8 through PyTorch's x86 kernels")


def check_args(args: argparse.Namespace, outputs: dict[str, str] | None = None, **rules: str | Option) -> None:
    """Every number and output the user gave, checked before any work: the device; each option whose
    name is a sampling option, a count or "seed" of ctfgen.utils.options, or that `rules` give an
    option's name or an Option, a list value by value (their model-free ranges: a model's own bounds
    wait for the model); and the outputs `outputs` names: the suffixes of an output file (check_output_file)
    or "dir" for an output directory (check_output_dir)."""
    if hasattr(args, "device"):
        args.device = check_device(args.device, "--device")
    for name, value in vars(args).items():
        rule = rules.get(name, name)
        option = rule if isinstance(rule, Option) else SEED if rule == "seed" else SAMPLING.get(rule) or COUNTS.get(rule)
        if option is not None and value is not None:
            flag = "--" + name.replace("_", "-")
            setattr(args, name, [option.check(v, flag) for v in value] if isinstance(value, list) else option.check(value, flag))
    for name, suffixes in (outputs or {}).items():
        if (path := getattr(args, name)) is None:
            continue
        if suffixes == "dir":
            check_output_dir(path, "--" + name)
        else:
            check_output_file(path, suffixes, "--" + name)


def load_model(spec: str, device: str, beside=None):
    """--model: a shipped name, a directory (a run's root included) or a Hub repo id, on `device`. `beside`:
    a pipeline loaded before it, sampled in the same process."""
    pipe = pretrained(spec, device=device)
    if pipe.device.type == "cpu":
        # one thread for a small model, no more than the free cores (OMP_NUM_THREADS wins); torch has one
        # count for the process, so with two models it is the larger one's, whichever was loaded last
        use_sampling_threads(max([pipe] + ([beside] if beside is not None else []), key=count_parameters))
    return pipe


def load_baseline(model_spec: str, baseline_spec: str | None, device: str, ctf):
    """The baseline to compare the CTF pipeline `ctf` with: `baseline_spec` when given, else the shipped
    baseline for the shipped model, else a run's `baseline` directory: inside --model when it is the run's
    root, beside it when it is RUN/ctf. A baseline saved without its tokenizer borrows ctf's
    (checked against its codebook fingerprint)."""
    if baseline_spec is None:
        model = Path(model_spec)
        found = [d for d in (model / "baseline", model.parent / "baseline") if (d / "pipeline.json").is_file()]
        if model_spec in PRETRAINED and not model.exists():
            baseline_spec = "fashion-mnist-baseline"
        elif found:
            baseline_spec = str(found[0])
        else:
            raise ConfigError(f"no baseline found for --model {model_spec!r} (looked for {model / 'baseline'} and "
                              f"{model.parent / 'baseline'}); pass --baseline DIR_OR_REPO")
    baseline = load_model(baseline_spec, device, beside=ctf)
    if not isinstance(baseline, ARPipeline):
        raise ConfigError(f"--baseline {baseline_spec!r} is a {baseline.kind} pipeline, not a baseline")
    if baseline.tokenizer is None:
        if ctf.tokenizer is None:
            raise ConfigError(f"the baseline {baseline_spec!r} was saved without a tokenizer and none is at hand")
        try:  # its parts are on `device` already, and it puts itself in eval mode
            return ARPipeline(baseline.gpt, ctf.tokenizer, sampling_defaults=baseline.sampling_defaults)
        except ValueError as e:
            raise ConfigError(f"the baseline {baseline_spec!r} does not fit the CTF model's tokenizer: {e}") from None
    return baseline


def sampling_kwargs(args: argparse.Namespace, pipeline) -> dict:
    """The options the user set, checked against the model's bounds too (top-k against its
    vocabulary, cfg_steps against its length); the rest fall back to the pipeline's stored defaults."""
    given = {n: getattr(args, n) for n in SAMPLING if getattr(args, n) is not None}
    fine = [SAMPLING[n].flag for n in given if n.endswith("_fine")]
    if fine and not isinstance(pipeline, CTFPipeline):
        raise ConfigError(f"{', '.join(fine)} only apply to a CTF pipeline; this model is a baseline")
    checked = pipeline.resolve_sampling(given, labels={n: o.flag for n, o in SAMPLING.items()})
    return {**{n: checked[n] for n in given}, "dtype": args.dtype}


def resolve_classes(values: list[str], num_classes: int) -> list[int]:
    """Class ids from ids or Fashion-MNIST names, each within the model's classes."""
    ids = []
    for v in values:
        text = str(v).strip()
        is_id = re.fullmatch(r"-?[0-9]+", text) is not None
        # class_index knows Fashion-MNIST's 10 classes only: an id is the model's, of however many classes it has
        if not is_id and num_classes != len(CLASS_NAMES):
            raise ConfigError(f"class {v!r}: class names are Fashion-MNIST's, and this model has {num_classes} "
                              f"classes; give class ids 0-{num_classes - 1}")
        c = int(text) if is_id else class_index(text)
        if not 0 <= c < num_classes:
            raise ConfigError(f"class {v!r} -> {c} is out of range for a model with {num_classes} classes")
        ids.append(c)
    return ids


def add_print_config(parser: argparse.ArgumentParser, overrides: str | None = None, config: str | None = None) -> None:
    """--print-config and, given their help, the key.sub=value `overrides` of the settings. Overrides
    may come after options too (`CONFIG --out DIR train.steps=5`): argparse fills positionals only
    once, so leftovers that look like overrides are added here. An optional CONFIG positional (named
    `config`) that is an override, not a file, joins them."""
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings (config file, overrides and defaults) and exit")
    if not overrides:
        return
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help=overrides)
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, rest = parse(args, namespace)
        extra = [a for a in rest if "=" in a and not a.startswith("-")]
        first = getattr(ns, config) if config else None
        if first is not None and "=" in first and not Path(first).exists():  # `--resume --out DIR train.steps=5`
            setattr(ns, config, None)
            ns.overrides.insert(0, first)
        ns.overrides += extra
        return ns, [a for a in rest if a not in extra]

    parser.parse_known_args = parse_known_args


def print_config(args: argparse.Namespace, cfg, *required: str) -> bool:
    """--print-config: print `cfg` as YAML, every default filled in, and return True; otherwise
    refuse a run that lacks one of the `required` options."""
    if args.print_config:
        print(dump(cfg), end="")
        return True
    missing = ["--" + n.replace("_", "-") for n in required if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (see --help)")
    return False
