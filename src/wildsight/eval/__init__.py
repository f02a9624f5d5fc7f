"""How good frozen features are: feature extraction, linear (L-BFGS) and k-NN probes, tables."""

from wildsight.eval.features import extract_features
from wildsight.eval.knn import knn_predict, knn_probe
from wildsight.eval.linear import (
    L2_GRID,
    LogisticFit,
    fit_logistic,
    linear_probe,
    logistic_objective,
    standardize,
    stratified_split,
)
from wildsight.eval.report import ProbeResult, format_table

__all__ = [
    "L2_GRID",
    "LogisticFit",
    "ProbeResult",
    "extract_features",
    "fit_logistic",
    "format_table",
    "knn_predict",
    "knn_probe",
    "linear_probe",
    "logistic_objective",
    "standardize",
    "stratified_split",
]
