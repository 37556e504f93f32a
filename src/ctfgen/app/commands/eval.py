"""`ctfgen eval SAMPLES --ref REF`: metrics of a sample set, printed as a table and written as JSON."""

from __future__ import annotations

from ctfgen.app.commands._common import add_device_argument, check_args
from ctfgen.metrics.compare import record_summary
from ctfgen.metrics.evaluate import evaluate, write_record
from ctfgen.utils.options import check_output_file


def configure(parser):
    parser.add_argument("samples", help="sample set: an ADM-style .npz (uint8 arr_0 (N,H,W,C), labels under "
                                        "'labels' or arr_1) or a folder of images")
    parser.add_argument("--ref", required=True,
                        help="reference: an ADM reference batch .npz (precomputed mu/sigma are used if present) "
                             "or a folder of images; with --metric-set fmnist also 'fashion-mnist-test' "
                             "(or 'test') / 'fashion-mnist-train'")
    parser.add_argument("--metric-set", choices=["inception", "fmnist"], default="inception",
                        help="inception: FID/sFID/IS/precision/recall (needs the Inception weights file); "
                             "fmnist: the same in the shipped Fashion-MNIST classifier's feature space, plus "
                             "class consistency (offline; not comparable to ImageNet FID)")
    parser.add_argument("--out", default=None, help="write the evaluation record to this JSON file")
    parser.add_argument("--name", default=None, help="run name stored in the record (default: the samples' file name)")
    parser.add_argument("--epoch", type=int, default=None, help="training epoch of the evaluated model, for `ctfgen compare`")
    parser.add_argument("--inception-weights", default=None,
                        help="path to weights-inception-2015-12-05-6726825d.pth (default: $CTFGEN_INCEPTION_WEIGHTS, "
                             "then ~/.cache/ctfgen/)")
    parser.add_argument("--k", type=int, default=3, help="nearest neighbour for precision/recall radii")
    parser.add_argument("--splits", type=int, default=10, help="splits for the Inception Score")
    parser.add_argument("--batch-size", type=int, default=50, help="images per feature-extraction batch (default: %(default)s)")
    add_device_argument(parser, None)
    parser.add_argument("--no-sfid", action="store_true", help="skip sFID (saves a little time)")


def run(args):
    check_args(args)
    if args.out:
        check_output_file(args.out, ".json", "--out")
    record = evaluate(
        args.samples, args.ref, metric_set=args.metric_set, name=args.name, epoch=args.epoch,
        inception_weights=args.inception_weights, k=args.k, splits=args.splits,
        batch_size=args.batch_size, device=args.device, sfid=not args.no_sfid,
    )
    print(record_summary(record))
    if args.out:
        print(f"wrote {write_record(record, args.out)}")
    return 0
