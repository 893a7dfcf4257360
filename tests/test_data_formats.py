import pytest

from cerbero_ray.data.formats import Reject, check_turns, detect_format, to_document

U, A = "user", "assistant"


def test_openai_sharegpt_alpaca_text():
    msgs = [{"role": U, "content": "Ciao"}, {"role": A, "content": "Salve"}]
    assert to_document({"messages": msgs}, "openai").messages == msgs
    sg = {"conversations": [{"from": "human", "value": "Ciao"}, {"from": "gpt", "value": "Salve"}]}
    assert to_document(sg, "sharegpt").messages == msgs
    al = to_document({"instruction": "Traduci", "input": "hello", "output": "ciao"}, "alpaca").messages
    assert al == [{"role": U, "content": "Traduci\n\nhello"}, {"role": A, "content": "ciao"}]
    assert (
        to_document({"instruction": "Di' ciao", "input": "", "output": "ciao"}, "alpaca").messages[0]["content"]
        == "Di' ciao"
    )
    assert to_document({"testo": "Roma"}, "text", text_field="testo").text == "Roma"


def test_system_turn_kept_first():
    msgs = [{"role": "system", "content": "Sii breve."}, {"role": U, "content": "a"}, {"role": A, "content": "b"}]
    assert to_document({"messages": msgs}, "openai").messages == msgs


@pytest.mark.parametrize(
    "record,fmt,reason",
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, "openai", "unknown_role"),
        ({"messages": [{"role": U, "content": "a"}, {"role": U, "content": "b"}]}, "openai", "non_alternating"),
        ({"messages": [{"role": A, "content": "a"}, {"role": U, "content": "b"}]}, "openai", "non_alternating"),
        ({"messages": [{"role": U, "content": "a"}]}, "openai", "no_assistant_turn"),
        ({"messages": [{"role": U, "content": "  "}, {"role": A, "content": "b"}]}, "openai", "empty_text"),
        ({"messages": []}, "openai", "empty_text"),
        ({"messages": "ciao"}, "openai", "wrong_type"),
        ({"other": 1}, "openai", "missing_field"),
        ({"messages": [{"role": U, "content": 3}, {"role": A, "content": "b"}]}, "openai", "wrong_type"),
        ({"messages": [{"role": U, "content": "\ud800"}, {"role": A, "content": "b"}]}, "openai", "invalid_utf8"),
        ({"instruction": "a"}, "alpaca", "missing_field"),
        ({"text": ""}, "text", "empty_text"),
        ({"title": "x"}, "text", "missing_field"),
        ([1, 2], "text", "wrong_type"),
    ],
)
def test_rejects(record, fmt, reason):
    with pytest.raises(Reject) as e:
        to_document(record, fmt)
    assert e.value.reason == reason


def test_detect_format():
    assert detect_format({"messages": []}) == "openai"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "", "output": ""}) == "alpaca"
    assert detect_format({"text": ""}) == "text"
    assert detect_format({"body": ""}) is None
    assert detect_format({"body": ""}, text_field="body") == "text"


def test_check_turns_only_system():
    with pytest.raises(Reject, match="no_assistant_turn"):
        check_turns([{"role": "system", "content": "x"}])
