"""Hugging Face export and import: files, logits against ours, round trips, a real 2-process ZeRO-1 checkpoint.

The exports are made by tools/convert_to_hf.py itself and loaded the way users load them:
AutoTokenizer / AutoModelForCausalLM with trust_remote_code=True, offline.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from helpers import load_tool, train_tiny_tokenizer, write_tiny_corpus
from megatron_lime.training.launch import free_port

from megatron_lime.checkpoint import CheckpointError, torch_load
from megatron_lime.config import LimeConfig
from megatron_lime.checkpoint import load_lime_weights, write_consolidated
from megatron_lime.checkpoint.hf_names import HF_TO_LIME_WEIGHTS, hf_to_lime_state_dict, lime_to_hf_state_dict
from megatron_lime.model import LimeModel
from megatron_lime.tokenizer import SPECIAL_TOKENS, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert(*args: str) -> int:
    return load_tool("convert_to_hf").main(list(args))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A consolidated lime-tiny checkpoint with a recorded run, its tokenizer, and fp32 + bf16 exports."""
    root = tmp_path_factory.mktemp("convert")
    corpus = write_tiny_corpus(str(root / "corpus.jsonl"))
    tokenizer_dir = train_tiny_tokenizer(str(root / "tokenizer"), corpus)
    torch.manual_seed(0)
    config = LimeConfig.from_name("lime-tiny")
    model = LimeModel(config)
    with torch.no_grad():  # norms away from 1 so a mis-mapped norm weight shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    meta = {"model": config.to_dict(), "iteration": 1234, "consumed_samples": 98_765,
            "consumed_tokens": 12_641_920, "tokenizer": tokenizer_dir, "data_path": ["data/fineweb_text_document"],
            "dataset_type": "gpt", "args": {"lr": 5e-4, "micro_batch_size": 4}}
    write_consolidated(root / "ckpt", model.state_dict(), meta)
    assert convert("--load", str(root / "ckpt"), "--output", str(root / "hf32"), "--dtype", "fp32") == 0
    assert convert("--load", str(root / "ckpt"), "--output", str(root / "hf16"), "--dtype", "bf16") == 0
    return dict(root=root, model=model.eval(), config=config, tokenizer=tokenizer_dir, corpus=corpus,
                hf32=root / "hf32", hf16=root / "hf16", ckpt=root / "ckpt")


def load_hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=True).eval()
    return tokenizer, model


def test_export_folder_has_every_file_and_the_tied_weight_once(tiny_run):
    folder = tiny_run["hf32"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "configuration_lime.py", "modeling_lime.py", "model.safetensors", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "README.md", "lime_run.json"} <= names
    assert "lime_config.json" not in names  # the trainer would take the folder for a consolidated checkpoint
    assert not [n for n in names if n.startswith(".")]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "lime" and config["tie_word_embeddings"] is True
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lime.LimeForCausalLM"
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 512
    weights = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape == (512, 64)  # exactly vocab_size rows, no padding
    assert len(weights) == 2 + 6 * 2
    tokenizer = load_tokenizer(tiny_run["tokenizer"])
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["pad_token_id"], generation["eos_token_id"]) == (tokenizer.pad_id, tokenizer.eos_id)
    assert (config["pad_token_id"], config["eos_token_id"]) == (tokenizer.pad_id, tokenizer.eos_id)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (tokenizer_config["pad_token"], tokenizer_config["eos_token"]) == ("<pad>", "<eos>")
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]  # no token_type_ids
    # The modeling code must not depend on megatron_lime: exports are used where it is not installed.
    for name in ("modeling_lime.py", "configuration_lime.py"):
        tree = ast.parse((folder / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert imported <= {"__future__", "math", "torch", "transformers"}, (name, imported)


def test_model_card_is_filled_from_the_run(tiny_run):
    card = (tiny_run["hf16"] / "README.md").read_text()
    assert "| Layers | 2 |" in card and "| d_model | 64 |" in card and "| Vocabulary size | 512 |" in card
    assert "| Steps (iterations) | 1234 |" in card
    assert "12.64M (12,641,920)" in card  # tokens seen
    assert "data/fineweb_text_document" in card and "bf16" in card
    assert 'AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, trust_remote_code=True)' in card


def test_exported_logits_equal_ours_fp32(tiny_run):
    _, hf = load_hf(tiny_run["hf32"])
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # still tied after loading
    ids = torch.randint(0, 512, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tiny_run["model"](ids).logits
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_exported_logits_equal_ours_on_a_left_padded_batch(tiny_run):
    tokenizer, hf = load_hf(tiny_run["hf32"])
    texts = ["Return the sum.", "A much longer sentence about heaps, queues and the rest of the standard library."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and (batch["attention_mask"][0] == 0).any()
    with torch.no_grad():
        logits = hf(**batch).logits
        for row, text in enumerate(texts):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            ours = tiny_run["model"](ids).logits[0]
            torch.testing.assert_close(logits[row, -ids.shape[1]:], ours, rtol=1e-5, atol=1e-5)


def test_bf16_export_matches_ours_in_bf16(tiny_run):
    """The card's dtype: the bf16 export against our model cast to bf16, judged against fp32."""
    _, hf = load_hf(tiny_run["hf16"], dtype=torch.bfloat16)
    assert hf.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    reference = LimeModel(tiny_run["config"]).eval()
    reference.load_state_dict(tiny_run["model"].state_dict())
    reference.to(torch.bfloat16)
    with torch.no_grad():
        fp32 = tiny_run["model"](ids).logits
        ours_bf16 = reference(ids).logits.float()
        theirs = hf(input_ids=ids).logits.float()
    our_error = (ours_bf16 - fp32).abs().max()
    assert (theirs - fp32).abs().max() <= 2 * our_error + 1e-6


def test_save_pretrained_from_pretrained_round_trip(tiny_run, tmp_path):
    tokenizer, hf = load_hf(tiny_run["hf32"])
    hf.save_pretrained(tmp_path / "resaved")
    tokenizer.save_pretrained(tmp_path / "resaved")
    tokenizer2, hf2 = load_hf(tmp_path / "resaved")
    assert hf2.lm_head.weight.data_ptr() == hf2.model.embed_tokens.weight.data_ptr()
    state, state2 = hf.state_dict(), hf2.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    text = "The heapq module keeps a list as a heap."
    assert tokenizer2(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, hf2(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hf_to_ours_to_hf_gives_identical_tensors(tiny_run, tmp_path, dtype):
    export = tiny_run["hf32" if dtype == "fp32" else "hf16"]
    assert convert("--from-hf", "--load", str(export), "--output", str(tmp_path / "back")) == 0
    back = load_lime_weights(tmp_path / "back")
    assert back.kind == "consolidated" and back.config.to_dict() == tiny_run["config"].to_dict()
    assert back.metadata["iteration"] == 1234  # the run's record survives the trip
    model = LimeModel(back.config)
    model.load_state_dict(back.state_dict)  # strict: training can --load it
    assert convert("--load", str(tmp_path / "back"), "--output", str(tmp_path / "again"), "--dtype", dtype) == 0
    first, second = load_file(export / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name]), name


def test_weight_map_is_one_table_read_both_ways(tiny_run):
    state = tiny_run["model"].state_dict()
    hf_state = lime_to_hf_state_dict(state, num_layers=2)
    assert hf_to_lime_state_dict(hf_state, num_layers=2).keys() == state.keys()
    assert len(HF_TO_LIME_WEIGHTS) == 8
    with pytest.raises(CheckpointError, match="missing"):
        lime_to_hf_state_dict({k: v for k, v in state.items() if "layers.1." not in k}, num_layers=2)
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        hf_to_lime_state_dict({**hf_state, "lm_head.weight": torch.zeros(512, 64)}, num_layers=2)


def test_exported_tokenizer_gives_our_ids(tiny_run):
    tokenizer, _ = load_hf(tiny_run["hf16"], dtype=torch.bfloat16)
    ours = load_tokenizer(tiny_run["tokenizer"])
    specials = SPECIAL_TOKENS.as_list()
    with open(tiny_run["corpus"], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:60]
    # Our encode() keeps "<eos>" in raw text as plain text; the HF tokenizer maps it: skip such texts.
    texts = [t for t in texts if not any(s in t for s in specials)]
    assert len(texts) > 40
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    question = "What does heapq do?"
    prompt_ids = tokenizer("<user>" + question + "<assistant>")["input_ids"]
    assert prompt_ids == [ours.user_id, *ours.encode(question), ours.assistant_id]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (ours.pad_id, ours.eos_id)


def test_chat_template_renders_the_sft_prompt(tiny_run):
    tokenizer, _ = load_hf(tiny_run["hf16"], dtype=torch.bfloat16)
    user = [{"role": "user", "content": "Name a queue."}]
    assert tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == \
        "<user>Name a queue.<assistant>"
    with_context = [{"role": "system", "content": "Queues are FIFO."}, *user]
    assert tokenizer.apply_chat_template(with_context, add_generation_prompt=True, tokenize=False) == \
        "<context>Queues are FIFO.<user>Name a queue.<assistant>"
    dialogue = [*user, {"role": "assistant", "content": "deque"}, {"role": "user", "content": "Another?"}]
    assert tokenizer.apply_chat_template(dialogue, add_generation_prompt=True, tokenize=False) == \
        "<user>Name a queue.<assistant>deque<eos><user>Another?<assistant>"


def test_convert_errors_are_clear(tiny_run, tmp_path, capsys):
    assert convert("--load", str(tmp_path / "nothing"), "--output", str(tmp_path / "out")) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert convert("--load", str(tiny_run["ckpt"]), "--output", str(tiny_run["hf32"])) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    # A tokenizer with more ids than the model has rows is the wrong tokenizer.
    big = train_tiny_tokenizer(str(tmp_path / "tok1024"), tiny_run["corpus"], vocab_size=1024)
    assert convert("--load", str(tiny_run["ckpt"]), "--tokenizer", big, "--output", str(tmp_path / "bad")) == 1
    assert "1024 ids but the model only 512" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp-*"))  # nothing half-written


# A real ZeRO-1 run with 2 processes: bf16 module weights, fp32 master weights partitioned over the ranks.
# Rank 0 also saves every parameter's full fp32 master copy as gathered by DeepSpeed itself.
ZERO1_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from megatron_lime.config import LimeConfig
    from megatron_lime.model import LimeModel

    save_dir, tokenizer = sys.argv[-2], sys.argv[-1]
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    config = LimeConfig.from_name("lime-tiny")
    model = LimeModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    rank = torch.distributed.get_rank()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = engine(ids, labels=ids.roll(-1, 1)).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(save_dir, tag="global_step2")
    expected = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    if rank == 0:
        meta = {"model": config.to_dict(), "iteration": 2, "consumed_samples": 8, "consumed_tokens": 128,
                "tokenizer": tokenizer, "data_path": ["tiny"], "dataset_type": "gpt", "args": {}}
        with open(os.path.join(save_dir, "global_step2", "lime_config.json"), "w") as f:
            json.dump(meta, f)
        torch.save(expected, os.path.join(save_dir, "expected_fp32.pt"))
    torch.distributed.destroy_process_group()
    # This bare DeepSpeed script (bf16 ZeRO-1 on gloo, not our trainer) aborts in interpreter
    # teardown, after everything is written, with "terminate called without an active exception"
    # in about half of the runs (a C++ thread destroyed while joinable; PYTHONFAULTHANDLER shows no
    # Python frame left). The checkpoint is complete and the group destroyed: leave without it.
    sys.stdout.flush()
    os._exit(0)
""")


def test_conversion_from_a_two_process_zero1_checkpoint(tiny_run, tmp_path):
    script = tmp_path / "save_zero1.py"
    script.write_text(ZERO1_SCRIPT)
    save_dir = tmp_path / "ds"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
         str(script), str(save_dir), tiny_run["tokenizer"]],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert len(list((save_dir / "global_step2").glob("*_optim_states.pt"))) == 2

    assert convert("--load", str(save_dir), "--output", str(tmp_path / "hf"), "--dtype", "fp32") == 0
    exported = hf_to_lime_state_dict(load_file(tmp_path / "hf" / "model.safetensors"), num_layers=2)
    expected = torch_load(save_dir / "expected_fp32.pt")
    module = torch_load(save_dir / "global_step2" / "mp_rank_00_model_states.pt")["module"]
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    # The fp32 masters, not the bf16 module copy: they differ after two steps.
    assert module["tok_embeddings.weight"].dtype == torch.bfloat16
    assert not torch.equal(exported["tok_embeddings.weight"], module["tok_embeddings.weight"].float())
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "fp32 master weights from 2 rank(s)" in card and "| Steps (iterations) | 2 |" in card
    # The same weights when the tag is named, or the tag directory itself is given.
    for source in (load_lime_weights(save_dir, tag="global_step2"), load_lime_weights(save_dir / "global_step2")):
        assert all(torch.equal(source.state_dict[name], tensor) for name, tensor in expected.items())
    with pytest.raises(CheckpointError, match="checkpoint tag 'global_step9' does not exist"):
        load_lime_weights(save_dir, tag="global_step9")
    # DeepSpeed's universal checkpoint of the same step (what resuming at another world size uses).
    universal = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
         "--input_folder", str(save_dir / "global_step2"), "--output_folder", str(save_dir / "global_step2_universal")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert universal.returncode == 0, universal.stdout[-3000:]
    from_universal = load_lime_weights(save_dir, tag="global_step2_universal")
    assert "universal" in from_universal.source and from_universal.metadata["iteration"] == 2
    assert all(torch.equal(from_universal.state_dict[name], tensor) for name, tensor in expected.items())


def test_conversion_never_imports_the_training_package():
    """An export must not depend on the training loop's modules: checked by import and by reading the source."""
    conversion_dir = os.path.join(REPO, "megatron_lime", "conversion")
    offending = []
    for root, _, files in os.walk(conversion_dir):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offending += [f"{path}: {m}" for m in modules if m.startswith("megatron_lime.training")]
    assert offending == []
    code = ("import sys, megatron_lime.conversion, megatron_lime.conversion.card, megatron_lime.conversion.generation;"
            "import importlib.util as u; s = u.spec_from_file_location('c', 'tools/convert_to_hf.py');"
            "s.loader.exec_module(u.module_from_spec(s));"
            "print(sorted(m for m in sys.modules if m.startswith('megatron_lime.training')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    assert loaded.stdout.strip().splitlines()[-1] == "[]"


def test_overwrite_never_deletes_the_checkpoint_or_anything_it_did_not_write(tiny_run, tmp_path, capsys):
    # A DeepSpeed-like save dir: --output pointing at it, at its parent or inside it is refused, even with --overwrite.
    save = tmp_path / "runs" / "save"
    tag = save / "global_step2"
    tag.mkdir(parents=True)
    (save / "latest").write_text("global_step2")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for output, relation in ((save, "is the --load folder"), (tmp_path / "runs", "contains the --load folder"),
                             (save / "hf", "is inside the --load folder")):
        assert convert("--load", str(save), "--output", str(output), "--overwrite") == 1
        err = capsys.readouterr().err
        assert relation in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    # An existing folder that is not an export is never replaced.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "results.csv").write_text("a,b\n")
    assert convert("--load", str(tiny_run["ckpt"]), "--output", str(other), "--overwrite") == 1
    assert "does not look like an export made by this tool (results.csv)" in capsys.readouterr().err
    assert (other / "results.csv").read_text() == "a,b\n"
    # An earlier export is replaced, whole, and only after the new one is complete.
    export = tmp_path / "export"
    assert convert("--load", str(tiny_run["ckpt"]), "--output", str(export), "--dtype", "fp32") == 0
    (export / "stale.json").write_text("{}")
    assert convert("--load", str(tiny_run["ckpt"]), "--output", str(export), "--overwrite", "--dtype", "fp32") == 0
    assert not (export / "stale.json").exists() and (export / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old folder left


def test_exported_files_follow_the_umask(tiny_run, tmp_path):
    previous = os.umask(0o027)
    try:
        assert convert("--load", str(tiny_run["ckpt"]), "--output", str(tmp_path / "hf"), "--dtype", "fp32") == 0
        assert convert("--from-hf", "--load", str(tmp_path / "hf"), "--output", str(tmp_path / "back")) == 0
    finally:
        os.umask(previous)
    files = [p for folder in ("hf", "back") for p in (tmp_path / folder).iterdir()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "lime_config.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o640) for p in files}
