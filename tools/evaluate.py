#!/usr/bin/env python
"""Score a LIME checkpoint on lm-evaluation-harness tasks (the model card's benchmarks by default).

    python tools/evaluate.py --load checkpoints/lime-1b-pretrain --output results.json --chart chart.png
    python tools/evaluate.py --load exports/lime-1b --tasks arc_easy,piqa --limit 200 --data-dir eval_data \\
        --output results.json

--load takes a DeepSpeed save dir (any data-parallel size), a consolidated directory or an exported
Hugging Face folder. Offline: --data-dir DIR reads each task's dataset from DIR/<hub dataset id>/, as
`huggingface-cli download --repo-type dataset ID --local-dir DIR/ID` writes it. It runs lm-eval's
own evaluator on megatron_lime.evaluation.LimeLM (registered with lm-eval as `lime`), and adds the
checkpoint's iteration and tokens to the results, the chart, and the offline data directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_lime.errors import reports_input_errors


def build_parser() -> argparse.ArgumentParser:
    from megatron_lime.evaluation.tasks import DEFAULT_TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True,
                        help="Checkpoint: DeepSpeed save dir, consolidated dir, or exported Hugging Face folder.")
    parser.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: the one `latest` names).")
    parser.add_argument("--tokenizer", default=None,
                        help="Tokenizer directory (default: the one the checkpoint records, or the export's own).")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="Comma-separated lm-eval tasks or groups (default: %(default)s, zero-shot).")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="Few-shot examples (default: each task's own, 0 for the default set).")
    parser.add_argument("--limit", type=float, default=None,
                        help="At most this many samples per task (a fraction < 1 takes that share).")
    parser.add_argument("--batch-size", type=int, default=8, help="Requests per forward pass.")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available).")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="Default: bf16 on GPUs, fp32 on CPU.")
    parser.add_argument("--data-dir", default=None,
                        help="Offline: read each task's dataset from DIR/<hub dataset id>/ (no network).")
    parser.add_argument("--include-path", default=None, help="A directory of your own lm-eval task YAMLs.")
    parser.add_argument("--output", required=True, help="Results JSON to write.")
    parser.add_argument("--chart", default=None, help="Also draw the scores as a bar chart (PNG).")
    parser.add_argument("--log-samples", action="store_true",
                        help="Keep every sample's requests and log-likelihoods in the JSON (large).")
    parser.add_argument("--seed", type=int, default=1234, help="Seed for few-shot sampling and lm-eval's generators.")
    return parser


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        print("error: --tasks is empty", file=sys.stderr)
        return 2
    if args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            print(f"error: --data-dir {args.data_dir}: no such directory", file=sys.stderr)
            return 2
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    try:
        from megatron_lime.evaluation import LimeLM, evaluate_tasks
        from megatron_lime.evaluation.tasks import check_tasks
    except ImportError as err:
        print(f"error: {err}: evaluation needs lm-eval: pip install -e \".[eval]\"", file=sys.stderr)
        return 2
    from megatron_lime.files import write_json

    started = time.time()
    check_tasks(tasks, args.include_path)
    lm = LimeLM(load=args.load, tokenizer=args.tokenizer, batch_size=args.batch_size, device=args.device,
                dtype=args.dtype, tag=args.tag)
    print(f"> {lm.metadata.get('source', args.load)}: {lm.model.config.name}, "
          f"{sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters, "
          f"{next(lm.model.parameters()).dtype} on {lm.device}", flush=True)
    report = evaluate_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=limit, data_dir=args.data_dir,
                            include_path=args.include_path, log_samples=args.log_samples, seed=args.seed)
    meta = lm.metadata
    results = {
        "checkpoint": os.path.abspath(args.load),
        "checkpoint_source": meta.get("source"),
        "model": lm.model.config.name,
        "iteration": meta.get("iteration"),
        "consumed_tokens": meta.get("consumed_tokens"),
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "seconds": round(time.time() - started, 1),
        **report,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_json(args.output, results, sort_keys=False)  # tasks in the order asked for
    from megatron_lime.evaluation.report import results_table

    print(results_table({os.path.basename(os.path.normpath(args.load)): results}))
    if args.chart:
        from megatron_lime.evaluation.report import plot_final_scores

        plot_final_scores({os.path.basename(os.path.normpath(args.load)): results}, args.chart)
    print(f"> wrote {args.output}" + (f" and {args.chart}" if args.chart else "")
          + f" in {time.time() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
