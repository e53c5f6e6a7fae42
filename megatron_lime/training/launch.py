"""The Python side of examples/*_lime_1b.sh.

Those scripts are bash/Python polyglots: bash reads the flag arrays and starts DeepSpeed's
launcher, which then runs the same file with python on every rank (appending --local_rank=N).
The Python side asks bash for the arrays, so they are written once, and appends the
command line's overrides, which win because the last occurrence of a flag wins.
"""

from __future__ import annotations

import subprocess


def run_example_script(script: str, overrides: list[str]) -> int:
    """Train with SCRIPT's flag arrays followed by `overrides`; returns the exit status."""
    flags = subprocess.run(["bash", script, "--print-args"], check=True, stdout=subprocess.PIPE).stdout
    script_args = [arg for arg in flags.decode().split("\0") if arg]
    from megatron_lime.training.pretrain import main

    return main(script_args + overrides)
