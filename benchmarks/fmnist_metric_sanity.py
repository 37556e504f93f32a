"""Reference points for the offline Fashion-MNIST metrics: real training images and uniform noise,
each scored against the test split exactly as samples are (docs/evaluation.md).

    python benchmarks/fmnist_metric_sanity.py --n 2000
"""

import argparse
import json

import numpy as np

from ctfgen.data.fashion_mnist import load_fashion_mnist
from ctfgen.metrics.evaluate import evaluate_fmnist

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=2000)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

rng = np.random.default_rng(args.seed)
images, labels = load_fashion_mnist("train")
pick = rng.choice(len(images), args.n, replace=False)
real = evaluate_fmnist(images[pick][..., None], labels[pick])
noise = evaluate_fmnist(rng.integers(0, 256, (args.n, 28, 28, 1), dtype=np.uint8))
print(json.dumps({"train_images": real, "uniform_noise": noise}, indent=2))
