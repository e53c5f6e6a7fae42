"""The report of benchmarks/gpu_check.sh, rewritten after every stage: one JSON and the tables, ours / peer per row.

    python benchmarks/gpu_check_report.py --stages WORK/stages.tsv --work WORK --results OUT

Reads the stage statuses (name, status, seconds, detail: tab-separated), the GPU stage's and the test stage's logs
(in WORK), and the JSON the benchmarks wrote into the results folder (kernels.json, train.json, peer.json),
whichever exist: a stage that failed or never ran leaves its part empty, never invented. Writes
OUT/gpu_check.json and OUT/gpu_check.txt (the tables, also printed). Plain Python: no torch import, so it
costs a fraction of a second after each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any


def read_text(path: str) -> str:
    return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""


def read_json(path: str) -> dict[str, Any] | None:
    """A benchmark's JSON, or None when it is missing or cut short (a stage killed mid-write)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: str, value: Any) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
    os.replace(temporary, path)


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


def figure(row: dict[str, Any] | None) -> str:
    """tokens/s (MFU; peak GiB) of one row, or why there is none."""
    if row is None:
        return "-"
    if "error" in row:
        return row["error"][:60]
    mfu = f"{100 * row['mfu_datasheet']:.1f}%" if row.get("mfu_datasheet") else "MFU n/a"
    memory = f"{row['peak_memory_gib']:.1f} GiB" if row.get("peak_memory_gib") is not None else "mem n/a"
    return f"{row['tokens_per_second']:,.0f} ({mfu}; {memory})"


def row_order(name: str, row: dict[str, Any]) -> tuple:
    """Eager before compile, pretraining before packed SFT, then by sequences per step and micro-batch size."""
    if "micro_batch_size" not in row:  # an error line of a whole mode
        return (name.split()[0] != "eager", 2, 0, 0, name)
    return (row["mode"] != "eager", row["batch"] != "pretrain", row["micro_batch_size"] * row["accumulation"],
            row["micro_batch_size"], name)


def side_by_side(train: dict[str, Any] | None, peer: dict[str, Any] | None) -> list[str]:
    """One markdown row per configuration either benchmark ran: ours, the peer, ours / peer."""
    ours_runs = (train or {}).get("runs", {})
    peer_runs = (peer or {}).get("runs", {})
    names = sorted(set(ours_runs) | set(peer_runs), key=lambda name: row_order(name, ours_runs.get(name)
                                                                               or peer_runs.get(name)))
    lines = ["| row (kind mbMICROxSTEPS mode) | ours: tokens/s (MFU; peak memory) | peer | ours / peer |",
             "|---|---|---|---|"]
    for name in names:
        ours, theirs = ours_runs.get(name), peer_runs.get(name)
        ratio = "-"
        if ours and theirs and "error" not in ours and "error" not in theirs:
            ratio = f"{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}"
        lines.append(f"| {name} | {figure(ours)} | {figure(theirs)} | {ratio} |")
    return lines


def tables(results: dict[str, Any]) -> str:
    out = [f"==== GPU check{' (dry run)' if results['dry_run'] else ''}: {results['gpu'] or 'no GPU stage output'}",
           f"{'stage':<12} {'status':<8} {'s':>4}  detail"]
    for row in results["stages"]:
        out.append(f"{row['stage']:<12} {row['status']:<8} {row['seconds']:>4}  {row['detail']}")
    if results["tests"]:
        out.append(f"tests: {results['tests']}")
    kernels = results["kernels"]
    if kernels and kernels.get("tables"):
        out.append(f"kernels on {kernels.get('device')} (torch {kernels.get('torch')}, {kernels.get('kernels')}): GB/s "
                   f"and fraction of a same-size copy")
        out.append(f"  {'op':<14} {'implementation':<28} {'fwd':>12} {'bwd':>12} {'fwd+bwd':>12}")
        for table, entry in kernels["tables"].items():
            for row in entry.get("implementations", []):
                try:
                    cells = "".join(f" {row[f'{phase} GB/s']:6.0f} ({row[f'{phase} of copy']:.2f})"
                                    for phase in ("forward", "backward", "forward+backward"))
                except (KeyError, TypeError, ValueError):
                    cells = " (figures in kernels.json)"
                out.append(f"  {table:<14} {row.get('implementation', '?'):<28}{cells}")
    train, peer = results["train"], results["peer"]
    if train or peer:
        head = train or peer
        model = (train or {}).get("model", "lime")
        peak = head.get("datasheet_peak_tflops") or "unknown"
        versions = f"torch {head.get('torch')}" + (f", transformers {peer.get('transformers')}" if peer else "")
        matmul = f"; bf16 matmul {train['matmul_tflops']:.0f} TFLOP/s" if train and train.get("matmul_tflops") else ""
        out.append(f"\n{model} training, seq {head.get('seq_length')}, on {head.get('gpu')} ({versions}): tokens/s "
                   f"over every position; MFU of the datasheet's {peak} TFLOP/s with {model}'s 6N + 12 L d s for both"
                   + matmul)
        out += side_by_side(train, peer)
    for name, profile in ((train or {}).get("profiles") or {}).items():
        idle = profile.get("device_idle_share")
        syncs = profile.get("host_syncs_per_step")
        out.append(f"profile {name}: {1e3 * profile['wall_seconds_per_step']:.1f} ms/step"
                   + (f", GPU idle {100 * idle:.1f}%" if idle is not None else "")
                   + (", host syncs per step " + ", ".join(f"{k} {v:g}" for k, v in syncs.items()) if syncs else "")
                   + " (top kernels: profile_ours.md)")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", required=True, help="the stage status file (tab-separated)")
    parser.add_argument("--work", required=True, help="the folder holding the stages' logs")
    parser.add_argument("--results", required=True, help="the results folder: reads the benchmarks' JSON, writes "
                                                         "gpu_check.json and gpu_check.txt")
    parser.add_argument("--dry-run", default="0", help="1 when gpu_check.sh ran with --dry-run")
    args = parser.parse_args(argv)

    gpu_log = read_text(os.path.join(args.work, "gpu.log")).strip()
    results: dict[str, Any] = {
        "dry_run": args.dry_run == "1",
        "gpu": gpu_log.splitlines()[-1] if gpu_log else None,
        "stages": stage_rows(args.stages),
        "tests": test_summary(read_text(os.path.join(args.work, "tests.log"))),
    }
    for part in ("kernels", "train", "peer"):
        results[part] = read_json(os.path.join(args.results, f"{part}.json"))
    text = tables(results)
    results["side_by_side"] = side_by_side(results["train"], results["peer"])
    write_json(os.path.join(args.results, "gpu_check.json"), results)
    with open(os.path.join(args.results, "gpu_check.txt"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text + f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
