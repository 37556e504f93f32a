"""`ctfgen train-classifier`: train the Fashion-MNIST CNN used by `ctfgen eval --metric-set fmnist`."""

from __future__ import annotations

from ctfgen.app.commands._common import check_args
from ctfgen.metrics.classifier import train_classifier


def configure(parser):
    parser.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, train_info.json)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training split (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST *.gz IDX files (default: the usual locations)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images only (smoke tests)")
    parser.add_argument("--validation-images", type=int, default=5000,
                        help="class-balanced training images left out, as data.validation_images leaves them out "
                             "of the models (default: %(default)s; 0 trains on all 60k)")


def run(args):
    check_args(args)
    _, info = train_classifier(
        args.out, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
        data_root=args.data_root, limit=args.limit, validation_images=args.validation_images,
    )
    print(f"test accuracy {info['test_accuracy']:.4f}; saved to {args.out} "
          "(load with FMNISTClassifier.from_pretrained(DIR); to ship it, copy config.json and "
          "model.safetensors into src/ctfgen/assets/fmnist_classifier/)")
    return 0
