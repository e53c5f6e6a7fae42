"""tools/preprocess_sft_data.py and the packed SFT datasets: summary counts, bad rows, caps,
packing invariants, packed == alone logits, and a tiny SFT run that learns its responses."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os

import numpy as np
import pytest
import torch
from helpers import tiny_sft_dataset, train_tiny_tokenizer, write_tiny_corpus

from megatron_lime.config import LimeConfig
from megatron_lime.data.builder import DatasetConfig, build_datasets, parse_split
from megatron_lime.data.indexed_dataset import IndexedDataset
from megatron_lime.data.sft import preprocess as sft_preprocess
from megatron_lime.data.sft import sample_rows
from megatron_lime.data.sft.dataset import SFTDataset, SFTOptions, pack_best_fit, split_example_ids
from megatron_lime.data.sft.preprocess import SFTDataError
from megatron_lime.model import LimeModel
from megatron_lime.tokenizer import load_tokenizer

SEQ = 128  # lime-tiny's max_position_embeddings


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_data_tokenizer")
    return train_tiny_tokenizer(str(tmp / "tokenizer"), write_tiny_corpus(str(tmp / "corpus.jsonl")))


def preprocess(args: list[str]) -> int:
    return sft_preprocess.main(args)


@pytest.fixture(scope="module")
def sample_output(tmp_path_factory, tokenizer_dir):
    """Every adapter's sample rows, preprocessed at SEQ by the tool; returns (output prefix, its stdout, tmp dir)."""
    tmp = tmp_path_factory.mktemp("sft_sample")
    mixture = sample_rows.write_sample_mixture(str(tmp / "raw"), seq_length=SEQ)
    prefix = str(tmp / "out" / "sft")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = preprocess(["--mixture", mixture, "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--quiet"])
    assert rc == 0
    return prefix, stdout.getvalue(), tmp


def run_tool(capsys, mixture, tokenizer_dir, output_prefix, *extra) -> tuple[int, str, str]:
    rc = preprocess(["--mixture", mixture, "--tokenizer", tokenizer_dir, "--output-prefix", output_prefix, *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def summary_rows(output_prefix: str) -> dict[str, dict]:
    with open(f"{output_prefix}_summary.json") as f:
        return {d["name"]: d for d in json.load(f)["datasets"]}


def test_preprocess_every_adapter(sample_output, tokenizer_dir):
    prefix, out, tmp = sample_output
    print(out)  # the summary, for the record (pytest -s shows it)
    assert "total" in out and "trained tokens" in out
    summary = summary_rows(prefix)
    expected_written = {name: sum(1 for e in rows) for name, rows in sample_rows.SAMPLE_ROWS.items()}
    expected_written["projecte-aina/RAG_Multilingual"] = 1  # ca and es rows filtered
    assert {n: s["written"] for n, s in summary.items()} == expected_written
    assert summary["projecte-aina/RAG_Multilingual"]["filtered"] == 2
    assert summary["HuggingFaceH4/no_robots"]["rows_read"] == 3  # the test split's file is not read
    assert summary["HuggingFaceH4/no_robots"]["multi_turn"] == 1
    assert summary["HuggingFaceTB/everyday-conversations-llama3.1-2k"]["multi_turn"] == 2
    # dolly's long context does not fit SEQ + 1 tokens: truncated, not dropped.
    assert summary["databricks/databricks-dolly-15k"]["truncated_context"] == 1
    assert summary["databricks/databricks-dolly-15k"]["dropped_too_long"] == 0

    tokens = IndexedDataset(prefix + "_text_document")
    masks = IndexedDataset(prefix + "_loss_mask_document")
    assert len(tokens) == len(masks) == sum(expected_written.values())
    assert masks.dtype == np.uint8 and np.array_equal(tokens.sequence_lengths, masks.sequence_lengths)
    assert int(tokens.sequence_lengths.sum()) == sum(s["tokens"] for s in summary.values())
    assert sum(int(masks[i].sum()) for i in range(len(masks))) == sum(s["trained_tokens"] for s in summary.values())
    assert tokens.sequence_lengths.max() <= SEQ + 1
    tokenizer = load_tokenizer(tokenizer_dir)
    assert all(tokens[i][-1] == tokenizer.eos_id and masks[i][-1] == 1 for i in range(len(tokens)))
    assert not glob.glob(str(tmp / "out" / "*tmp*"))


def test_preprocess_bad_rows_fail_or_are_counted(tmp_path, tokenizer_dir, capsys):
    good = {"instruction": "Q", "context": "", "response": "A", "category": "open_qa"}
    data = tmp_path / "dolly.jsonl"
    data.write_text("\n".join([json.dumps(good), json.dumps({"instruction": "Q", "context": ""}),
                               "{not json", json.dumps(good)]) + "\n")
    mixture = tmp_path / "m.yaml"
    mixture.write_text(f"datasets:\n  - {{name: databricks/databricks-dolly-15k, path: {data}}}\n")
    prefix = str(tmp_path / "out" / "bad")

    rc, out, err = run_tool(capsys, str(mixture), tokenizer_dir, prefix)
    assert rc == 1
    assert f"databricks/databricks-dolly-15k: {data}, line 2: missing column 'response'" in err
    assert "--skip-bad-records" in err
    assert not os.path.exists(prefix + "_text_document.bin") and not glob.glob(str(tmp_path / "out" / "*"))

    rc, out, err = run_tool(capsys, str(mixture), tokenizer_dir, prefix, "--skip-bad-records")
    assert rc == 0, err
    summary = summary_rows(prefix)["databricks/databricks-dolly-15k"]
    assert (summary["rows_read"], summary["skipped_bad"], summary["written"]) == (4, 2, 2)
    assert f"{data}, line 3: malformed JSON" in out

    missing = tmp_path / "missing.yaml"
    missing.write_text("datasets:\n  - {name: databricks/databricks-dolly-15k, path: nowhere/*.jsonl}\n")
    rc, out, err = run_tool(capsys, str(missing), tokenizer_dir, prefix)
    assert rc == 1 and "nowhere/*.jsonl: no such file, directory or glob match" in err


def test_caps_weights_and_determinism(tmp_path, tokenizer_dir, capsys):
    rows = [{"instruction": f"Question number {i}?", "context": "", "response": f"Answer {i}.", "category": "open_qa"}
            for i in range(40)]
    data = sample_rows.write_jsonl(str(tmp_path / "dolly.jsonl"), rows)
    mixture = tmp_path / "m.yaml"
    mixture.write_text("seed: 3\ndatasets:\n"
                       f"  - {{name: databricks/databricks-dolly-15k, path: {data}, max_examples: 10, weight: 2.5}}\n"
                       f"  - {{name: databricks/databricks-dolly-15k, path: {data}, weight: 0.25}}\n")
    for run in ("a", "b"):
        rc, _, err = run_tool(capsys, str(mixture), tokenizer_dir, str(tmp_path / run))
        assert rc == 0, err
    first, second = (IndexedDataset(str(tmp_path / f"{run}_text_document")) for run in ("a", "b"))
    assert len(first) == 25 + 10 and all(np.array_equal(first[i], second[i]) for i in range(len(first)))
    with open(str(tmp_path / "a_summary.json")) as f:
        capped, quarter = json.load(f)["datasets"]
    assert (capped["distinct_written"], capped["written"], capped["not_selected"]) == (10, 25, 30)
    assert (quarter["distinct_written"], quarter["written"]) == (40, 10)


# ---------------------------------------------------------------------------------------------
# The datasets the training loop reads.


@pytest.fixture(scope="module")
def dolly_prefix(tmp_path_factory, tokenizer_dir):
    """~300 dolly-schema examples about the standard library, preprocessed at SEQ."""
    return tiny_sft_dataset(str(tmp_path_factory.mktemp("sft_dolly")), tokenizer_dir, SEQ)


def check_sequence(item: dict, tokens: IndexedDataset, masks: IndexedDataset, pad_id: int) -> list[int]:
    """Check one item against the files; returns the example ids it holds (found by content)."""
    ids = item["input_ids"].numpy()
    doc = item["document_ids"].numpy()
    found = []
    boundaries = np.flatnonzero(np.diff(doc)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(ids)]))
    for d, (start, end) in enumerate(zip(starts, ends)):
        assert (doc[start:end] == d).all()
        assert np.array_equal(item["position_ids"][start:end].numpy(), np.arange(end - start))
        is_padding = (d == len(starts) - 1 and (item["loss_mask"][start:end] == 0).all()
                      and (ids[start:end] == pad_id).all() and (item["labels"][start:end] == -100).all())
        if is_padding and not any(len(tokens[k]) - 1 == end - start and np.array_equal(tokens[k][:-1], ids[start:end])
                                  for k in range(len(tokens))):
            continue
        matches = [k for k in range(len(tokens))
                   if len(tokens[k]) - 1 == end - start and np.array_equal(tokens[k][:-1], ids[start:end])]
        assert matches, f"document {d} of the sequence is not a whole example"
        k = matches[0]
        trained = masks[k][1:].astype(bool)
        assert np.array_equal(item["loss_mask"][start:end].numpy(), trained.astype(np.float32))
        expected_labels = np.where(trained, tokens[k][1:].astype(np.int64), -100)
        assert np.array_equal(item["labels"][start:end].numpy(), expected_labels)
        found.append(k)
    return found


def test_packed_sequences_hold_whole_examples(dolly_prefix, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    tokens, masks = IndexedDataset(dolly_prefix), IndexedDataset(dolly_prefix.replace("_text_", "_loss_mask_"))
    train, valid, test = build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="90,10,0",
                                                                  seq_length=SEQ, seed=5, num_samples=(0, 0, 0),
                                                                  options=SFTOptions(eod_id=tokenizer.eos_id,
                                                                                     pad_id=tokenizer.pad_id)))
    assert test is None
    train_ids, valid_ids, _ = split_example_ids(len(tokens), "90,10,0", seed=5)
    assert len(train_ids) == round(0.9 * len(tokens)) and len(train_ids) + len(valid_ids) == len(tokens)
    assert not set(train_ids) & set(valid_ids)
    seen = []
    for k in range(len(train)):
        item = train[k]
        assert {key: (v.dtype, tuple(v.shape)) for key, v in item.items()} == {
            "input_ids": (torch.int64, (SEQ,)), "labels": (torch.int64, (SEQ,)), "loss_mask": (torch.float32, (SEQ,)),
            "position_ids": (torch.int64, (SEQ,)), "document_ids": (torch.int64, (SEQ,))}
        seen += check_sequence(item, tokens, masks, tokenizer.pad_id)
    # One epoch: every training example exactly once (examples with equal tokens are interchangeable).
    assert sorted(tokens[k].tobytes() for k in seen) == sorted(tokens[k].tobytes() for k in train_ids)
    fill = sum(int((train[k]["labels"] != -100).sum() + (train[k]["loss_mask"] == 0).sum()) for k in range(len(train)))
    positions_used = sum(len(tokens[k]) - 1 for k in train_ids)
    sizes = tokens.sequence_lengths[train_ids] - 1
    # No packing needs fewer sequences than this: examples over half a sequence never share one.
    lower_bound = max(int((sizes > SEQ // 2).sum()), int(np.ceil(sizes.sum() / SEQ)))
    print(f"{len(train_ids)} examples, {len(train)} sequences, lower bound {lower_bound}, "
          f"fill {positions_used / (len(train) * SEQ):.3f}")
    assert len(train) <= 1.08 * lower_bound + 1, "best fit should be within 8% of the fewest sequences possible"
    assert fill == len(train) * SEQ


def test_epochs_unpacked_mode_blend_and_cache(dolly_prefix, tmp_path):
    train, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="1,0,0", seq_length=SEQ,
                                                           seed=1, num_samples=(500, 0, 0)))
    one_epoch, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="1,0,0",
                                                               seq_length=SEQ, seed=1, num_samples=(0, 0, 0)))
    assert len(train) >= 500 > 2 * len(one_epoch)
    again, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="1,0,0", seq_length=SEQ,
                                                           seed=1, num_samples=(500, 0, 0),
                                                           cache_path=str(tmp_path / "cache")))
    cached, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="1,0,0", seq_length=SEQ,
                                                            seed=1, num_samples=(500, 0, 0),
                                                            cache_path=str(tmp_path / "cache")))
    assert len(glob.glob(str(tmp_path / "cache" / "*-description.json"))) == 1  # one cached plan, reused
    for k in (0, len(one_epoch), len(train) - 1):  # epoch 2 is reshuffled, not a copy of epoch 1
        assert all(torch.equal(train[k][key], again[k][key]) and torch.equal(train[k][key], cached[k][key])
                   for key in train[k])
    assert not torch.equal(train[0]["input_ids"], train[len(one_epoch)]["input_ids"])
    other_seed, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="1,0,0",
                                                                seq_length=SEQ, seed=2, num_samples=(500, 0, 0)))
    assert not torch.equal(train[0]["input_ids"], other_seed[0]["input_ids"])

    unpacked, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="1,0,0", seq_length=SEQ,
                                                              seed=1, num_samples=(0, 0, 0),
                                                              options=SFTOptions(packed=False, pad_id=0)))
    assert len(unpacked) == len(IndexedDataset(dolly_prefix))
    item = unpacked[0]
    real = int((item["document_ids"] == 0).sum())
    assert set(item["document_ids"].tolist()) == ({0, 1} if real < SEQ else {0})
    assert (item["input_ids"][real:] == 0).all() and (item["loss_mask"][real:] == 0).all()
    assert (item["labels"][real:] == -100).all()

    blend, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=["3", dolly_prefix, "1", dolly_prefix],
                                                           split="1,0,0", seq_length=SEQ, seed=1,
                                                           num_samples=(40, 0, 0)))
    assert len(blend) == 40 and np.bincount(blend.dataset_index).tolist() == [30, 10]


def test_dataset_errors(dolly_prefix, tmp_path):
    with pytest.raises(SFTDataError, match="need more than seq_length=16 positions"):
        build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="1,0,0", seq_length=16, seed=1,
                                                 num_samples=(1, 0, 0)))
    with pytest.raises(SFTDataError, match="do not end with eod id 7"):
        build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="1,0,0", seq_length=SEQ, seed=1,
                                                 num_samples=(1, 0, 0), options=SFTOptions(eod_id=7)))
    with pytest.raises(ValueError, match="must end in '_text_document'"):
        build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix.removesuffix("_text_document")],
                                                 split="1,0,0", seq_length=SEQ, seed=1, num_samples=(1, 0, 0)))
    with pytest.raises(ValueError, match="split must be"):
        parse_split("1,2,3,4")


def test_pack_best_fit_never_splits_and_fills():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 100, size=500)
    groups = pack_best_fit(sizes, 128, open_limit=8)
    assert sorted(i for g in groups for i in g) == list(range(500))
    assert all(sizes[g].sum() <= 128 for g in groups)
    assert sizes.sum() / (len(groups) * 128) > 0.9


def test_packed_example_gives_the_same_logits_as_alone(sample_output):
    torch.manual_seed(0)
    model = LimeModel(LimeConfig.from_name("lime-tiny")).eval()
    train, _, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[sample_output[0] + "_text_document"],
                                                           split="1,0,0", seq_length=SEQ, seed=3,
                                                           num_samples=(0, 0, 0)))
    # The sequence with the most examples, at least three: the middle one has neighbours on both sides.
    item = max((train[k] for k in range(len(train))), key=lambda item: len(item["document_ids"].unique()))
    assert len(item["document_ids"].unique()) >= 3
    batch = {key: value[None] for key, value in item.items()}  # (1, SEQ)
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"],
                       document_ids=batch["document_ids"]).logits[0]  # (SEQ, vocab)
        for document in range(int(item["document_ids"].max())):
            span = (item["document_ids"] == document).nonzero().flatten()
            alone = model(item["input_ids"][span][None]).logits[0]  # (n, vocab)
            torch.testing.assert_close(packed[span], alone, rtol=1e-5, atol=1e-5)
        # Without document_ids the same tokens see their neighbours: the check above can fail.
        leaky = model(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        later = (item["document_ids"] == 1).nonzero().flatten()
        assert (leaky[later] - packed[later]).abs().max() > 1e-3


def test_tiny_sft_run_lowers_loss_on_trained_tokens(dolly_prefix):
    """30 AdamW steps of lime-tiny on packed SFT sequences: the loss on responses falls."""
    torch.manual_seed(0)
    model = LimeModel(LimeConfig.from_name("lime-tiny"))
    train, valid, _ = build_datasets(SFTDataset, DatasetConfig(data_path=[dolly_prefix], split="90,10,0",
                                                               seq_length=SEQ, seed=0, num_samples=(30 * 8, 0, 0)))
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=False, drop_last=True)
    held_out = {key: torch.stack([valid[k][key] for k in range(len(valid))]) for key in valid[0]}

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            out = model(**held_out)  # mean over every trained token of the batch
        model.train()
        return float(out.loss)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    before = held_out_loss()
    train_losses = []
    for step, batch in zip(range(30), loader):
        out = model(**batch, loss_reduction="sum")
        loss = out.loss / out.num_loss_tokens  # mean over the batch's trained tokens, not of per-sequence means
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_losses.append(float(loss.detach()))
    after = held_out_loss()
    assert len(train_losses) == 30
    print(f"held-out loss on trained tokens: {before:.3f} -> {after:.3f}; train loss "
          f"{np.mean(train_losses[:5]):.3f} (steps 1-5) -> {np.mean(train_losses[-5:]):.3f} (steps 26-30)")
    # Starting at ln(vocab) = 6.24 (uniform), 30 steps must take off at least a nat on unseen responses.
    assert after < before - 1.0, (before, after)
    assert np.mean(train_losses[-5:]) < np.mean(train_losses[:5]) - 1.0


def test_both_preprocessing_tools_start_without_torch():
    """Importing torch costs about a second per run (per shard of a job array): neither tool needs it."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for tool in ("preprocess_data", "preprocess_sft_data"):
        code = (f"import runpy, sys; sys.argv = ['{tool}', '--help']\n"
                f"try:\n    runpy.run_path('{repo}/tools/{tool}.py', run_name='__main__')\n"
                "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "False", (tool, result.stderr)
