"""Sample-quality metrics: FID / sFID / IS / precision-recall (Inception, local weights) and their
offline Fashion-MNIST analogues in the feature space of a small shipped classifier.

See docs/evaluation.md. Classifier-space numbers are not comparable to ImageNet FID.
"""

from ctfgen.metrics.classifier import ClassifierConfig, FMNISTClassifier, load_default_classifier, train_classifier
from ctfgen.metrics.compare import compare, load_records, markdown, markdown_table, plot_metrics, plot_panels, text_table
from ctfgen.metrics.core import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    knn_radii,
    precision_recall,
)
from ctfgen.metrics.evaluate import evaluate, evaluate_fmnist, evaluate_inception, load_images, write_record
from ctfgen.metrics.inception import (
    WEIGHTS_FILE,
    InceptionWeightsNotFound,
    find_inception_weights,
    inception_features,
    load_inception,
)

__all__ = [
    "ClassifierConfig", "FMNISTClassifier", "load_default_classifier", "train_classifier",
    "compare", "load_records", "markdown", "markdown_table", "plot_metrics", "plot_panels", "text_table",
    "feature_statistics", "frechet_distance", "frechet_distance_from_features", "inception_score",
    "knn_radii", "precision_recall",
    "evaluate", "evaluate_fmnist", "evaluate_inception", "load_images", "write_record",
    "WEIGHTS_FILE", "InceptionWeightsNotFound", "find_inception_weights", "inception_features", "load_inception",
]
