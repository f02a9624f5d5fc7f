"""The HTML report: one self-contained file (no script, no external URL, images as data URIs)
with every section its JSON results call for; SVG plots that put the numbers where they belong."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wildsight.eval.html import (
    build_report,
    load_results,
    neighbour_doc,
    pick_queries,
    png_data_uri,
    save_result,
    write_report,
)
from wildsight.eval.svg import heatmap, nice_ticks, plot_label_fraction

SVG_NS = "http://www.w3.org/2000/svg"


def decode_png(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def fake_run(tmp_path: Path) -> Path:
    """A run directory with metrics.jsonl and three results: layers, low-shot, neighbours."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": s, "loss": 6.0 - s, "lr": 0.1 * s, "images_per_s": 500.0 + s} for s in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = [{"features": "pretrained", "layer": layer, "top1": top1, "val_top1": 0.5,
             "params": {"l2": 1e-4}} for layer, top1 in [("stage1", 0.6), ("stage2", 0.7),
                                                        ("pre_logits", 0.85)]]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(0, 256, (12, 3, 8, 8), generator=g, dtype=torch.uint8)
    grid = neighbour_doc(
        torch.randn(12, 4, generator=g), torch.randn(2, 4, generator=g),
        bank_labels=["a", "b"] * 6, query_labels=["a", "b"], bank_image=lambda i: bank[i],
        query_image=lambda q: bank[q], layer="pre_logits", train="tr", test="te",
    )  # fmt: skip
    save_result(run, "linear-layers", {"protocol": "linear", "rows": rows, "top1": 0.85,
                                       "confusion": {"labels": ["a", "b"], "counts": [[5, 1], [2, 7]]},
                                       "neighbours": grid})  # fmt: skip
    lowshot = [{"fraction": f, "model": m, "mean": a, "std": 0.01} for f, m, a in
               [(0.01, "pretrained", 0.8), (0.1, "pretrained", 0.88),
                (0.01, "random init", 0.7), (0.1, "random init", 0.8)]]  # fmt: skip
    save_result(run, "lowshot", {"protocol": "lowshot", "rows": lowshot})
    return run


def test_report_is_self_contained_with_every_section(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    html = (run / "report.html").read_text()
    for section in ("training", "results", "layers", "label-fraction", "confusion", "neighbours"):
        assert f'id="{section}"' in html, section
    # Nothing is fetched: no script, stylesheet link or import; every URL is the SVG namespace.
    assert not re.search(r"<script|<link|@import|<iframe", html, re.I)
    assert set(re.findall(r"https?://[^\"'\s)]*", html)) <= {SVG_NS}
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert len(sources) == 2 * (1 + 8) and all(
        s.startswith("data:image/png;base64,") for s in sources
    )
    for uri in sources:
        assert decode_png(uri).shape[:2] == (8, 8)
    assert html.count("<svg") == 3 + 1 + 1 + 1  # loss/lr/throughput, layers, fractions, confusion
    assert "85.0%" in html and "stage2" in html  # the table shows the rows
    # The page is a function of the files: rebuilding gives the same bytes.
    assert build_report(run) == html
    assert write_report(run, tmp_path / "copy.html").read_text() == html
    assert [d["name"] for d in load_results(run)] == ["linear-layers", "lowshot"]


def test_a_run_without_results_still_gets_a_page(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        write_report(tmp_path)  # an empty folder is not a run: nothing is written into it
    assert not (tmp_path / "report.html").exists()
    (tmp_path / "config.yaml").write_text("{}\n")  # what a pretrain run writes first
    html = write_report(tmp_path).read_text()
    assert "No evaluation results yet" in html and "No metrics.jsonl" in html
    with pytest.raises(FileNotFoundError, match="no run directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(ValueError, match="'protocol' and a list of 'rows'"):
        save_result(tmp_path, "x", {"rows": []})
    with pytest.raises(ValueError, match="plain file stem"):
        save_result(tmp_path, "../x", {"protocol": "knn", "rows": []})


def circles(svg: str) -> list[tuple[float, float, str]]:
    found = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="[\d.]+" fill="([^"]+)"', svg)
    return [(float(x), float(y), color) for x, y, color in found]


def test_label_fraction_plot_places_the_points() -> None:
    rows = [{"fraction": f, "model": m, "mean": a, "std": s} for f, m, a, s in
            [(0.1, "ssl", 0.9, 0.01), (0.01, "ssl", 0.85, 0.02), (1.0, "ssl", 0.93, 0.0),
             (0.01, "random", 0.7, 0.03), (0.1, "random", 0.8, 0.0), (1.0, "random", 0.91, 0.0)]]  # fmt: skip
    svg = plot_label_fraction(rows)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<polyline") == 2 and ">ssl<" in svg and ">random<" in svg
    points = circles(svg)
    by_color: dict[str, list[tuple[float, float]]] = {}
    for x, y, color in points:
        by_color.setdefault(color, []).append((x, y))
    ssl, random = by_color.values()
    # log x: 0.01 -> 0.1 -> 1 equally spaced; higher accuracy = higher on the page (smaller y)
    xs = [x for x, _ in ssl]
    assert xs == sorted(xs) and xs[1] - xs[0] == pytest.approx(xs[2] - xs[1], abs=0.2)
    assert [y for _, y in ssl] == sorted((y for _, y in ssl), reverse=True)
    assert all(ys < yr for (_, ys), (_, yr) in zip(ssl, random, strict=True))
    # y is linear in the accuracy: equal accuracy gaps give equal pixel gaps
    (_, y85), (_, y90), _ = ssl
    (_, y70), (_, y80), _ = random
    assert (y70 - y80) == pytest.approx(2 * (y85 - y90), abs=0.2)
    assert svg.count("<line") - svg.count('stroke="#eee"') == 3  # error bars where std > 0


def test_heatmap_writes_every_count_and_nice_ticks_are_round() -> None:
    svg = heatmap([[3, 0], [12, 40]], ["cat", "dog"], title="t")
    assert ">3<" in svg and ">12<" in svg and ">40<" in svg and ">0<" not in svg
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.71, 0.93) == [0.75, 0.8, 0.85, 0.9]
    assert nice_ticks(2.0, 2.0) == [2.0]


def test_png_data_uri_round_trips_grey_and_colour() -> None:
    g = torch.Generator().manual_seed(1)
    colour = torch.randint(0, 256, (3, 5, 7), generator=g, dtype=torch.uint8)
    assert np.array_equal(decode_png(png_data_uri(colour)), colour.permute(1, 2, 0).numpy())
    grey = colour[:1].expand(3, 5, 7)
    assert np.array_equal(decode_png(png_data_uri(grey)), colour[0].numpy())  # one channel
    assert decode_png(png_data_uri(grey, scale=3)).shape == (15, 21)


def test_neighbour_doc_and_query_choice() -> None:
    labels = torch.tensor([2, 2, 0, 1, 0, 2, 1, 1, 0, 2])
    assert pick_queries(labels, count=5) == [2, 3, 0, 1, 4]  # first of classes 0, 1, 2, then on
    assert pick_queries(labels, count=2) == [2, 3]
    bank_x = torch.eye(4)  # query 0 = [1, 1, 0, 0]: neighbours 0 and 1 (cos 0.71), then 2, 3
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2) * 60
    doc = neighbour_doc(
        bank_x, torch.tensor([[1.0, 1.0, 0.0, 0.0]]), bank_labels=list("wxyz"), query_labels=["q"],
        bank_image=lambda i: images[i], query_image=lambda q: images[3], k=3, layer="L",
    )  # fmt: skip
    assert doc["layer"] == "L" and len(doc["queries"]) == 1
    found = doc["queries"][0]["neighbours"]
    assert {n["row"] for n in found[:2]} == {0, 1} and found[2]["similarity"] == pytest.approx(0)
    assert found[0]["similarity"] == pytest.approx(2**-0.5)
    for n in found:
        assert n["label"] == "wxyz"[n["row"]]
        assert decode_png(n["image"]).max() == 60 * n["row"]
    assert decode_png(doc["queries"][0]["image"]).max() == 180
