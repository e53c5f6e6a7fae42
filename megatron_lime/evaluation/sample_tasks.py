"""Small local copies of benchmark datasets, in the hub's exact layout and column schema.

`write_hub_dataset(DATA_DIR, "allenai/ai2_arc", {"ARC-Easy": {"test": rows, ...}})` writes
DATA_DIR/allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet and the README.md `configs:` table,
as `huggingface-cli download --repo-type dataset allenai/ai2_arc --local-dir DATA_DIR/allenai/ai2_arc`
leaves them, so tools/evaluate.py --data-dir reads them exactly as it reads the real ones.

`write_synthetic_tasks(DATA_DIR, tasks)` makes rows for tests (the schema is real, the content is not a benchmark);
`docstring_hellaswag(corpus, n)` makes the quickstart's sentence-completion task from its corpus.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from megatron_lime.files import atomic_write, write_text

# lm-eval task -> (hub dataset id, config name or None, the splits the task reads)
TASK_DATASETS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "hellaswag": ("Rowan/hellaswag", None, ("train", "validation")),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", ("train", "validation", "test")),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", ("train", "validation", "test")),
    "piqa": ("baber/piqa", None, ("train", "validation")),
    "winogrande": ("allenai/winogrande", "winogrande_xl", ("train", "validation")),
    "boolq": ("aps/super_glue", "boolq", ("train", "validation")),
    "openbookqa": ("allenai/openbookqa", "main", ("train", "validation", "test")),
}


def write_hub_dataset(data_dir: str | Path, hub_id: str, configs: dict[str | None, dict[str, list[dict]]]) -> Path:
    """Parquet files per config and split, plus README.md's `configs:` table; returns DATA_DIR/HUB_ID."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(data_dir) / hub_id
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        folder = config or "data"
        lines.append(f"- config_name: {config or 'default'}")
        lines.append("  data_files:")
        for split, rows in splits.items():
            path = root / folder / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, "wb", encoding=None) as f:
                pq.write_table(pa.Table.from_pylist(rows), f)
            lines += [f"  - split: {split}", f"    path: {folder}/{split}-*"]
    write_text(root / "README.md", "\n".join(lines + ["---", f"Local copy of {hub_id} (megatron-lime).", ""]))
    return root


_WORDS = ("river stone light paper green quick cold metal window garden silent bright simple heavy "
          "north music bread glass field winter table orange small round cloud tower market").split()


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def synthetic_rows(task: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows in the exact column schema (names and types) of the task's hub dataset."""
    rng = random.Random(f"{task}-{seed}")
    rows = []
    for i in range(n):
        if task == "hellaswag":
            ctx_a, ctx_b = _phrase(rng, 6).capitalize() + ".", _phrase(rng, 2)
            endings = [_phrase(rng, rng.randint(2, 7)) + "." for _ in range(4)]
            rows.append({"ind": i, "activity_label": _phrase(rng, 2).title(), "ctx_a": ctx_a, "ctx_b": ctx_b,
                         "ctx": f"{ctx_a} {ctx_b}", "endings": endings,
                         "source_id": f"synthetic~{i}", "split": "val", "split_type": "indomain",
                         "label": str(rng.randrange(4))})
        elif task in ("arc_easy", "arc_challenge", "openbookqa"):
            labels = ["A", "B", "C", "D"]
            choices = {"text": [_phrase(rng, rng.randint(1, 4)) for _ in labels], "label": labels}
            question = _phrase(rng, 8).capitalize() + "?"
            row = {"id": f"Synthetic_{i}", "choices": choices, "answerKey": rng.choice(labels)}
            rows.append({**row, "question_stem": question} if task == "openbookqa" else {**row, "question": question})
        elif task == "piqa":
            rows.append({"goal": _phrase(rng, 6), "sol1": _phrase(rng, rng.randint(3, 8)),
                         "sol2": _phrase(rng, rng.randint(3, 8)), "label": rng.randrange(2)})
        elif task == "winogrande":
            rows.append({"sentence": f"The {rng.choice(_WORDS)} was near the {rng.choice(_WORDS)} because _ was "
                                     f"{_phrase(rng, 2)}.",
                         "option1": rng.choice(_WORDS), "option2": rng.choice(_WORDS),
                         "answer": str(rng.randint(1, 2))})
        elif task == "boolq":
            rows.append({"question": _phrase(rng, 6), "passage": _phrase(rng, 30).capitalize() + ".", "idx": i,
                         "label": rng.randrange(2)})
        else:
            raise KeyError(f"no synthetic rows for task {task!r} (known: {', '.join(TASK_DATASETS)})")
    return rows


def write_synthetic_tasks(data_dir: str | Path, tasks: list[str], n: int = 8) -> list[Path]:
    """Tiny local copies of the tasks' datasets (every split they read) under DATA_DIR/HUB_ID."""
    by_hub: dict[str, dict[str | None, dict[str, list[dict]]]] = {}
    for task in tasks:
        hub_id, config, splits = TASK_DATASETS[task]
        by_hub.setdefault(hub_id, {})[config] = {s: synthetic_rows(task, n, seed=k) for k, s in enumerate(splits)}
    return [write_hub_dataset(data_dir, hub_id, configs) for hub_id, configs in by_hub.items()]


def docstring_hellaswag(corpus_jsonl: str | Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Sentence completion in hellaswag's schema from a FineWeb-schema corpus: the true ending of a
    sentence against three endings of other sentences (chance is 25%)."""
    rng = random.Random(seed)
    sentences = []
    with open(corpus_jsonl, encoding="utf-8") as f:
        for line in f:
            for sentence in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]):
                words = sentence.split()
                if 8 <= len(words) <= 30 and "\n" not in sentence:
                    sentences.append(words)
    if len(sentences) < 4:
        raise ValueError(f"{corpus_jsonl}: too few sentences of 8-30 words for a completion task")
    rng.shuffle(sentences)
    rows = []
    for i, words in enumerate(sentences[:n]):
        cut = len(words) // 2
        distractors = [s[len(s) // 2:] for s in rng.sample(sentences, 3) if s is not words][:3]
        while len(distractors) < 3:
            distractors.append(rng.choice(sentences)[cut:])
        label = rng.randrange(4)
        endings = [" ".join(d) for d in distractors]
        endings.insert(label, " ".join(words[cut:]))
        ctx_a, ctx_b = " ".join(words[:cut - 1]), words[cut - 1]
        rows.append({"ind": i, "activity_label": "Python documentation", "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "source_id": f"docstrings~{i}", "split": "val",
                     "split_type": "indomain", "label": str(label)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_lime.evaluation.sample_tasks --corpus C.jsonl --output-dir DIR --num-samples N`:
    the quickstart's hellaswag-schema sentence-completion task in DIR/Rowan/hellaswag."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Write a hellaswag-schema completion task from a corpus.")
    parser.add_argument("--corpus", required=True, help="JSONL with a \"text\" column (FineWeb-Edu schema).")
    parser.add_argument("--output-dir", required=True, help="The --data-dir of tools/evaluate.py.")
    parser.add_argument("--num-samples", type=int, default=200, help="Validation rows (the train split gets 16).")
    args = parser.parse_args(argv)
    try:
        rows = docstring_hellaswag(args.corpus, args.num_samples + 16)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {args.corpus}: {err}", file=sys.stderr)
        return 1
    root = write_hub_dataset(args.output_dir, "Rowan/hellaswag",
                             {None: {"validation": rows[:args.num_samples], "train": rows[args.num_samples:]}})
    print(f"wrote {min(len(rows), args.num_samples)} sentence completions (hellaswag schema) to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
