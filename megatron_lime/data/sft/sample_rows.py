"""A few rows of every SFT dataset in its own schema and file layout, with the quirks each one has.

Used by the tests and to try the whole pipeline without downloading anything:

    mixture_yaml = write_sample_mixture("/tmp/sft-sample")
    python tools/preprocess_sft_data.py --mixture /tmp/sft-sample/mixture.yaml --tokenizer TOK --output-prefix OUT

Quirks covered: dolly's empty contexts and Wikipedia citation markers ([3]); alpaca's empty and
non-empty inputs; no_robots' leading system messages and multi-turn Chat rows (and its
train/test parquet files side by side); everyday-conversations' multi-turn messages in a
`datasets` DatasetDict saved to disk; Magpie's from/value conversations next to dozens of
metadata columns (and a row whose conversations are null); WebInstruct's short final answers
(one of them a bare number in JSON); Dahoas' chosen/rejected pairs (one prompt with stray
Human:/Assistant: tags); RAG_Multilingual's ca/es/en rows.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

DOLLY_ROWS: list[dict[str, Any]] = [
    {"instruction": "When did Virgin Australia start operating?",
     "context": "Virgin Australia, the trading name of Virgin Australia Airlines Pty Ltd, is an Australian-based "
                "airline.[1] It commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single "
                "route.[3] It suddenly found itself as a major airline in Australia's domestic market.[4]",
     "response": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a "
                 "single route.[3]",
     "category": "closed_qa"},
    {"instruction": "Which is a species of fish? Tope or Rope", "context": "", "response": "Tope",
     "category": "classification"},
    {"instruction": "Why can camels survive for long without water?", "context": "",
     "response": "Camels use the fat in their humps to keep them filled with energy and hydration for long "
                 "periods of time.", "category": "open_qa"},
]

ALPACA_ROWS: list[dict[str, Any]] = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep seven to nine hours a night."},
    {"instruction": "Translate the sentence into French.", "input": "The cat is sleeping on the sofa.",
     "output": "Le chat dort sur le canapé."},
]

GPT4_LLM_ROWS: list[dict[str, Any]] = [
    {"instruction": "Summarise the water cycle in one sentence.", "input": "",
     "output": "Water evaporates, condenses into clouds, falls as precipitation and flows back to the sea."},
    {"instruction": "Classify the animal.", "input": "Dolphin", "output": "A dolphin is a mammal."},
]

NO_ROBOTS_TRAIN_ROWS: list[dict[str, Any]] = [
    {"prompt": "Write a haiku about autumn leaves.", "prompt_id": "a1" * 32,
     "messages": [{"role": "system", "content": "You are a poet who writes only haiku."},
                  {"role": "user", "content": "Write a haiku about autumn leaves."},
                  {"role": "assistant", "content": "Red leaves drift and fall\nwhispering to the cold ground\n"
                                                   "summer says goodbye"}],
     "category": "Generation"},
    {"prompt": "What is the capital of Peru?", "prompt_id": "b2" * 32,
     "messages": [{"role": "system", "content": "You are Quinn, a cheerful travel bot."},
                  {"role": "user", "content": "What is the capital of Peru?"},
                  {"role": "assistant", "content": "Lima! It sits on the Pacific coast."},
                  {"role": "user", "content": "And how high is Cusco?"},
                  {"role": "assistant", "content": "Cusco is about 3,400 metres above sea level."}],
     "category": "Chat"},
    {"prompt": "Name two primary colours.", "prompt_id": "c3" * 32,
     "messages": [{"role": "user", "content": "Name two primary colours."},
                  {"role": "assistant", "content": "Red and blue."}],
     "category": "Open QA"},
]

NO_ROBOTS_TEST_ROWS: list[dict[str, Any]] = [
    {"prompt": "This row is in the test split.", "prompt_id": "d4" * 32,
     "messages": [{"role": "user", "content": "This row is in the test split."},
                  {"role": "assistant", "content": "So it is not read for split train."}],
     "category": "Open QA"},
]

EVERYDAY_ROWS: list[dict[str, Any]] = [
    {"topic": "Food", "subtopic": "Breakfast", "full_topic": "Food/Breakfast",
     "messages": [{"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello! How can I help you today?"},
                  {"role": "user", "content": "What is a quick breakfast?"},
                  {"role": "assistant", "content": "Oatmeal with fruit takes five minutes."},
                  {"role": "user", "content": "Thanks!"},
                  {"role": "assistant", "content": "You're welcome. Enjoy your breakfast!"}]},
    {"topic": "Weather", "subtopic": "Rain", "full_topic": "Weather/Rain",
     "messages": [{"role": "user", "content": "Will it rain today?"},
                  {"role": "assistant", "content": "I can't see forecasts, but a weather app can tell you."},
                  {"role": "user", "content": "Which app?"},
                  {"role": "assistant", "content": "Most phones come with one built in."}]},
]

EVERYDAY_TEST_ROWS: list[dict[str, Any]] = [
    {"topic": "Test", "subtopic": "Split", "full_topic": "Test/Split",
     "messages": [{"role": "user", "content": "Is this the test split?"},
                  {"role": "assistant", "content": "Yes, test_sft."}]},
]

MAGPIE_ROWS: list[dict[str, Any]] = [
    {"uuid": "0f1e", "model": "meta-llama/Meta-Llama-3-70B-Instruct",
     "gen_input_configs": {"temperature": 1.0, "top_p": 1.0},
     "instruction": "What is a prime number?",
     "response": "A prime number is a whole number greater than 1 whose only divisors are 1 and itself.",
     "conversations": [{"from": "human", "value": "What is a prime number?"},
                       {"from": "gpt", "value": "A prime number is a whole number greater than 1 whose only "
                                                "divisors are 1 and itself."}],
     "task_category": "Math", "difficulty": "easy", "input_quality": "good", "reward": 0.12,
     "language": "EN"},
    {"uuid": "1a2b", "model": "meta-llama/Meta-Llama-3-70B-Instruct",
     "gen_input_configs": {"temperature": 1.0, "top_p": 1.0},
     "instruction": "Suggest a name for a bakery.", "response": "How about \"Rise and Shine Bakery\"?",
     "conversations": None,
     "task_category": "Brainstorming", "difficulty": "very easy", "input_quality": "average", "reward": 0.05,
     "language": "EN"},
]

WEBINSTRUCT_ROWS: list[dict[str, Any]] = [
    {"question": "Compute the derivative of x^2 at x = 2.", "answer": 4, "answer_type": "Integer",
     "category": "Mathematics", "difficulty": "Senior High School"},
    {"question": "What is the SI unit of force?", "answer": "N", "answer_type": "String",
     "category": "Physics", "difficulty": "Junior High School"},
    {"question": "Simplify 6/8.", "answer": "\\frac{3}{4}", "answer_type": "Fraction",
     "category": "Mathematics", "difficulty": "Primary School"},
]

DAHOAS_ROWS: list[dict[str, Any]] = [
    {"prompt": "How do I boil an egg?",
     "chosen": "Place the egg in boiling water for nine minutes, then cool it in cold water.",
     "rejected": "Eggs are oval."},
    {"prompt": "Human: What should I pack for a beach day? Assistant:",
     "chosen": "Sunscreen, water, a towel and a hat.", "rejected": "Nothing."},
]

RAG_ROWS: list[dict[str, Any]] = [
    {"instruction": "Quina és la capital de Catalunya?", "context": "Barcelona és la capital de Catalunya.",
     "response": "Barcelona.", "category": "closed_qa", "lang": "ca"},
    {"instruction": "¿Cuál es la capital de España?", "context": "Madrid es la capital de España.",
     "response": "Madrid.", "category": "closed_qa", "lang": "es"},
    {"instruction": "What is the tallest mountain in Spain?",
     "context": "Teide, on Tenerife, rises 3,715 metres and is the highest point in Spain.",
     "response": "Teide, at 3,715 metres.", "category": "closed_qa", "lang": "en"},
]

# Hub name -> the rows of its train split, for tests that check each adapter.
SAMPLE_ROWS: dict[str, list[dict[str, Any]]] = {
    "HuggingFaceTB/everyday-conversations-llama3.1-2k": EVERYDAY_ROWS,
    "databricks/databricks-dolly-15k": DOLLY_ROWS,
    "HuggingFaceH4/no_robots": NO_ROBOTS_TRAIN_ROWS,
    "teknium/GPT4-LLM-Cleaned": GPT4_LLM_ROWS,
    "Magpie-Align/Magpie-Pro-300K-Filtered": MAGPIE_ROWS,
    "Dahoas/synthetic-instruct-gptj-pairwise": DAHOAS_ROWS,
    "TIGER-Lab/WebInstruct-verified": WEBINSTRUCT_ROWS,
    "yahma/alpaca-cleaned": ALPACA_ROWS,
    "projecte-aina/RAG_Multilingual": RAG_ROWS,
}


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_json_array(path: str, rows: list[dict[str, Any]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
    return path


def write_parquet(path: str, rows: list[dict[str, Any]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_sample_mixture(directory: str, seq_length: int = 512) -> str:
    """Write every dataset as the hub ships it (or as a user saves it) plus a mixture YAML; returns its path."""
    import datasets

    d = lambda *parts: os.path.join(directory, *parts)  # noqa: E731
    write_jsonl(d("databricks-dolly-15k", "databricks-dolly-15k.jsonl"), DOLLY_ROWS)
    write_json_array(d("alpaca-cleaned", "alpaca_data_cleaned.json"), ALPACA_ROWS)
    write_parquet(d("GPT4-LLM-Cleaned", "data", "train-00000-of-00001.parquet"), GPT4_LLM_ROWS)
    write_parquet(d("no_robots", "data", "train-00000-of-00001.parquet"), NO_ROBOTS_TRAIN_ROWS)
    write_parquet(d("no_robots", "data", "test-00000-of-00001.parquet"), NO_ROBOTS_TEST_ROWS)
    everyday = datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(EVERYDAY_ROWS),
                                     "test_sft": datasets.Dataset.from_list(EVERYDAY_TEST_ROWS)})
    everyday.save_to_disk(d("everyday-conversations"))
    write_parquet(d("Magpie-Pro-300K-Filtered", "data", "train-00000-of-00002.parquet"), MAGPIE_ROWS[:1])
    write_parquet(d("Magpie-Pro-300K-Filtered", "data", "train-00001-of-00002.parquet"), MAGPIE_ROWS[1:])
    write_jsonl(d("WebInstruct-verified", "train.jsonl"), WEBINSTRUCT_ROWS)
    write_parquet(d("synthetic-instruct-gptj-pairwise", "data", "train-00000-of-00001.parquet"), DAHOAS_ROWS)
    write_json_array(d("RAG_Multilingual", "train.json"), RAG_ROWS)
    mixture = {
        "seed": 1234, "seq_length": seq_length, "over_length": "truncate",
        "datasets": [
            {"name": "HuggingFaceTB/everyday-conversations-llama3.1-2k", "path": "everyday-conversations",
             "split": "train_sft"},
            {"name": "databricks/databricks-dolly-15k", "path": "databricks-dolly-15k/databricks-dolly-15k.jsonl"},
            {"name": "HuggingFaceH4/no_robots", "path": "no_robots", "split": "train"},
            {"name": "teknium/GPT4-LLM-Cleaned", "path": "GPT4-LLM-Cleaned"},
            {"name": "Magpie-Align/Magpie-Pro-300K-Filtered", "path": "Magpie-Pro-300K-Filtered/data/*.parquet"},
            {"name": "Dahoas/synthetic-instruct-gptj-pairwise", "path": "synthetic-instruct-gptj-pairwise"},
            {"name": "TIGER-Lab/WebInstruct-verified", "path": "WebInstruct-verified/train.jsonl"},
            {"name": "yahma/alpaca-cleaned", "path": "alpaca-cleaned/alpaca_data_cleaned.json"},
            {"name": "projecte-aina/RAG_Multilingual", "path": "RAG_Multilingual/train.json",
             "options": {"languages": ["en"]}},
        ],
    }
    path = d("mixture.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(mixture, f, sort_keys=False)
    return path
