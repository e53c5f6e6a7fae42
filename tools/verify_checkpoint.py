#!/usr/bin/env python
"""Check every file of a checkpoint folder against the content hashes its save recorded.

    python tools/verify_checkpoint.py checkpoints/lime-1b            # every complete tag of a save dir
    python tools/verify_checkpoint.py checkpoints/lime-1b/global_step2000
    python tools/verify_checkpoint.py exports/lime-1b --all          # list every bad file, not only the first

Any layout: a DeepSpeed save dir (each complete global_stepN/), one tag folder, a consolidated folder,
a Hugging Face export. Exit status 0 when every recorded file matches, 1 at the first bad file (with
--all: after listing them all), 2 when the folder is not a checkpoint. A folder written before
checkpoints recorded hashes cannot be checked: it is named on stderr and does not fail the run.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_lime.errors import input_error_line, reports_input_errors

NOT_A_CHECKPOINT_STATUS = 2  # documented above; any other bad input is status 1 (megatron_lime/errors.py)


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", metavar="DIR", help="Checkpoint folder (any layout).")
    parser.add_argument("--all", action="store_true", help="Check every file and list every bad one.")
    args = parser.parse_args(argv)

    from megatron_lime.checkpoint import CheckpointError, integrity

    start = time.perf_counter()
    try:
        report = integrity.check_folder(args.path, first_only=not args.all)
    except CheckpointError as err:
        print(input_error_line(err), file=sys.stderr)
        return NOT_A_CHECKPOINT_STATUS
    for folder in report.unverified:
        print(f"warning: {folder}: written before checkpoints recorded content hashes: not checked", file=sys.stderr)
    for problem in report.bad:
        print(problem, file=sys.stderr)
    if report.bad:
        return 1
    seconds = time.perf_counter() - start
    print(f"ok: {report.files} files in {len(report.checked)} checkpoint folder(s) match their recorded hashes "
          f"({report.bytes / 1e9:.2f} GB, {integrity.HASH_ALGORITHM}, {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
