"""Build the Meta-VQA suite from VQA v2 files: `python -m pipelines.build_metavqa --questions ... --out DIR`.

Writes `<out>/metavqa.jsonl` (a task file, docs/task_file.md) and `<out>/summary.json`; see docs/metavqa.md.
Every input problem fails before anything is written to --out.
"""
from __future__ import annotations

import argparse
import os

from orchestrator.storage.atomic import write_json
from pipelines.core.cli import guarded
from pipelines.suites import SuiteError, write_task_file
from pipelines.suites.metavqa import DEFAULT_SEED, build_metavqa

TASK_FILE = "metavqa.jsonl"
SUMMARY_FILE = "summary.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.build_metavqa", description=__doc__.splitlines()[0])
    p.add_argument("--questions", nargs="+", required=True, metavar="Q.json",
                   help="VQA v2 questions files, e.g. v2_OpenEnded_mscoco_train2014_questions.json and the val2014 one")
    p.add_argument("--annotations", nargs="+", required=True, metavar="A.json",
                   help="their annotations files (paired by data_subtype), e.g. v2_mscoco_train2014_annotations.json")
    p.add_argument("--images", nargs="+", required=True, metavar="DIR",
                   help="folders of COCO_<subtype>_<12-digit id>.jpg images, e.g. COCO train2014/ and val2014/")
    p.add_argument("--out", required=True, help=f"output folder for {TASK_FILE} and {SUMMARY_FILE}")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of both splits (default {DEFAULT_SEED}, the paper's)")
    p.add_argument("--prompts", default=None, metavar="FILE.json",
                   help='JSON object question -> answer template with one "{}", overriding the built-in rules')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suite, summary = build_metavqa(args.questions, args.annotations, args.images, args.seed, args.prompts)
    out = os.path.abspath(args.out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SuiteError(f"cannot create output folder {out} ({e.strerror}); pass --out a writable folder") from None
    task_file = write_task_file(suite, os.path.join(out, TASK_FILE))
    write_json(os.path.join(out, SUMMARY_FILE), summary)
    t, s = summary["tasks"], summary["samples"]
    print(f"wrote {t['total']} tasks ({t['meta_train']} meta-train, {t['meta_test']} meta-test; "
          "the paper: 870 and 373) "
          f"and {s['total']} samples to {task_file}; summary in {os.path.join(out, SUMMARY_FILE)}")
    return 0


if __name__ == "__main__":
    guarded(main)()
