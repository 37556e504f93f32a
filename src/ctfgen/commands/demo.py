"""`ctfgen demo [--model DIR] [--host 127.0.0.1] [--port 7860]`: the interactive web demo (needs ctfgen[demo])."""

from __future__ import annotations

import argparse

from ctfgen.commands._common import add_model_arguments


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="baseline shown side by side (default: the shipped one for the shipped model, else the "
                             "`baseline` directory beside --model; none if there is none)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only; another host prints a warning)")
    parser.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=16, help="images per request at most (default: %(default)s)")
    parser.add_argument("--queue-size", type=int, default=16,
                        help="requests waiting at most; more get a 'busy, try again' message (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ctfgen.app import Limits, build_app, launch
    from ctfgen.commands._common import load_baseline, load_model
    from ctfgen.pipeline import CTFPipeline

    if args.max_images < 1 or args.queue_size < 1:
        raise SystemExit("--max-images and --queue-size must be at least 1")
    if not 0 < args.port < 65536:
        raise SystemExit(f"--port must be in 1..65535, got {args.port}")
    ctf = load_model(args.model, args.device)
    if not isinstance(ctf, CTFPipeline):
        raise SystemExit(f"--model {args.model!r} is a baseline; the demo shows a CTF model (pass the baseline as --baseline)")
    try:
        baseline = load_baseline(args.model, args.baseline, args.device, ctf.tokenizer)
    except SystemExit as e:
        if args.baseline is not None:
            raise
        print(f"no baseline to compare with ({e}); serving CTF only")
        baseline = None
    app = build_app(ctf, baseline, Limits(max_images=args.max_images, queue_size=args.queue_size))
    launch(app, host=args.host, port=args.port)
    return 0
