"""The report of gpu_check/gpu_check.sh, rewritten after every stage: one JSON and the tables, ours / peer per row
and precision.

    python gpu_check/gpu_check_report.py --stages WORK/stages.tsv --work WORK --results OUT

Reads the stage statuses (name, status, seconds, detail: tab-separated), the GPU stage's and the test stage's logs
(in WORK), and the JSON the benchmarks wrote into the results folder (kernels.json, train.json, peer.json,
profile.json), whichever exist: a stage that failed or never ran leaves its part empty, never invented. Writes
OUT/gpu_check.json and OUT/gpu_check.txt (the tables, also printed). Plain Python: no torch import, so it
costs a fraction of a second after each stage.

gpu_check.json's "ours_over_peer" holds the comparison as numbers: one entry per row of ours (each precision) with
the peer's row of the same batch kind, shape and mode: ours' and the peer's tokens/s, MFU and peak memory, their
ratio (None when either has no figure), and either's error ("oom": true when it did not fit in memory).
"ours_over_peer_by_row" is the same ratios as {row: {precision: ratio}}.
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
        return "OOM (out of memory)" if row.get("oom") else row["error"][:60]
    mfu = f"{100 * row['mfu_datasheet']:.1f}%" if row.get("mfu_datasheet") else "MFU n/a"
    memory = f"{row['peak_memory_gib']:.1f} GiB" if row.get("peak_memory_gib") is not None else "mem n/a"
    return f"{row['tokens_per_second']:,.0f} ({mfu}; {memory})"


def row_key(row: dict[str, Any]) -> str | None:
    """The peer's name of a row's configuration ("pretrain mb16x4 eager"): batch kind, shape, mode; no precision."""
    if "micro_batch_size" not in row:
        return None
    return f"{row['batch']} mb{row['micro_batch_size']}x{row['accumulation']} {row['mode']}"


def row_order(row: dict[str, Any]) -> tuple:
    """Pretraining before packed SFT, then by sequences per step and micro-batch size, eager before compile, then
    by precision (bf16, autocast, fp32); a whole process's error line last."""
    precision = ("bf16", "autocast", "fp32", None).index(row.get("precision")) if row.get("precision") in (
        "bf16", "autocast", "fp32", None) else 9
    if "micro_batch_size" not in row:
        return (2, 0, 0, row.get("mode") != "eager", precision)
    return (row["batch"] != "pretrain", row["micro_batch_size"] * row["accumulation"], row["micro_batch_size"],
            row["mode"] != "eager", precision)


def comparisons(train: dict[str, Any] | None, peer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One entry per row of ours, with the peer's row of the same configuration; then the peer's rows ours lacks."""
    ours_runs = (train or {}).get("runs", {})
    peer_runs = dict((peer or {}).get("runs", {}))
    entries = []

    def numbers(prefix: str, row: dict[str, Any] | None) -> dict[str, Any]:
        row = row or {}
        return {f"{prefix}_tokens_per_second": row.get("tokens_per_second"),
                f"{prefix}_mfu_datasheet": row.get("mfu_datasheet"),
                f"{prefix}_peak_memory_gib": row.get("peak_memory_gib"), f"{prefix}_error": row.get("error"),
                f"{prefix}_oom": bool(row.get("oom"))}

    matched = set()
    for name, ours in sorted(ours_runs.items(), key=lambda item: row_order(item[1])):
        key = row_key(ours)
        theirs = peer_runs.get(key) if key else None
        if key:
            matched.add(key)
        ratio = None
        if ours.get("tokens_per_second") and theirs and theirs.get("tokens_per_second"):
            ratio = ours["tokens_per_second"] / theirs["tokens_per_second"]
        entries.append({"row": key or name, "ours_row": name, "precision": ours.get("precision"),
                        **numbers("ours", ours), **numbers("peer", theirs), "ours_over_peer": ratio})
    for key, theirs in peer_runs.items():
        if key not in matched:
            entries.append({"row": key, "ours_row": None, "precision": None, **numbers("ours", None),
                            **numbers("peer", theirs), "ours_over_peer": None})
    return entries


def by_row(entries: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    result: dict[str, dict[str, float | None]] = {}
    for entry in entries:
        if entry["ours_row"] is not None and entry["precision"] is not None:
            result.setdefault(entry["row"], {})[entry["precision"]] = entry["ours_over_peer"]
    return result


def side_by_side(train: dict[str, Any] | None, peer: dict[str, Any] | None) -> list[str]:
    """One markdown row per row of ours (each precision) beside the peer's same configuration, ours / peer."""
    ours_runs = (train or {}).get("runs", {})
    peer_runs = (peer or {}).get("runs", {})
    lines = ["| row (kind mbMICROxSTEPS mode) | ours' precision | ours: tokens/s (MFU; peak memory) "
             "| peer (fp32 weights + autocast) | ours / peer |", "|---|---|---|---|---|"]
    for entry in comparisons(train, peer):
        ours = ours_runs.get(entry["ours_row"]) if entry["ours_row"] else None
        theirs = peer_runs.get(entry["row"])
        ratio = f"{entry['ours_over_peer']:.2f}" if entry["ours_over_peer"] is not None else "-"
        lines.append(f"| {entry['row']} | {entry['precision'] or '-'} | {figure(ours)} | {figure(theirs)} | {ratio} |")
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
        ours_setup = ""
        if train:
            ours_setup = (f"; ours: kernels {train.get('kernels')}, DeepSpeed config "
                          f"{os.path.basename(train.get('deepspeed_config_file') or 'none')}")
        out.append(f"\n{model} training, seq {head.get('seq_length')}, on {head.get('gpu')} ({versions}): tokens/s "
                   f"over every position; MFU of the datasheet's {peak} TFLOP/s with {model}'s 6N + 12 L d s for both"
                   + matmul + ours_setup)
        out += side_by_side(train, peer)
    for process, facts in ((train or {}).get("processes") or {}).items():
        for line in facts.get("kernel_choices") or ["no kernel choice logged (the plan measures CUDA tensors only)"]:
            out.append(f"kernel plan ({process}): {line}")
    profiles = {**((train or {}).get("profiles") or {}), **((results.get("profile") or {}).get("profiles") or {})}
    for name, profile in profiles.items():
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
    for part in ("kernels", "train", "peer", "profile"):
        results[part] = read_json(os.path.join(args.results, f"{part}.json"))
    text = tables(results)
    results["ours_over_peer"] = comparisons(results["train"], results["peer"])
    results["ours_over_peer_by_row"] = by_row(results["ours_over_peer"])
    results["side_by_side"] = side_by_side(results["train"], results["peer"])
    write_json(os.path.join(args.results, "gpu_check.json"), results)
    with open(os.path.join(args.results, "gpu_check.txt"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text + f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
