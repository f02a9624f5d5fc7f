"""Label efficiency of a pretrained run: low-shot fine-tuning (pretrained vs random init, the same
class-balanced subsets, several seeds), then SimCLR v2's distillation of a teacher fine-tuned on each
label fraction on the unlabelled training images. Prints one table, writes the JSON documents and
the accuracy-vs-label-fraction picture (SVG) the README shows.

    .venv/bin/python benchmarks/lowshot.py --checkpoint runs/demo          # ~75 min, one thread
    .venv/bin/python benchmarks/lowshot.py --from runs/lowshot             # table + SVG again

One fraction per process splits it over cores (or machines); --from merges the folders:
    taskset -c 0 ... lowshot.py --fractions 0.01 --teacher-fractions 0.01 --out runs/ls_1
    taskset -c 1 ... lowshot.py --fractions 0.1 --teacher-fractions 0.1 --out runs/ls_10
    .venv/bin/python benchmarks/lowshot.py --from runs/ls_1 runs/ls_10 --svg ... --json ...
A later folder's rows replace an earlier one's for the same (model, fraction), e.g. 1% again with
--self-train (its fine-tuned rows are the reference of its self-trained ones, one command):
    ... lowshot.py --fractions 0.01 --teacher-fractions --self-train --out runs/ls_st
    .venv/bin/python benchmarks/lowshot.py --from runs/lowshot runs/ls_st
--from also takes a file: this script's --json output or an `eval lowshot --json` document.

The steps are the CLI's, so a user reproduces any one of them alone:
    wildsight eval lowshot --checkpoint RUN --train fmnist:train --test fmnist:test --seeds 3
    wildsight eval finetune --checkpoint RUN ... --fraction 0.1 --seed 0 --save OUT/teacher_0.1
    wildsight distill --teacher OUT/teacher_0.1 --unlabelled fmnist:train --test fmnist:test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wildsight import api
from wildsight.eval import format_table
from wildsight.eval.selftrain import DEFAULT_SELF_TRAIN
from wildsight.eval.svg import plot_label_fraction
from wildsight.fileio import write_atomically, write_json

STUDENT = "distilled student (teacher seed 0)"


def run(args: argparse.Namespace, out: Path) -> dict:
    self_training = DEFAULT_SELF_TRAIN if args.self_train else None
    docs: dict = {"lowshot": api.eval_lowshot(args.checkpoint, args.train, args.test,
                                              fractions=args.fractions, seeds=args.seeds,
                                              self_training=self_training,
                                              json_path=out / "lowshot.json"),
                  "distill": []}  # fmt: skip
    for fraction in args.teacher_fractions:
        teacher_dir = out / f"teacher_{fraction:g}"
        teacher = api.eval_finetune(
            args.checkpoint, args.train, args.test, fraction=fraction, seed=0,
            json_path=out / f"teacher_{fraction:g}.json", save_dir=teacher_dir,
        )  # fmt: skip
        student = api.distill(teacher_dir, args.train, args.test,
                              json_path=out / f"distill_{fraction:g}.json")  # fmt: skip
        docs["distill"].append({"fraction": fraction, "teacher": teacher, "student": student})
    return docs


def load(out: Path) -> dict:
    """The documents of an earlier run in OUT (lowshot.json, teacher_F.json, distill_F.json), or
    OUT a JSON file: this script's --json output, or one `eval lowshot --json` document."""
    if out.is_file():
        try:
            doc = json.loads(out.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SystemExit(
                f"{out} is not a JSON document ({e}); pass a folder or a --json file"
            ) from None
        if isinstance(doc, dict) and isinstance(doc.get("lowshot"), dict):
            return {"lowshot": doc["lowshot"], "distill": doc.get("distill") or []}
        if isinstance(doc, dict) and doc.get("protocol") == "lowshot":
            return {"lowshot": doc, "distill": []}
        raise SystemExit(f"{out} holds neither this script's --json output nor an `eval lowshot` "
                         "result; pass a folder or such a file")  # fmt: skip
    if not (out / "lowshot.json").is_file():
        raise SystemExit(f"{out} has no lowshot.json; run without --from")
    docs: dict = {"lowshot": json.loads((out / "lowshot.json").read_text()), "distill": []}
    for path in sorted(out.glob("distill_*.json"), key=lambda q: float(q.stem.split("_", 1)[1])):
        fraction = path.stem.split("_", 1)[1]
        teacher = out / f"teacher_{fraction}.json"
        if not teacher.is_file():
            raise SystemExit(f"{path} has no {teacher.name} beside it; run without --from")
        docs["distill"].append({"fraction": float(fraction),
                                "teacher": json.loads(teacher.read_text()),
                                "student": json.loads(path.read_text())})  # fmt: skip
    return docs


SAME = ("checkpoint", "checkpoint_step", "train", "test", "evaluation", "keep_head_layers",
        "finetune")  # fmt: skip


# fine-tuning fields added after older documents were written, with the value those runs used
ADDED_LATER = {"warmup_fraction": 0.0}


def _same(doc: dict, key: str) -> object:
    value = doc.get(key)
    return {**ADDED_LATER, **value} if key == "finetune" and isinstance(value, dict) else value


def merge(parts: list[dict], log=print) -> dict:  # noqa: ANN001
    """The documents of several folders as one run's: the same checkpoint, sources and
    fine-tuning settings. A (model, fraction) measured in several folders is taken from the
    LAST one (its rows come from one command, e.g. a later run with --self-train whose fine-tuned
    rows are the reference of its self-trained ones); a teacher fraction must be measured once."""
    first = parts[0]["lowshot"]
    for part in parts[1:]:
        differ = [k for k in SAME if _same(part["lowshot"], k) != _same(first, k)]
        if differ:
            raise SystemExit(f"--from folders differ in {differ}: merge runs of one protocol only")
    teachers = [d["fraction"] for part in parts for d in part["distill"]]
    if len(set(teachers)) != len(teachers):
        raise SystemExit(f"--from folders measure a teacher fraction twice: {sorted(teachers)}")
    owner: dict[tuple[str, float], int] = {}  # (model, fraction) -> the part that supplies it
    for i, part in enumerate(parts):
        for r in part["lowshot"]["rows"]:
            key = (r["model"], r["fraction"])
            if key in owner and owner[key] != i:
                log(f"{r['model']} at {r['fraction']:g}: rows of --from folder {i + 1} replace "
                    f"folder {owner[key] + 1}'s")  # fmt: skip
            owner[key] = i
    rows = [r for i, part in enumerate(parts) for r in part["lowshot"]["rows"]
            if owner[(r["model"], r["fraction"])] == i]  # fmt: skip
    runs = [r for i, part in enumerate(parts) for r in part["lowshot"]["runs"]
            if owner.get((r["model"], r["fraction"])) == i]  # fmt: skip
    lowshot = {**first, "fractions": sorted({f for p in parts for f in p["lowshot"]["fractions"]}),
               "rows": sorted(rows, key=lambda r: (r["fraction"], r["model"] != "pretrained",
                                                   r["model"])),
               "runs": runs, "self_training": next((p["lowshot"].get("self_training") for p in parts
                                                    if p["lowshot"].get("self_training")), None),
               "elapsed_s": sum(part["lowshot"]["elapsed_s"] for part in parts)}  # fmt: skip
    distill = sorted((d for part in parts for d in part["distill"]), key=lambda d: d["fraction"])
    return {"lowshot": lowshot, "distill": distill}


def rows(docs: dict) -> list[dict]:
    """One row per (model, fraction): the low-shot means, then each teacher and its student."""
    out = [{"model": r["model"], "fraction": r["fraction"], "num_labels": r["num_labels"],
            "seeds": r["seeds"], "mean": r["mean"], "std": r["std"]}
           for r in docs["lowshot"]["rows"]]  # fmt: skip
    for d in docs["distill"]:
        n = d["teacher"]["labels"]["num_labels"]
        s = d["student"]
        out += [{"model": "teacher (fine-tuned, seed 0)", "fraction": d["fraction"], "num_labels": n,
                 "seeds": 1, "mean": s["teacher_top1"], "std": 0.0},
                {"model": STUDENT, "fraction": d["fraction"], "num_labels": n, "seeds": 1,
                 "mean": s["top1"], "std": 0.0, "agreement": s.get("agreement")}]  # fmt: skip
    return out


def table(docs: dict) -> str:
    shown = [{**r, "labels": f"{r['fraction']:g} ({r['num_labels']:,})", "mean_top1": r["mean"],
              **({"std_top1": r["std"]} if r["seeds"] > 1 else {})} for r in rows(docs)]  # fmt: skip
    title = (f"{docs['lowshot']['checkpoint']} (step {docs['lowshot']['checkpoint_step']}): "
             f"{docs['lowshot']['train']} -> {docs['lowshot']['test']}")  # fmt: skip
    return format_table(shown, ["model", "labels", "seeds", "mean_top1", "std_top1"], title=title)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/demo", help="a pretrain run directory")
    p.add_argument("--train", default="fmnist:train")
    p.add_argument("--test", default="fmnist:test")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--teacher-fractions",
        type=float,
        nargs="*",
        default=[0.01, 0.1],
        help="label fractions of the teachers distilled (seed 0 subsets)",
    )
    p.add_argument("--out", default="runs/lowshot", help="folder of the JSON files and teacher")
    p.add_argument(
        "--from",
        dest="from_dirs",
        nargs="+",
        metavar="DIR",
        help="only rebuild the table and SVG from these folders or --json files (merged)",
    )
    p.add_argument(
        "--self-train",
        action="store_true",
        help="then self-train every fine-tuned model (FixMatch pseudo-labels), rows '+ self-training'",
    )
    p.add_argument("--svg", default=None, help="default: OUT/lowshot.svg")
    p.add_argument("--json", default=None, help="the three documents in one file; default: none")
    args = p.parse_args(argv)
    first = Path(args.from_dirs[0]) if args.from_dirs else None
    out = Path(args.out) if first is None else first.parent if first.is_file() else first
    docs = merge([load(Path(d)) for d in args.from_dirs]) if args.from_dirs else run(args, out)
    print(table(docs))
    svg = Path(args.svg or out / "lowshot.svg")
    picture = [r for r in rows(docs) if not r["model"].startswith("teacher")]  # = seed 0's run
    write_atomically(svg, plot_label_fraction(picture))
    print(f"wrote {svg}" + ("" if args.from_dirs else f" and the JSON documents in {out}"))
    if args.json:
        write_json(args.json, docs)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
