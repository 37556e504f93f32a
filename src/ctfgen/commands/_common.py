"""Options and helpers shared by the commands (sampling options, model loading, trailing overrides)."""

from __future__ import annotations

import argparse

from ctfgen.errors import ConfigError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    import torch

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="fashion-mnist",
                   help="a pipeline directory (from `ctfgen pipeline`, e.g. RUN/ctf or RUN/baseline) or a shipped "
                        "name: fashion-mnist, fashion-mnist-baseline (default: %(default)s)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (unset options take the model's defaults: the paper's for CTF)")
    g.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance of stage 1 / the baseline")
    g.add_argument("--cfg-steps", type=int, default=None, help="guide only the first N tokens")
    g.add_argument("--temperature", type=float, default=None, help="stage-1 (or baseline) temperature")
    g.add_argument("--top-k", type=int, default=None, help="stage-1 (or baseline) top-k, 0 = all")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--temperature-fine", type=float, default=None, help="stage-2 temperature (CTF only)")
    g.add_argument("--top-k-fine", type=int, default=None, help="stage-2 top-k, 0 = all, 1 = argmax (CTF only)")
    g.add_argument("--cfg-scale-fine", type=float, default=None, help="stage-2 guidance, off (1.0) by default (CTF only)")
    g.add_argument("--seed", type=int, default=0)
    add_dtype_argument(g)


def add_dtype_argument(parser, default: str = "auto") -> None:
    from ctfgen.precision import DTYPE_CHOICES

    parser.add_argument("--dtype", default=default, choices=DTYPE_CHOICES,
                        help="sampling precision; auto = bfloat16 on CUDA and on CPUs with native bf16, "
                             "float32 elsewhere; int8 / int8-weight = dynamic / weight-only int8 linear layers "
                             "through torchao (pip install 'ctfgen[quant]'), int8-fbgemm = dynamic int8 through "
                             "PyTorch's x86 kernels (default: %(default)s)")


def load_model(spec: str, device: str):
    from pathlib import Path

    from ctfgen.pipeline import load_pipeline
    from ctfgen.shipped import PRETRAINED, pretrained

    if spec in PRETRAINED and not Path(spec).exists():
        pipe = pretrained(spec, device=device)
    elif not Path(spec).is_dir():
        raise ConfigError(f"--model {spec!r} is neither a directory nor a shipped model ({', '.join(PRETRAINED)})")
    else:
        pipe = load_pipeline(spec).to(device).eval()
    if pipe.device.type == "cpu":
        # one thread for a small model, no more than the free cores (OMP_NUM_THREADS wins): ctfgen.threads
        from ctfgen.threads import use_sampling_threads

        use_sampling_threads(pipe)
    return pipe


def load_baseline(model_spec: str, baseline_spec: str | None, device: str, tokenizer=None):
    """The baseline to compare a CTF model with: `baseline_spec` when given, else the shipped baseline
    for the shipped model, else the `baseline` directory beside a pipeline run's `ctf`. A baseline
    saved without its tokenizer borrows `tokenizer` (checked against its codebook fingerprint)."""
    from pathlib import Path

    from ctfgen.pipeline import ARPipeline
    from ctfgen.shipped import PRETRAINED

    if baseline_spec is None:
        if model_spec in PRETRAINED and not Path(model_spec).exists():
            baseline_spec = "fashion-mnist-baseline"
        elif (Path(model_spec).parent / "baseline" / "pipeline.json").is_file():
            baseline_spec = str(Path(model_spec).parent / "baseline")
        else:
            raise ConfigError(f"no baseline beside {model_spec!r} (looked for {Path(model_spec).parent / 'baseline'}); "
                             "pass --baseline DIR")
    baseline = load_model(baseline_spec, device)
    if not isinstance(baseline, ARPipeline):
        raise ConfigError(f"--baseline {baseline_spec!r} is a {baseline.kind} pipeline, not a baseline")
    if baseline.tokenizer is None:
        if tokenizer is None:
            raise ConfigError(f"the baseline {baseline_spec!r} was saved without a tokenizer and none is at hand")
        try:
            baseline = ARPipeline(baseline.gpt, tokenizer, sampling_defaults=baseline.sampling_defaults)
        except ValueError as e:
            raise ConfigError(f"the baseline {baseline_spec!r} does not fit the CTF model's tokenizer: {e}") from None
    return baseline.to(device).eval()


def sampling_kwargs(args: argparse.Namespace, pipeline) -> dict:
    """The options the user set; the rest fall back to the pipeline's stored defaults."""
    from ctfgen.pipeline import CTFPipeline

    names = ["cfg_scale", "cfg_steps", "temperature", "top_k", "top_p"]
    fine = ["temperature_fine", "top_k_fine", "cfg_scale_fine"]
    if isinstance(pipeline, CTFPipeline):
        names += fine
    else:
        ignored = [f"--{n.replace('_', '-')}" for n in fine if getattr(args, n, None) is not None]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)} only apply to a CTF pipeline; this model is a baseline")
    names.append("dtype")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def resolve_classes(values: list[str], num_classes: int, class_names: list[str] | None = None) -> list[int]:
    """Class ids from ids or names; names follow the model's class list or Fashion-MNIST's."""
    ids = []
    for v in values:
        if v.lstrip("-").isdigit():
            c = int(v)
        elif class_names:
            lowered = [n.lower() for n in class_names]
            if v.lower() not in lowered:
                raise ConfigError(f"unknown class {v!r}; this model's classes: {', '.join(class_names)}")
            c = lowered.index(v.lower())
        else:
            from ctfgen.data.fashion_mnist import class_index

            try:
                c = class_index(v)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if not 0 <= c < num_classes:
            raise ConfigError(f"class {v!r} -> {c} is out of range for a model with {num_classes} classes")
        ids.append(c)
    return ids


def collect_trailing_overrides(parser: argparse.ArgumentParser) -> None:
    """Let key=value overrides come after options too (`CONFIG --out DIR train.steps=5`):
    argparse fills positionals only once, so leftovers that look like overrides are added here."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, rest = parse(args, namespace)
        extra = [a for a in rest if "=" in a and not a.startswith("-")]
        ns.overrides = list(getattr(ns, "overrides", None) or []) + extra
        return ns, [a for a in rest if a not in extra]

    parser.parse_known_args = parse_known_args
