"""Label efficiency of a pretrained run: low-shot fine-tuning (pretrained vs random init, the same
class-balanced subsets, several seeds), then SimCLR v2's distillation of the 10%-label teacher on
the unlabelled training images. Prints one table, writes one JSON file and the accuracy-vs-label-
fraction picture (SVG) the README shows.

    .venv/bin/python benchmarks/lowshot.py --checkpoint runs/demo          # ~45 min on 2 cores
    .venv/bin/python benchmarks/lowshot.py --from runs/lowshot             # table + SVG again

The three steps are the CLI's, so a user reproduces any one of them alone:
    wildsight eval lowshot --checkpoint RUN --train fmnist:train --test fmnist:test --seeds 3
    wildsight eval finetune --checkpoint RUN ... --fraction 0.1 --seed 0 --save OUT/teacher
    wildsight distill --teacher OUT/teacher --unlabelled fmnist:train --test fmnist:test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wildsight import api
from wildsight.eval import format_table
from wildsight.eval.svg import plot_label_fraction
from wildsight.fileio import write_atomically

STEPS = ("lowshot", "teacher", "distill")


def run(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    docs = {"lowshot": api.eval_lowshot(args.checkpoint, args.train, args.test,
                                        fractions=args.fractions, seeds=args.seeds,
                                        json_path=out / "lowshot.json")}  # fmt: skip
    docs["teacher"] = api.eval_finetune(
        args.checkpoint, args.train, args.test, fraction=args.teacher_fraction, seed=0,
        json_path=out / "teacher.json", save_dir=out / "teacher",
    )  # fmt: skip
    docs["distill"] = api.distill(out / "teacher", args.train, args.test,
                                  json_path=out / "distill.json")  # fmt: skip
    return docs


def table(docs: dict[str, dict]) -> str:
    rows = [{"model": r["model"], "labels": f"{r['fraction']:g} ({r['num_labels']:,})",
             "seeds": r["seeds"], "mean_top1": r["mean"], "std_top1": r["std"]}
            for r in docs["lowshot"]["rows"]]  # fmt: skip
    d = docs["distill"]
    fraction = docs["teacher"]["labels"]["fraction"]
    rows += [{"model": "teacher (fine-tuned, seed 0)", "labels": f"{fraction:g}", "seeds": 1,
              "mean_top1": d["teacher_top1"]},
             {"model": "student (distilled, no labels)", "labels": "0", "seeds": 1,
              "mean_top1": d["top1"]}]  # fmt: skip
    title = (f"{docs['lowshot']['checkpoint']} (step {docs['lowshot']['checkpoint_step']}): "
             f"{docs['lowshot']['train']} -> {docs['lowshot']['test']}")  # fmt: skip
    return format_table(rows, ["model", "labels", "seeds", "mean_top1", "std_top1"], title=title)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/demo", help="a pretrain run directory")
    p.add_argument("--train", default="fmnist:train")
    p.add_argument("--test", default="fmnist:test")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--teacher-fraction", type=float, default=0.1)
    p.add_argument("--out", default="runs/lowshot", help="folder of the JSON files and teacher")
    p.add_argument("--from", dest="from_dir", help="only rebuild the table and SVG from a folder")
    p.add_argument("--svg", default=None, help="default: OUT/lowshot.svg")
    p.add_argument("--json", default=None, help="the three documents in one file; default: none")
    args = p.parse_args(argv)
    out = Path(args.from_dir or args.out)
    if args.from_dir:
        missing = [s for s in STEPS if not (out / f"{s}.json").is_file()]
        if missing:
            p.error(f"{out} lacks {', '.join(f'{s}.json' for s in missing)}; run without --from")
        docs = {s: json.loads((out / f"{s}.json").read_text()) for s in STEPS}
    else:
        docs = run(args, out)
    print(table(docs))
    svg = Path(args.svg or out / "lowshot.svg")
    write_atomically(svg, plot_label_fraction(docs["lowshot"]["rows"]))
    print(f"wrote {svg} and {out}/{{{','.join(STEPS)}}}.json")
    if args.json:
        write_atomically(args.json, json.dumps(docs, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
