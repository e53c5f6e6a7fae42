"""SFT adapters, readers, mixture files and the template's loss mask.

Every adapter reads rows written here in its dataset's own schema (megatron_lime.data.sft.sample_rows),
including the quirks each dataset has; the mask tests decode what is trained.
"""

from __future__ import annotations

import json
import os

import datasets
import pytest
from helpers import train_tiny_tokenizer, write_tiny_corpus

from megatron_lime.data.sft import sample_rows
from megatron_lime.data.readers import CORPUS_SUFFIXES, BadRecordError, find_input_files, iter_input_rows
from megatron_lime.data.sft.adapters import ADAPTERS, conversation_to_example, get_adapter
from megatron_lime.data.sft.mixture import MixtureError, load_mixture
from megatron_lime.data.sft.template import SFTExample, TemplateIds, Turn, encode_examples, render, render_examples
from megatron_lime.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_tokenizer")
    corpus = write_tiny_corpus(str(tmp / "corpus.jsonl"))
    return load_tokenizer(train_tiny_tokenizer(str(tmp / "tokenizer"), corpus))


def one_turn(user: str, assistant: str, context: str | None = None) -> SFTExample:
    return SFTExample(turns=(Turn(user, assistant),), context=context)


# What each sample row must become: one entry per row of SAMPLE_ROWS[name] (None = filtered out).
EXPECTED: dict[str, list[SFTExample | None]] = {
    "databricks/databricks-dolly-15k": [
        one_turn("When did Virgin Australia start operating?",
                 "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a "
                 "single route.",
                 context="Virgin Australia, the trading name of Virgin Australia Airlines Pty Ltd, is an "
                         "Australian-based airline. It commenced services on 31 August 2000 as Virgin Blue, with two "
                         "aircraft on a single route. It suddenly found itself as a major airline in Australia's "
                         "domestic market."),
        one_turn("Which is a species of fish? Tope or Rope", "Tope"),  # empty context -> no context block
        one_turn("Why can camels survive for long without water?",
                 "Camels use the fat in their humps to keep them filled with energy and hydration for long "
                 "periods of time."),
    ],
    "yahma/alpaca-cleaned": [
        one_turn("Give three tips for staying healthy.",
                 "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep seven to nine hours a night."),
        one_turn("Translate the sentence into French.\n\nThe cat is sleeping on the sofa.",
                 "Le chat dort sur le canapé."),
    ],
    "teknium/GPT4-LLM-Cleaned": [
        one_turn("Summarise the water cycle in one sentence.",
                 "Water evaporates, condenses into clouds, falls as precipitation and flows back to the sea."),
        one_turn("Classify the animal.\n\nDolphin", "A dolphin is a mammal."),
    ],
    "HuggingFaceH4/no_robots": [
        one_turn("Write a haiku about autumn leaves.",
                 "Red leaves drift and fall\nwhispering to the cold ground\nsummer says goodbye",
                 context="You are a poet who writes only haiku."),
        SFTExample(turns=(Turn("What is the capital of Peru?", "Lima! It sits on the Pacific coast."),
                          Turn("And how high is Cusco?", "Cusco is about 3,400 metres above sea level.")),
                   context="You are Quinn, a cheerful travel bot."),
        one_turn("Name two primary colours.", "Red and blue."),
    ],
    "HuggingFaceTB/everyday-conversations-llama3.1-2k": [
        SFTExample(turns=(Turn("Hi there", "Hello! How can I help you today?"),
                          Turn("What is a quick breakfast?", "Oatmeal with fruit takes five minutes."),
                          Turn("Thanks!", "You're welcome. Enjoy your breakfast!"))),
        SFTExample(turns=(Turn("Will it rain today?", "I can't see forecasts, but a weather app can tell you."),
                          Turn("Which app?", "Most phones come with one built in."))),
    ],
    "Magpie-Align/Magpie-Pro-300K-Filtered": [
        one_turn("What is a prime number?",
                 "A prime number is a whole number greater than 1 whose only divisors are 1 and itself."),
        one_turn("Suggest a name for a bakery.", "How about \"Rise and Shine Bakery\"?"),  # conversations null
    ],
    "TIGER-Lab/WebInstruct-verified": [
        one_turn("Compute the derivative of x^2 at x = 2.", "4"),  # a bare number in the JSON
        one_turn("What is the SI unit of force?", "N"),
        one_turn("Simplify 6/8.", "\\frac{3}{4}"),
    ],
    "Dahoas/synthetic-instruct-gptj-pairwise": [
        one_turn("How do I boil an egg?",
                 "Place the egg in boiling water for nine minutes, then cool it in cold water."),
        one_turn("What should I pack for a beach day?", "Sunscreen, water, a towel and a hat."),
    ],
    "projecte-aina/RAG_Multilingual": [
        None, None,
        one_turn("What is the tallest mountain in Spain?", "Teide, at 3,715 metres.",
                 context="Teide, on Tenerife, rises 3,715 metres and is the highest point in Spain."),
    ],
}


def test_every_registered_adapter_is_covered():
    assert set(ADAPTERS) == set(EXPECTED) == set(sample_rows.SAMPLE_ROWS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_adapter_maps_rows_to_template(name):
    adapter = get_adapter(name)
    assert [adapter.convert(row) for row in sample_rows.SAMPLE_ROWS[name]] == EXPECTED[name]


def test_adapter_lookup_is_case_insensitive_and_checks_options():
    assert type(get_adapter("DATABRICKS/databricks-dolly-15k")).hub_name == "databricks/databricks-dolly-15k"
    with pytest.raises(ValueError, match="no SFT adapter for dataset 'someone/else'.*yahma/alpaca-cleaned"):
        get_adapter("someone/else")
    with pytest.raises(ValueError, match="bad options"):
        get_adapter("yahma/alpaca-cleaned", {"languages": ["en"]})


def test_rag_language_filter_option():
    catalan = get_adapter("projecte-aina/RAG_Multilingual", {"languages": ["CA", "es"]})
    kept = [catalan.convert(row) for row in sample_rows.RAG_ROWS]
    assert [e.turns[0].assistant if e else None for e in kept] == ["Barcelona.", "Madrid.", None]


def test_conversation_rules():
    merged = conversation_to_example([
        {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use English."},
        {"role": "user", "content": "Part one."}, {"role": "user", "content": "Part two."},
        {"role": "assistant", "content": " Answer. "}, {"role": "user", "content": "Unanswered follow-up"}])
    assert merged == SFTExample(turns=(Turn("Part one.\n\nPart two.", "Answer."),), context="Be brief.\n\nUse English.")
    greeting_first = conversation_to_example([{"from": "gpt", "value": "Hi, ask me anything."},
                                              {"from": "human", "value": "Why is the sky blue?"},
                                              {"from": "gpt", "value": "Rayleigh scattering."}], "from", "value")
    assert greeting_first == one_turn("Why is the sky blue?", "Rayleigh scattering.")
    bad_conversations = {
        "unknown role 'narrator'": [{"role": "narrator", "content": "Once"}],
        "system message after the first turn": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                {"role": "system", "content": "c"}, {"role": "user", "content": "d"},
                                                {"role": "assistant", "content": "e"}],
        "'content' is empty": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}],
        "no user message followed by an assistant reply": [{"role": "user", "content": "alone"}],
        "should be a list of messages": "user: hi",
    }
    for reason, messages in bad_conversations.items():
        with pytest.raises(BadRecordError, match=reason):
            conversation_to_example(messages)


@pytest.mark.parametrize("name, row, reason", [
    ("databricks/databricks-dolly-15k", {"instruction": "Q", "context": ""}, "missing column 'response'"),
    ("databricks/databricks-dolly-15k", {"instruction": "Q", "context": "", "response": "[3]"}, "citation markers"),
    ("yahma/alpaca-cleaned", {"instruction": "Q", "input": "", "output": None}, "column 'output' is null"),
    ("yahma/alpaca-cleaned", {"instruction": ["Q"], "input": "", "output": "A"}, "should be text, got list"),
    ("HuggingFaceH4/no_robots", {"prompt": "Q"}, "missing column 'messages'"),
    ("Magpie-Align/Magpie-Pro-300K-Filtered", {"conversations": [{"from": "human", "value": "Q"},
                                                                   {"from": "gpt", "value": ""}]}, "is empty"),
    ("TIGER-Lab/WebInstruct-verified", {"question": "Q", "answer": ""}, "column 'answer' is empty"),
    ("Dahoas/synthetic-instruct-gptj-pairwise", {"prompt": "Q", "rejected": "no"}, "missing column 'chosen'"),
    ("projecte-aina/RAG_Multilingual", {"instruction": "Q", "context": "", "response": "A"}, "missing column 'lang'"),
])
def test_bad_rows_say_what_is_wrong(name, row, reason):
    with pytest.raises(BadRecordError, match=reason):
        get_adapter(name).convert(row)


# ---------------------------------------------------------------------------------------------
# Readers: every layout users download or save.

ROWS = [{"instruction": "first", "n": 1}, {"instruction": "second", "n": 2}, {"instruction": "third", "n": 3}]


def read_all(path, split=None):
    return [row for _, row in iter_input_rows(str(path), split)]


def test_readers_json_layouts(tmp_path):
    assert read_all(sample_rows.write_jsonl(str(tmp_path / "a.jsonl"), ROWS)) == ROWS
    assert read_all(sample_rows.write_json_array(str(tmp_path / "b.json"), ROWS)) == ROWS
    # JSON lines under a .json name (as several hub datasets ship) and a {"train": [...]} object.
    lines_as_json = tmp_path / "c.json"
    lines_as_json.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert read_all(lines_as_json) == ROWS
    (tmp_path / "d.json").write_text(json.dumps({"train": ROWS}))
    assert read_all(tmp_path / "d.json") == ROWS
    (tmp_path / "e.json").write_text(json.dumps({"train": ROWS, "test": ROWS[:1]}))
    assert read_all(tmp_path / "e.json", "test") == ROWS[:1]
    with pytest.raises(BadRecordError, match="several splits \\(train, test\\).*got 'validation'"):
        read_all(tmp_path / "e.json", "validation")
    (tmp_path / "f.json").write_text(json.dumps(ROWS[0], indent=2))  # one pretty-printed row
    assert read_all(tmp_path / "f.json") == ROWS[:1]
    (tmp_path / "g.json").write_text('[{"instruction": "x"},')
    with pytest.raises(BadRecordError, match="g.json: line 1: malformed JSON"):
        read_all(tmp_path / "g.json")


def test_readers_parquet_glob_directory_and_split(tmp_path):
    sample_rows.write_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet"), ROWS[:2])
    sample_rows.write_parquet(str(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet"), ROWS[2:])
    sample_rows.write_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"),
                              [{"instruction": "t", "n": 9}])
    (tmp_path / "hub" / "README.md").write_text("# card")
    (tmp_path / "hub" / "dataset_infos.json").write_text("{}")
    os.makedirs(tmp_path / "hub" / ".cache" / "huggingface")
    (tmp_path / "hub" / ".cache" / "huggingface" / "x.json").write_text("{}")
    assert read_all(tmp_path / "hub", "train") == ROWS
    assert read_all(tmp_path / "hub", "test") == [{"instruction": "t", "n": 9}]
    assert read_all(str(tmp_path / "hub" / "data" / "train-*.parquet")) == ROWS
    with pytest.raises(FileNotFoundError, match="no such file, directory or glob match"):
        find_input_files(str(tmp_path / "missing-*.parquet"), CORPUS_SUFFIXES)


def test_readers_saved_datasets(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(ROWS),
                          "test_sft": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "dict"))
    assert read_all(tmp_path / "plain") == ROWS
    assert read_all(tmp_path / "dict", "test_sft") == ROWS[:1]
    with pytest.raises(BadRecordError, match="no split 'train'.*train_sft"):
        read_all(tmp_path / "dict", "train")


def test_reader_reports_unreadable_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "ok"}\n\n{"instruction": \n[1, 2]\n')
    rows = list(iter_input_rows(str(path)))
    assert [str(loc) for loc, _ in rows] == [f"{path}, line 1", f"{path}, line 3", f"{path}, line 4"]
    assert rows[0][1] == {"instruction": "ok"}
    assert isinstance(rows[1][1], BadRecordError) and "malformed JSON" in rows[1][1].reason
    assert isinstance(rows[2][1], BadRecordError) and "expected a JSON object" in rows[2][1].reason


# ---------------------------------------------------------------------------------------------
# The template and its mask.

def trained_segments(tokens: list[int], mask: list[int], eos_id: int) -> list[list[int]]:
    """The runs of trained tokens, each cut after its <eos>."""
    segments, current = [], []
    for token, trained in zip(tokens, mask):
        if trained:
            current.append(token)
            if token == eos_id:
                segments.append(current)
                current = []
        else:
            assert not current, "a trained run must end with <eos>"
    assert not current
    return segments


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mask_trains_exactly_responses_and_eos(name, tokenizer):
    examples = [e for e in EXPECTED[name] if e is not None]
    for example, rendered in zip(examples, render_examples(examples, tokenizer)):
        tokens, mask = rendered.token_ids, rendered.loss_mask
        segments = trained_segments(tokens, mask, tokenizer.eos_id)
        assert [tokenizer.decode(s[:-1]) for s in segments] == [t.assistant for t in example.turns]
        assert all(s[-1] == tokenizer.eos_id for s in segments)
        # The whole sequence is exactly the template, pieces encoded on their own.
        expected = [tokenizer.context_id, *tokenizer.encode(example.context)] if example.context else []
        for turn in example.turns:
            expected += [tokenizer.user_id, *tokenizer.encode(turn.user), tokenizer.assistant_id,
                         *tokenizer.encode(turn.assistant), tokenizer.eos_id]
        assert tokens == expected
        untrained = [t for t, m in zip(tokens, mask) if not m]
        assert tokenizer.eos_id not in untrained and tokenizer.assistant_id in untrained


def test_single_turn_prompt_matches_the_cards_inference_prompt(tokenizer):
    """Training must see the prompt exactly as the card builds it: "<user>" + question + "<assistant>"."""
    question, answer = "Write five questions for a Data Scientist interview.", "1. What is overfitting?"
    rendered = render_examples([one_turn(question, answer)], tokenizer)[0]
    prompt = [tokenizer.user_id, *tokenizer.encode(question), tokenizer.assistant_id]
    assert rendered.token_ids[:len(prompt)] == prompt
    assert rendered.loss_mask[:len(prompt)] == [0] * len(prompt)
    assert all(rendered.loss_mask[len(prompt):])


def test_over_length_policies(tokenizer):
    ids = TemplateIds.from_tokenizer(tokenizer)
    context = "The quick brown fox jumps over the lazy dog. " * 20
    rag = encode_examples([one_turn("What jumps?", "The fox.", context=context)], tokenizer)[0]
    full = render(rag, ids)
    turn_tokens = len(full.token_ids) - 1 - len(rag.context)

    fits = render(rag, ids, max_tokens=len(full.token_ids))
    assert fits.token_ids == full.token_ids and not fits.truncated
    assert render(rag, ids, max_tokens=len(full.token_ids) - 1, over_length="drop") is None

    cut = render(rag, ids, max_tokens=turn_tokens + 1 + 10)  # room for 10 context tokens
    assert cut.context_truncated and len(cut.token_ids) == turn_tokens + 11
    assert cut.token_ids[:11] == [ids.context_id, *rag.context[:10]]  # the beginning is kept
    assert cut.token_ids[11:] == full.token_ids[-turn_tokens:]

    no_room = render(rag, ids, max_tokens=turn_tokens)  # the <context> tag alone would not fit
    assert no_room.context_truncated and no_room.token_ids == full.token_ids[-turn_tokens:]
    assert render(rag, ids, max_tokens=turn_tokens - 1) is None  # the turn itself is too long

    chat = EXPECTED["HuggingFaceTB/everyday-conversations-llama3.1-2k"][0]
    encoded = encode_examples([chat], tokenizer)[0]
    whole = render(encoded, ids)
    first_two = sum(len(u) + len(a) + 3 for u, a in encoded.turns[:2])
    shortened = render(encoded, ids, max_tokens=len(whole.token_ids) - 1)
    assert shortened.turns_dropped == 1 and shortened.token_ids == whole.token_ids[:first_two]
    assert render(encoded, ids, max_tokens=len(whole.token_ids) - 1, over_length="drop") is None


def test_template_needs_the_sft_special_tokens(tokenizer):
    class NoTags:
        eos_id, user_id, assistant_id, context_id = 1, None, 4, None

    with pytest.raises(ValueError, match="no user, context special token"):
        TemplateIds.from_tokenizer(NoTags())


# ---------------------------------------------------------------------------------------------
# Mixture files.

def write_yaml(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_mixture_resolves_paths_and_validates(tmp_path):
    mixture = load_mixture(write_yaml(tmp_path / "m.yaml", """
seed: 7
datasets:
  - {name: yahma/alpaca-cleaned, path: alpaca.json, max_examples: 10, weight: 0.5}
  - {name: projecte-aina/RAG_Multilingual, path: /abs/rag, split: train, options: {languages: [en, es]}}
"""))
    assert mixture.seed == 7 and mixture.seq_length == 512 and mixture.over_length == "truncate"
    assert mixture.datasets[0].path == str(tmp_path / "alpaca.json")
    assert mixture.datasets[1].path == "/abs/rag" and mixture.datasets[1].options == {"languages": ["en", "es"]}
    assert load_mixture(str(tmp_path / "m.yaml"), data_root="/data").datasets[0].path == "/data/alpaca.json"

    cases = {
        "unknown key\\(s\\) wieght": "datasets:\n  - {name: yahma/alpaca-cleaned, path: a, wieght: 2}\n",
        "datasets\\[0\\].*no SFT adapter for dataset 'nobody/nothing'":
            "datasets:\n  - {name: nobody/nothing, path: a}\n",
        "'path' is required": "datasets:\n  - {name: yahma/alpaca-cleaned}\n",
        "max_examples must be a positive integer":
            "datasets:\n  - {name: yahma/alpaca-cleaned, path: a, max_examples: 0}\n",
        "weight must be positive": "datasets:\n  - {name: yahma/alpaca-cleaned, path: a, weight: -1}\n",
        "over_length must be one of": "over_length: wrap\ndatasets:\n  - {name: yahma/alpaca-cleaned, path: a}\n",
        "'datasets' must be a non-empty list": "seed: 1\n",
        "invalid YAML": "datasets: [\n",
        "options must be a mapping": "datasets:\n  - {name: yahma/alpaca-cleaned, path: a, options: [en]}\n",
        "weight must be a number": "datasets:\n  - {name: yahma/alpaca-cleaned, path: a, weight: lots}\n",
        "seq_length must be an integer": "seq_length: 5x\ndatasets:\n  - {name: yahma/alpaca-cleaned, path: a}\n",
    }
    for i, (message, text) in enumerate(cases.items()):
        path = write_yaml(tmp_path / f"bad{i}.yaml", text)
        with pytest.raises(MixtureError, match=f"{os.path.basename(path)}.*{message}|{message}"):
            load_mixture(path)


def test_card_mixture_example_is_valid():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mixture = load_mixture(os.path.join(repo, "examples", "sft_mixture_lime_1b.yaml"), data_root="/data/sft")
    assert {d.name for d in mixture.datasets} >= set(ADAPTERS) - {"projecte-aina/RAG_Multilingual"}
    assert mixture.seq_length == 512


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer.path)


def test_training_tokens_match_transformers_prompt_and_chat_template(tokenizer, hf_tokenizer):
    """What users run (transformers' tokenizer on the card's prompt, or the export's chat template)
    gives the same ids as the training examples."""
    from megatron_lime.conversion.hf_export import CHAT_TEMPLATE

    examples = [e for rows in EXPECTED.values() for e in rows if e is not None]
    for example, rendered in zip(examples, render_examples(examples, tokenizer)):
        question = example.turns[0].user
        prompt_ids = hf_tokenizer("<user>" + question + "<assistant>", add_special_tokens=False)["input_ids"]
        start = rendered.token_ids.index(tokenizer.user_id)
        assert rendered.token_ids[start:start + len(prompt_ids)] == prompt_ids
        messages = ([{"role": "system", "content": example.context}] if example.context else []) + [
            message for turn in example.turns
            for message in ({"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant})]
        text = hf_tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False)
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == rendered.token_ids
