"""Frozen-feature protocols from features to a result document: the probe(s) of every requested
layer, a table row each, the confusion matrix and the nearest-neighbour grid of the headline
probe. ``api.evaluate`` feeds it features of the run's encoder; the document goes to
``html.save_result`` (RUN_DIR/eval/<name>.json + report.html).

Protocols: "linear" (L-BFGS, or SGD with ``solver="sgd"``), "mlp", "knn" (one row per k) and
"transfer" (the linear probe on a labelled source other than the pretraining one, the
pretrained features next to the same backbone at random init).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from wildsight.data.shards import is_shard_spec, open_shards
from wildsight.eval.features import PRE_LOGITS
from wildsight.eval.html import neighbour_doc, pick_queries
from wildsight.eval.knn import knn_probes
from wildsight.eval.linear import linear_probe
from wildsight.eval.mlp import mlp_probe
from wildsight.eval.report import ProbeResult, confusion_matrix
from wildsight.eval.sgd import linear_probe_sgd

PROTOCOLS = ("linear", "mlp", "knn", "transfer")
SOLVERS = ("lbfgs", "sgd")


@dataclass(frozen=True)
class LabelledFeatures:
    """Frozen features of one labelled source, per probe layer."""

    source: str
    features: dict[str, Tensor]  # layer -> float32 [N, D_layer]
    labels: Tensor  # int64 [N], index into classes
    classes: list[str]  # class names
    image: Callable[[int], Tensor] | None = None  # row -> uint8 [C, H, W] (the neighbour grid)


def names_no_classes(source: str) -> bool:
    """True for tar shards whose labels are bare class numbers: no index.json next to them
    names their classes (copied without it, or written by another tool). Their `classes`
    reach a probe as "0", "1", ... made up from the labels, which look like names but are not."""
    return is_shard_spec(source) and open_shards([source], 1).classes is None


def _numbered(classes: Sequence[str]) -> bool:
    """Class names "0", "1", ..., "n-1": a list of numeric labels, IDX files without names,
    class folders 0 ... 9; by name or by number, a label means the same class."""
    return list(classes) == [str(k) for k in range(len(classes))]


def check_class_names(
    train: str, train_classes: Sequence[str] | None, test: str, test_classes: Sequence[str] | None
) -> None:
    """Refuse or warn before test labels are matched to train labels; None = bare numbers
    (`names_no_classes`). The decision, per pair of sides:

    - both name their classes: matched by name (the callers' remap), nothing to say;
    - a side of bare numbers and a side with real names (not "0", "1", ...): ValueError. Class k
      of unnamed shards is whatever the packer numbered k, so no remap is right except by
      luck, and a wrong one mislabels every image without a sign;
    - bare numbers on both sides, or against names that are numbers: matched by number, the
      only reading there is (two unnamed shard sets of one packer), with one warning, since
      nothing can check that both sides numbered their classes alike.
    """
    sides = ((train, train_classes), (test, test_classes))
    bare = [source for source, classes in sides if classes is None]
    if not bare:
        return
    named = [(s, c) for s, c in sides if c is not None and not _numbered(c)]
    if named:
        source, classes = named[0]
        more = ", ..." if len(classes) > 3 else ""
        raise ValueError(
            f"{bare[0]!r} names no classes (tar shards without index.json: labels are bare "
            f"numbers) but {source!r} does ({', '.join(classes[:3])}{more}): numbers cannot be "
            "matched to names safely; keep the shards' index.json beside them (or pack them "
            "again with `wildsight shards`)"
        )
    unnamed = list(dict.fromkeys(bare))  # train and test may be one source
    warnings.warn(
        f"labels of {train!r} and {test!r} are matched by class number, as "
        f"{' and '.join(map(repr, unnamed))} name{'s' * (len(unnamed) == 1)} no classes (tar "
        "shards without index.json); right only if both sides numbered their classes alike",
        stacklevel=3,
    )


def align_classes(train: LabelledFeatures, test: LabelledFeatures) -> LabelledFeatures:
    """test with labels renumbered into train's classes, matched by name. Both sources must be
    labelled, and every test class must occur in train: a probe cannot predict a class it never
    saw, so such test images could only count as errors (fine-tuning refuses them alike).
    Tar shards without class names are matched by number or refused: `check_class_names`."""
    for side in (train, test):
        if side.labels.numel() == 0:
            raise ValueError(f"{side.source!r} holds no image to probe on; check the path")
        unknown = int((side.labels < 0).sum())
        if unknown:
            raise ValueError(
                f"{side.source!r}: {unknown:,} of {side.labels.numel():,} images have no label; "
                "a probe needs labelled sources (class sub-folders, a list of path<TAB>label, "
                "or fmnist:train / fmnist:test)"
            )
    check_class_names(
        train.source, None if names_no_classes(train.source) else train.classes,
        test.source, None if names_no_classes(test.source) else test.classes,
    )  # fmt: skip
    if test.classes == train.classes:
        return test
    missing = [c for c in test.classes if c not in train.classes]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"classes {missing[:5]}{more} of the test source {test.source!r} do not occur in the "
            f"training source {train.source!r}; test on images of the training classes"
        )
    remap = torch.tensor([train.classes.index(c) for c in test.classes], dtype=torch.long)
    return replace(test, labels=remap[test.labels], classes=list(train.classes))


def run_probes(
    protocol: str,
    train: LabelledFeatures,
    test: LabelledFeatures,
    *,
    layers: Sequence[str],
    features_name: str = "pretrained",
    solver: str = "lbfgs",
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    device: torch.device | str = "cpu",
) -> tuple[list[dict[str, Any]], list[ProbeResult]]:
    """One table row per (layer[, k]) and the matching ProbeResults, layers in the given order."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {list(SOLVERS)}")
    rows, results = [], []
    for layer in layers:
        args = (train.features[layer], train.labels, test.features[layer], test.labels)
        if protocol == "knn":
            found = knn_probes(*args, ks=ks, temperature=temperature, device=device)
        elif protocol == "mlp":
            found = [mlp_probe(*args, device=device)]
        elif solver == "sgd":
            found = [linear_probe_sgd(*args, device=device)]
        else:
            found = [linear_probe(*args, device=device)]
        for result in found:
            row: dict[str, Any] = {"features": features_name, "layer": layer}
            if protocol == "knn":
                row["k"] = result.params["k"]
            rows.append({**row, **result.to_dict()})
            results.append(result)
    return rows, results


def headline_index(rows: Sequence[dict[str, Any]]) -> int:
    """The row a one-number summary quotes: the pre-logits when probed; else, over several
    layers, the one that scored best on the held-out split of TRAIN (Goyal et al., 2019 report
    each method's best layer; here the test set plays no part in the choice); else the last
    layer. First k for k-NN rows."""
    layers = [r["layer"] for r in rows]
    if PRE_LOGITS in layers:
        return layers.index(PRE_LOGITS)
    scored = [i for i, r in enumerate(rows) if r.get("val_top1") is not None]
    if len(set(layers)) > 1 and len(scored) == len(rows):
        return max(scored, key=lambda i: (rows[i]["val_top1"], -i))  # ties: the earlier layer
    return layers.index(layers[-1])


def result_document(
    protocol: str,
    rows: list[dict[str, Any]],
    headline: ProbeResult,
    train: LabelledFeatures,
    test: LabelledFeatures,
    *,
    layer: str,
    neighbours: int = 8,
    **meta: Any,
) -> dict[str, Any]:
    """The JSON document of one eval: meta, rows, the headline row's fields at the top level
    (``top1`` etc., what scripts read), its confusion matrix and, when the sources can give
    images, the grid of the ``neighbours`` nearest training images of 8 test images."""
    first = rows[headline_index(rows)]
    doc: dict[str, Any] = {"protocol": protocol, **meta, "train": train.source,
                           "test": test.source, "rows": rows}  # fmt: skip
    doc.update({k: v for k, v in first.items() if k not in ("features", "layer")})
    if headline.predictions is not None:
        labels = list(range(len(test.classes)))
        counts = confusion_matrix(test.labels, headline.predictions, labels)
        doc["confusion"] = {"labels": list(test.classes), "counts": counts,
                            "of": f"{first['features']}, {layer}"}  # fmt: skip
    if neighbours > 0 and train.image is not None and test.image is not None:
        queries = pick_queries(test.labels)
        doc["neighbours"] = neighbour_doc(
            train.features[layer], test.features[layer][queries],
            bank_labels=[train.classes[c] for c in train.labels.tolist()],
            query_labels=[test.classes[int(test.labels[q])] for q in queries],
            bank_image=train.image, query_image=lambda q: test.image(queries[q]),  # type: ignore[misc]
            k=neighbours, layer=layer, train=train.source, test=test.source,
        )  # fmt: skip
    return doc
