"""The last stage of benchmarks/gpu_check.sh: one JSON and one table from what the stages left.

    python benchmarks/gpu_check_report.py --stages WORK/stages.tsv --work WORK --json OUT/gpu_check.json

Reads the stage statuses (name, status, seconds, detail: tab-separated), the GPU stage's and the
test stage's logs, and the JSON the two benchmarks wrote (WORK/kernels.json, WORK/train.json),
whichever exist: a stage that failed or never ran leaves its part empty, never invented.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lime.files import read_json, write_json  # noqa: E402


def read_text(path: str) -> str:
    return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""


def stage_rows(path: str) -> list[dict[str, Any]]:
    rows = []
    for line in read_text(path).splitlines():
        name, status, seconds, detail = (line.split("\t") + ["", "", "", ""])[:4]
        rows.append({"stage": name, "status": status, "seconds": int(seconds or 0), "detail": detail})
    return rows


def test_summary(log: str) -> str | None:
    """pytest's closing line ("12 passed, 3 skipped in 40.1s"), if the tests ran."""
    lines = [line.strip("= ") for line in log.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    return lines[-1] if lines else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", required=True, help="the stage status file (tab-separated)")
    parser.add_argument("--work", required=True, help="the folder the stages wrote into")
    parser.add_argument("--json", required=True, help="write the combined results here")
    parser.add_argument("--dry-run", default="0", help="1 when gpu_check.sh ran with --dry-run")
    args = parser.parse_args(argv)

    stages = stage_rows(args.stages)
    gpu_log = read_text(os.path.join(args.work, "gpu.log")).strip()
    results: dict[str, Any] = {
        "dry_run": args.dry_run == "1",
        "gpu": gpu_log.splitlines()[-1] if gpu_log else None,
        "stages": stages,
        "tests": test_summary(read_text(os.path.join(args.work, "tests.log"))),
        "kernels": None,
        "train": None,
    }
    for part in ("kernels", "train"):
        path = os.path.join(args.work, f"{part}.json")
        if os.path.exists(path):
            results[part] = read_json(path)
    write_json(args.json, results)

    print(f"\n==== GPU check{' (dry run)' if results['dry_run'] else ''}: {results['gpu'] or 'no GPU stage output'}")
    print(f"{'stage':<12} {'status':<8} {'s':>4}  detail")
    for row in stages:
        print(f"{row['stage']:<12} {row['status']:<8} {row['seconds']:>4}  {row['detail']}")
    if results["tests"]:
        print(f"tests: {results['tests']}")
    kernels = results["kernels"]
    if kernels:
        print(f"kernels on {kernels['device']} (torch {kernels['torch']}, {kernels['kernels']}): GB/s and "
              f"fraction of a same-size copy")
        print(f"  {'op':<14} {'implementation':<28} {'fwd':>12} {'bwd':>12} {'fwd+bwd':>12}")
        for table, entry in kernels["tables"].items():
            for row in entry["implementations"]:
                cells = "".join(f" {row[f'{phase} GB/s']:6.0f} ({row[f'{phase} of copy']:.2f})"
                                for phase in ("forward", "backward", "forward+backward"))
                print(f"  {table:<14} {row['implementation']:<28}{cells}")
    train = results["train"]
    if train:
        print(f"{train['model']} training on {train['gpu']} (torch {train['torch']}): bf16 {train['matmul_size']}^3 matmul "
              f"{train['matmul_tflops']:.0f} TFLOP/s, datasheet {train['datasheet_peak_tflops']} TFLOP/s")
        print(f"  {'run':<26} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU sheet':>9} {'MFU mm':>7} {'mem GiB':>8}")
        for name, row in train["runs"].items():
            if "error" in row:
                print(f"  {name:<26} {row['error']}")
                continue
            sheet = f"{100 * row['mfu_datasheet']:.1f}%" if row["mfu_datasheet"] else "n/a"
            print(f"  {name:<26} {row['tokens_per_second']:9.0f} {row['tflops']:8.1f} {sheet:>9} "
                  f"{100 * row['mfu_measured_matmul']:6.1f}% {row['peak_memory_gib']:8.1f}")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
