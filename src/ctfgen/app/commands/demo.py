"""`ctfgen demo [--model DIR] [--host 127.0.0.1] [--port 7860]`: the interactive web demo (needs ctfgen[demo])."""

from __future__ import annotations

import argparse

from ctfgen.app.commands._common import add_model_arguments, check_args, load_baseline, load_model
from ctfgen.app.demo import Limits, build_app, launch
from ctfgen.pipeline import CTFPipeline
from ctfgen.utils.errors import ConfigError


def configure_demo(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--baseline", default=None, metavar="DIR_OR_REPO",
                        help="baseline shown side by side (default: the shipped one for the shipped model, else the "
                             "`baseline` directory beside --model; none if there is none)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only; another host prints a warning)")
    parser.add_argument("--port", type=int, default=7860, help="TCP port to serve on, 1 to 65535 (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=16, help="images per request at most (default: %(default)s)")
    parser.add_argument("--queue-size", type=int, default=16,
                        help="requests waiting at most; more get a 'busy, try again' message (default: %(default)s)")


def run_demo(args: argparse.Namespace) -> None:
    check_args(args)
    ctf = load_model(args.model, args.device)
    if not isinstance(ctf, CTFPipeline):
        raise ConfigError(f"--model {args.model!r} is a baseline; the demo shows a CTF model (pass the baseline as --baseline)")
    try:
        baseline = load_baseline(args.model, args.baseline, args.device, ctf.tokenizer)
    except ConfigError as e:
        if args.baseline is not None:
            raise
        print(f"no baseline to compare with ({e}); serving CTF only")
        baseline = None
    app = build_app(ctf, baseline, Limits(max_images=args.max_images, queue_size=args.queue_size))
    launch(app, host=args.host, port=args.port)
