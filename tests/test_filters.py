"""megatron_lime/data/filters.py: the --filter expression language (parser, safety, semantics, counts)."""

import pytest

from megatron_lime.data.filters import FilterSyntaxError, FilterValueError, RecordFilters, parse_filter

RECORD = {"text": "t", "int_score": 3, "score": 2.71, "language": "en", "language_score": 0.93,
          "dump": "CC-MAIN-2025-05", "flag": True, "missing_value": None}


@pytest.mark.parametrize("expression, expected", [
    ("int_score >= 3", True),
    ("int_score > 3", False),
    ("int_score == 3 and language == 'en'", True),
    ("int_score == 4 or language == \"en\"", True),
    ("not language == 'en'", False),
    ("language != 'en'", False),
    ("score < 3", True),
    ("score <= 2.71", True),
    ("0.9 <= language_score < 1", True),
    ("0.95 <= language_score < 1", False),
    ("language in ['en', 'de']", True),
    ("language not in ('en', 'de')", False),
    ("dump in ['CC-MAIN-2024-51']", False),
    ("int_score in [3, 4, 5]", True),
    ("flag == True", True),
    ("flag", True),
    ("missing_value == None", True),
    ("missing_value != None or int_score >= 3", True),
    ("(int_score >= 4 or score > 2.5) and not (language in ['fr'])", True),
    ("int_score > -1", True),
    ("  int_score >= 3  ", True),
])
def test_semantics(expression, expected):
    f = parse_filter(expression)
    assert f(RECORD) is expected


def test_columns_are_collected_in_order():
    f = parse_filter("language == 'en' and language_score >= 0.9 and language != 'x'")
    assert f.columns == ("language", "language_score")
    filters = RecordFilters(["int_score >= 3", "language == 'en'", "int_score < 5"])
    assert filters.columns == ("int_score", "language")


@pytest.mark.parametrize("expression, column, what", [
    ("__import__('os')", 1, "function calls are not allowed"),
    ("__import__('os').system('true')", 1, "function calls are not allowed"),
    ("text.upper() == 'A'", 1, "function calls are not allowed"),
    ("text.__class__ == 1", 1, "attribute access is not allowed"),
    ("language_score.real > 0", 1, "attribute access is not allowed"),
    ("int_score >= 3 and open('/etc/passwd')", 20, "function calls are not allowed"),
    ("text[0] == 'a'", 1, "subscripts are not allowed"),
    ("int_score + 1 > 3", 1, "arithmetic is not allowed"),
    ("(lambda: 1)() == 1", 1, "function calls are not allowed"),
    ("[x for x in text] == []", 1, "comprehensions are not allowed"),
    ("int_score is 3", 1, "the operator 'Is' is not allowed"),
    ("language in text", 13, "'in' needs a list literal"),
    ("language in ['en', text]", 20, "a list after 'in' may hold only string/number/True/False/None literals"),
    ("['en'] == language", 1, "a list is only allowed after 'in'"),
    ("f'{text}' == 'a'", 1, "f-strings are not allowed"),
    ("(x := 1) == 1", 2, "assignments are not allowed"),
    ("-int_score < 0", 1, "arithmetic is not allowed"),
])
def test_refused_with_position(expression, column, what):
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(expression)
    message = str(info.value)
    assert message.startswith(f"--filter {expression!r}: column {column}: {what}"), message
    assert "\n" not in message


@pytest.mark.parametrize("expression, message", [
    ("int_score >=", "at the end: not a valid expression"),
    ("int_score = 3", "column 11: not a valid expression"),
    ("import os", "not a valid expression"),
    ("", "not a valid expression"),
])
def test_syntax_errors(expression, message):
    with pytest.raises(FilterSyntaxError, match=message):
        parse_filter(expression)


def test_never_evaluates_python():
    # Names are columns, never Python builtins or globals: this reads a column called __builtins__.
    f = parse_filter("__builtins__ == 'x'")
    assert f({"__builtins__": "x"}) is True
    with pytest.raises(FilterValueError, match="no column '__builtins__'"):
        f({"text": "a"})


@pytest.mark.parametrize("expression, record, message", [
    ("int_score >= 3", {"text": "a", "score": 1}, "no column 'int_score' in this record (columns: text, score)"),
    ("int_score >= '3'", RECORD, "cannot compare int 3 >= str '3'"),
    ("int_score == '3'", RECORD, "cannot compare int 3 == str '3'"),
    ("language_score >= 0.9", {"language_score": None}, "cannot compare null >= float 0.9"),
    ("language in [1, 2]", RECORD, "cannot compare str 'en' in"),
])
def test_record_errors(expression, record, message):
    with pytest.raises(FilterValueError) as info:
        parse_filter(expression)(record)
    assert str(info.value).startswith(f"--filter {expression!r}: {message}"), str(info.value)


def test_counts_per_filter():
    filters = RecordFilters(["int_score >= 3", "language == 'en'"])
    records = [{"int_score": s, "language": lang}
               for s, lang in [(2, "en"), (3, "en"), (4, "de"), (5, "en"), (1, "fr")]]
    kept = [r for r in records if filters.keep(r)]
    assert kept == [records[1], records[3]]
    # The second filter only sees what the first kept.
    assert filters.counts() == [("int_score >= 3", 3, 2), ("language == 'en'", 2, 1)]
    assert filters.take_counts() == [(5, 3), (3, 2)]
    assert filters.counts() == [("int_score >= 3", 0, 0), ("language == 'en'", 0, 0)]
    filters.add_counts([(5, 3), (3, 2)])
    assert "filter \"language == 'en'\": kept 2, dropped 1" in filters.summary()
