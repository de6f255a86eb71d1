"""Tool calls read out of a reply as it streams (rwkv_lm/serve/tools.py's CallReader): pieces split anywhere
read as the whole text does; a call's id and name come first, then its arguments as they are written."""
import json
import random

import pytest

from rwkv_lm.serve.tools import CallReader, read_calls

TOOLS = [{"name": "get_weather"}, {"name": "noop"}]
TWO_CALLS = ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Pa}\\"ris", "days": [1, {"a": 2}]}}'
             '</tool_call>\n<tool_call>{"name": "noop", "arguments": {}}</tool_call>\nDone.')


def read_in_pieces(text, cuts):
    reader, events = CallReader(TOOLS), []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        events += reader.feed(text[start:end])
    return reader, events + reader.finish()


def summary(reader):
    return reader.content, [(c.name, c.arguments, c.complete) for c in reader.calls]


@pytest.mark.parametrize("text", [TWO_CALLS, "Hi there \n", "a <tool_call>{\"name\": \"other\", \"arguments\": {}}</tool_call>",
                                  '<tool_call>{"name": "noop", "arguments": {"a": 1', "ends in <tool_ca",
                                  '<tool_call> {"name" :"noop","arguments":{"x": "}"}} </tool_call> <tool_call>{"n'])
def test_pieces_split_anywhere_read_as_the_whole(text):
    whole = summary(read_calls(text, TOOLS))
    rng = random.Random(5)
    for trial in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, trial % 7 + 1)))
        assert summary(read_in_pieces(text, cuts)[0]) == whole, cuts


def test_events_are_the_text_then_each_call_as_written():
    reader, events = read_in_pieces(TWO_CALLS, list(range(1, len(TWO_CALLS))))  # a character at a time
    assert reader.content == "Let me check.\nDone."
    assert [(c.name, json.loads(c.arguments)) for c in reader.calls] == [
        ("get_weather", {"city": 'Pa}"ris', "days": [1, {"a": 2}]}), ("noop", {})]
    kinds = [e[0] for e in events]
    assert kinds.index("call") > kinds.index("content") and kinds.count("call") == 2
    first_call = kinds.index("call")
    fragments = [e[2] for e in events[first_call + 1:] if e[0] == "arguments" and e[1] == 0]
    assert len(fragments) == len(reader.calls[0].arguments)  # each character given out as it came
    assert "".join(e[1] for e in events if e[0] == "content") == reader.content


def test_a_tag_that_is_not_a_call_of_an_offered_function_stays_text():
    for text in ['<tool_call>{"name": "other", "arguments": {}}</tool_call>',
                 '<tool_call>{"arguments": {}, "name": "noop"}</tool_call>', "<tool_call>oops"]:
        reader = read_calls(text, TOOLS)
        assert reader.calls == [] and reader.content == text


def test_a_cut_off_call_is_incomplete():
    reader = read_calls('<tool_call>{"name": "noop", "arguments": {"a": 1', TOOLS)
    assert reader.calls[0].arguments == '{"a": 1' and not reader.complete and reader.content == ""
