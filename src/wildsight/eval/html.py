"""The evaluation report: every eval saves RUN_DIR/eval/<name>.json, and RUN_DIR/report.html is
rebuilt from those files and RUN_DIR/metrics.jsonl. The page is one self-contained file: plots
are inline SVG (``eval/svg.py``), images are base64 PNG data URIs, there is no script and no
external URL, so it can be mailed or opened offline.

A result document (``save_result``) is a JSON object with at least ``protocol`` and ``rows``
(a list of dicts). Optional parts the page draws when present: ``confusion``
({"labels": [names], "counts": [[int]]}), ``neighbours`` (see ``neighbour_doc``), rows with
``layer`` (accuracy-per-layer curve) and, for ``protocol == "lowshot"``, rows with fraction,
model, mean, std (accuracy vs label fraction).
"""

from __future__ import annotations

import base64
import io
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from wildsight.eval.report import _cell
from wildsight.eval.svg import heatmap, line_chart, plot_label_fraction, plot_layers

EVAL_DIR = "eval"
REPORT_NAME = "report.html"
ROW_COLUMNS = ("features", "layer", "k", "top1", "val_top1", "params", "fraction", "model",
               "mean", "std", "num_train", "num_test", "feature_dim")  # fmt: skip


def result_path(run_dir: str | Path, name: str, suffix: str = ".json") -> Path:
    """RUN_DIR/eval/<name><suffix>, for a result name that is a plain file stem."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"result name must be a plain file stem, got {name!r}")
    return Path(run_dir) / EVAL_DIR / f"{name}{suffix}"


def save_result(run_dir: str | Path, name: str, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` to RUN_DIR/eval/<name>.json (atomically), then rebuild RUN_DIR/report.html.

    Returns the path of the JSON file.
    """
    if "protocol" not in doc or not isinstance(doc.get("rows"), list):
        raise ValueError(f"result {name!r} needs a 'protocol' and a list of 'rows'")
    path = result_path(run_dir, name)
    _write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    write_report(run_dir)
    return path


def load_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every RUN_DIR/eval/*.json, sorted by file name, each with its ``name`` (the file stem).
    A file that is not a result document (broken JSON, another JSON) is left out with a warning
    naming it, so one damaged file does not stop the report or the eval that rebuilds it."""
    return _read_results(Path(run_dir))[0]


def _read_results(run_dir: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(result documents, [(file name, why it was left out)])."""
    docs, unreadable = [], []
    for path in sorted((run_dir / EVAL_DIR).glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            unreadable.append((path.name, f"{type(err).__name__}: {err}"))
            warnings.warn(f"left out of the report: {path} is not readable JSON ({err}); "
                          "delete it or rerun the eval that wrote it", stacklevel=3)  # fmt: skip
            continue
        if isinstance(doc, dict) and isinstance(doc.get("rows"), list):
            docs.append({"name": path.stem, **doc})
    return docs, unreadable


def is_run_dir(folder: str | Path) -> bool:
    """A pretrain run's folder: it holds config.yaml, checkpoints/ or eval/."""
    folder = Path(folder)
    return any((folder / part).exists() for part in ("config.yaml", "checkpoints", EVAL_DIR))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """(Re)build the HTML report of a run directory; returns its path (default RUN_DIR/report.html)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"no run directory {str(run_dir)!r}; pass the --out of a pretrain run"
        )
    if not is_run_dir(run_dir):
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a run directory (no config.yaml, checkpoints/ or eval/); "
            "pass the --out of a pretrain run"
        )
    path = Path(out) if out is not None else run_dir / REPORT_NAME
    _write_text(path, build_report(run_dir))
    return path


def build_report(run_dir: str | Path) -> str:
    """The HTML text of the report of ``run_dir`` (see the module docstring for the sources)."""
    run_dir = Path(run_dir)
    docs, unreadable = _read_results(run_dir)
    sections = [_training_section(run_dir), _results_section(docs, unreadable), _layers_section(docs),
                _fraction_section(docs), _confusion_section(docs), _neighbours_section(docs)]  # fmt: skip
    body = "\n".join(s for s in sections if s)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>wildsight report: {escape(run_dir.name)}</title><style>{_CSS}</style></head>\n"
        f"<body><h1>wildsight report: {escape(str(run_dir))}</h1>\n{body}\n</body></html>\n"
    )


# -- sections ----------------------------------------------------------------------------------
def _training_section(run_dir: Path) -> str:
    from wildsight.log import read_metrics

    rows = read_metrics(run_dir)
    charts = []
    for key, title, label in (("loss", "Pretraining loss", "loss"), ("lr", "Learning rate", "lr"),
                              ("images_per_s", "Throughput", "images / s")):  # fmt: skip
        points = [(float(r["step"]), float(r[key])) for r in rows
                  if isinstance(r.get(key), int | float) and "step" in r]  # fmt: skip
        if points:
            charts.append(line_chart({key: points}, title=title, x_label="step", y_label=label))
    if not charts:
        return '<h2 id="training">Pretraining</h2><p>No metrics.jsonl in this run directory.</p>'
    last = rows[-1]
    summary = ", ".join(
        f"{k} {_cell(k, last[k])}" for k in ("step", "loss", "images_per_s") if k in last
    )
    return (
        f'<h2 id="training">Pretraining</h2><p>Last logged: {escape(summary)}.</p>'
        f'<div class="row">{"".join(charts)}</div>'
    )


def _results_section(docs: list[dict[str, Any]], unreadable: Sequence[tuple[str, str]] = ()) -> str:
    parts = ['<h2 id="results">Results</h2>']
    if unreadable:
        items = "".join(f"<li>eval/{escape(name)}: {escape(why)}</li>" for name, why in unreadable)
        parts.append(f"<p>Left out, not readable as JSON:</p><ul>{items}</ul>")
    if not docs:
        parts.append("<p>No evaluation results yet (RUN_DIR/eval/*.json).</p>")
        return "\n".join(parts)
    for doc in docs:
        meta = {k: doc[k] for k in ("protocol", "train", "test", "pretrained_on", "checkpoint_step",
                                    "solver", "elapsed_s") if doc.get(k) is not None}  # fmt: skip
        parts.append(f'<h3>{escape(doc["name"])}</h3><p class="meta">{escape(_describe(meta))}</p>')
        parts.append(_table(doc["rows"]))
    return "\n".join(parts)


def _layers_section(docs: list[dict[str, Any]]) -> str:
    series: dict[str, list[tuple[str, float]]] = {}
    for doc in docs:
        for r in doc["rows"]:
            if r.get("layer") and isinstance(r.get("top1"), int | float):
                name = f"{doc['name']}: {r.get('features', doc['protocol'])}"
                name += f", k={r['k']}" if "k" in r else ""
                series.setdefault(name, []).append((str(r["layer"]), float(r["top1"])))
    series = {k: v for k, v in series.items() if len({layer for layer, _ in v}) > 1}
    if not series:
        return ""
    return f'<h2 id="layers">Probe accuracy per layer</h2>{plot_layers(series)}'


def _fraction_section(docs: list[dict[str, Any]]) -> str:
    rows = [r for doc in docs if doc["protocol"] == "lowshot" for r in doc["rows"]
            if all(k in r for k in ("fraction", "model", "mean"))]  # fmt: skip
    if not rows:
        return ""
    return f'<h2 id="label-fraction">Accuracy vs label fraction</h2>{plot_label_fraction(rows)}'


def _confusion_section(docs: list[dict[str, Any]]) -> str:
    """The first document's matrix shown, the others folded (<details>, no script needed)."""
    preference = ["linear", "transfer", "mlp", "knn"]
    rank = {p: i for i, p in enumerate(preference)}
    parts = []
    for doc in sorted(docs, key=lambda d: rank.get(d["protocol"], len(preference))):
        if not isinstance(doc.get("confusion"), dict):
            continue
        of = doc["confusion"].get("of", "test set")
        svg = heatmap(
            doc["confusion"]["counts"], doc["confusion"]["labels"], title=f"{doc['name']} ({of})"
        )
        parts.append(
            svg
            if not parts
            else f"<details><summary>{escape(doc['name'])}</summary>{svg}</details>"
        )
    if not parts:
        return ""
    return '<h2 id="confusion">Confusion matrix</h2>' + "\n".join(parts)


def _neighbours_section(docs: list[dict[str, Any]]) -> str:
    grids = [doc["neighbours"] for doc in docs if isinstance(doc.get("neighbours"), dict)]
    if not grids:
        return ""
    grid = grids[-1]
    rows = []
    for query in grid["queries"]:
        cells = [_image_cell(query, "query")]
        cells += [_image_cell(n, f"{n['similarity']:.2f}", hit=n["label"] == query["label"])
                  for n in query["neighbours"]]  # fmt: skip
        rows.append(f"<tr>{''.join(cells)}</tr>")
    caption = (
        f"Test images ({escape(str(grid.get('test')))}, first column) and their "
        f"{len(grids[-1]['queries'][0]['neighbours']) if grid['queries'] else 0} nearest training "
        f"images ({escape(str(grid.get('train')))}) by cosine similarity of the "
        f"{escape(str(grid.get('layer')))} features; a green frame marks the same class."
    )
    return (
        f'<h2 id="neighbours">Nearest neighbours</h2><p>{caption}</p>'
        f'<table class="grid">{"".join(rows)}</table>'
    )


# -- the nearest-neighbour grid document ---------------------------------------------------------
def png_data_uri(image: Tensor, *, scale: int = 1) -> str:
    """uint8 [C, H, W] (C = 1 or 3) -> "data:image/png;base64,..." (grey when the channels agree)."""
    array = image.detach().cpu().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, C]
    if array.shape[2] == 3 and (array == array[:, :, :1]).all() or array.shape[2] == 1:
        picture = Image.fromarray(np.ascontiguousarray(array[:, :, 0]), mode="L")
    else:
        picture = Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    if scale > 1:
        picture = picture.resize(
            (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
        )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pick_queries(labels: Tensor, count: int = 8) -> list[int]:
    """Rows to show: the first row of each class in label order, then the next rows, up to count."""
    labels = labels.cpu()
    first = [int(torch.nonzero(labels == c)[0]) for c in torch.unique(labels).tolist()]
    chosen = first[:count]
    for i in range(labels.numel()):
        if len(chosen) >= count:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


def neighbour_doc(
    bank_x: Tensor,
    query_x: Tensor,
    *,
    bank_labels: Sequence[str],
    query_labels: Sequence[str],
    bank_image: Callable[[int], Tensor],
    query_image: Callable[[int], Tensor],
    k: int = 8,
    **meta: Any,
) -> dict[str, Any]:
    """JSON part for the grid: each query row of query_x [Q, D] with its top-k rows of bank_x
    [N, D] by cosine similarity. ``*_image(row)`` -> uint8 [C, H, W]; labels are class names."""
    from wildsight.eval.knn import nearest_neighbours

    sims, idx = nearest_neighbours(bank_x, query_x, k=min(k, bank_x.shape[0]))  # [Q, k] each
    queries = []
    for q in range(query_x.shape[0]):
        neighbours = [
            {"row": int(j), "label": bank_labels[int(j)], "similarity": float(s),
             "image": png_data_uri(bank_image(int(j)))}
            for s, j in zip(sims[q].tolist(), idx[q].tolist(), strict=True)
        ]  # fmt: skip
        queries.append({"row": q, "label": query_labels[q], "image": png_data_uri(query_image(q)),
                        "neighbours": neighbours})  # fmt: skip
    return {**meta, "queries": queries}


# -- helpers -------------------------------------------------------------------------------------
def _image_cell(item: Mapping[str, Any], caption: str, hit: bool | None = None) -> str:
    frame = "" if hit is None else (" hit" if hit else " miss")
    return (
        f'<td class="cell{frame}"><img src="{item["image"]}" alt="{escape(str(item["label"]))}">'
        f'<div>{escape(str(item["label"]))}</div><div class="sim">{escape(caption)}</div></td>'
    )


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = [c for c in ROW_COLUMNS if any(c in r for r in rows)]
    columns += [
        c for r in rows for c in r if c not in columns and not isinstance(r[c], dict | list)
    ]
    columns = list(dict.fromkeys(columns))
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_show(c, r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _show(column: str, value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show(k, v)}" for k, v in value.items())
    if isinstance(value, float) and column in ("mean", "std", "min", "max") and 0 <= value <= 1:
        return f"{100 * value:.1f}%"
    if value is None:
        return ""
    return _cell(column, value)


def _describe(meta: Mapping[str, Any]) -> str:
    parts = []
    for key, value in meta.items():
        if isinstance(value, float) and math.isfinite(value):
            value = f"{value:.1f}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:17px;border-bottom:1px solid #ccc;margin-top:28px}h3{font-size:14px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
.row{display:flex;flex-wrap:wrap;gap:12px}.meta{color:#555;font-size:12px}
table.grid td{border:none;padding:2px;text-align:center;font-size:10px;vertical-align:top}
.cell img{width:64px;height:64px;image-rendering:pixelated;border:3px solid #fff}
.hit img{border-color:#2ca02c}.miss img{border-color:#d62728}.sim{color:#777}
"""
