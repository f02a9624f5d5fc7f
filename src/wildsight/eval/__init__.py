"""How good frozen features are: feature extraction (per layer), linear (L-BFGS or SGD), MLP and
k-NN probes, tables, and the self-contained HTML report."""

from wildsight.eval.features import (
    extract_features,
    extract_layers,
    grid_layer_names,
    grid_side,
    layer_names,
)
from wildsight.eval.knn import knn_predict, knn_probe, knn_probes, nearest_neighbours
from wildsight.eval.linear import (
    L2_GRID,
    LogisticFit,
    fit_logistic,
    linear_probe,
    logistic_objective,
    standardize,
    stratified_split,
)
from wildsight.eval.mlp import MLPProbe, fit_mlp, mlp_probe
from wildsight.eval.report import ProbeResult, confusion_matrix, format_table, top1_accuracy
from wildsight.eval.sgd import fit_logistic_sgd, linear_probe_sgd
from wildsight.eval.svg import plot_label_fraction

__all__ = [
    "L2_GRID",
    "LogisticFit",
    "MLPProbe",
    "ProbeResult",
    "confusion_matrix",
    "extract_features",
    "extract_layers",
    "fit_logistic",
    "fit_logistic_sgd",
    "fit_mlp",
    "format_table",
    "knn_predict",
    "knn_probe",
    "knn_probes",
    "grid_layer_names",
    "grid_side",
    "layer_names",
    "linear_probe",
    "linear_probe_sgd",
    "logistic_objective",
    "mlp_probe",
    "nearest_neighbours",
    "plot_label_fraction",
    "standardize",
    "stratified_split",
    "top1_accuracy",
]
