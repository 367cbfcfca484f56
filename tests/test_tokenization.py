"""One tokenisation of prompt and text: the filled template is tokenised as one string, so a
text's first word is the token it is anywhere else, and a long text is cut at one of its own
token boundaries, never the template or EOS."""

from __future__ import annotations

import pytest

from llmret.plan import entry_tokenization
from llmret.retrieval.tokenization import frame_texts

TEMPLATES = ["query: {text}", "passage: {text}", "{text} The next sentence:", "{text}"]
TEXTS = [
    "what do cats eat",
    "Cats eat mice.",
    "Vitamin D deficiency is common in northern latitudes during winter, say the authors.",
    "x",
]


@pytest.mark.slow
def test_prompt_and_text_are_one_string(tok):
    ids = frame_texts(tok, ["what do cats eat"], "query: {text}", 32, append_eos=True, head=[], tail=[])[0]
    assert tok.convert_ids_to_tokens(ids) == ["query", ":", "Ġwhat", "Ġdo", "Ġcats", "Ġeat", "<|im_end|>"]
    # the first word is the token it is inside a document (apart, it was 'Ġ' + 'what')
    inside = tok("they asked what to do", add_special_tokens=False)["input_ids"]
    assert ids[2] in inside


@pytest.mark.slow
@pytest.mark.parametrize("template", TEMPLATES)
def test_untruncated_rows_are_the_filled_template(tok, template):
    rows = frame_texts(tok, TEXTS, template, 512, append_eos=True, head=[], tail=[])
    for text, row in zip(TEXTS, rows, strict=True):
        assert row == tok(template.format(text=text), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.slow
@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("max_length", [6, 9, 14])
def test_a_long_text_is_cut_never_the_template_or_eos(tok, template, max_length):
    before, after = template.split("{text}")
    text = TEXTS[2]
    row = frame_texts(tok, [text], template, max_length, append_eos=True, head=[], tail=[])[0]
    assert len(row) <= max_length and row[-1] == tok.eos_token_id
    decoded = tok.decode(row[:-1])
    assert decoded.startswith(before) and decoded.endswith(after)
    kept = decoded[len(before) : len(decoded) - len(after)]
    assert kept and text.startswith(kept) and kept != text  # a prefix of the text, cut
    # the longest such cut: one more of the text's tokens would not fit
    full = tok(template.format(text=text), add_special_tokens=False, return_offsets_mapping=True)
    ends = sorted({e - len(before) for s, e in full["offset_mapping"] if len(before) < e <= len(before) + len(text)})
    longer = [e for e in ends if e > len(kept)]
    if longer:
        bigger = tok(before + text[: longer[0]] + after, add_special_tokens=False)["input_ids"]
        assert len(bigger) + 1 > max_length


@pytest.mark.slow
def test_no_room_for_text_names_the_setting(tok):
    with pytest.raises(ValueError, match="max_query_length=4 leaves no room"):
        frame_texts(tok, ["a"], "query: {text}", 4, append_eos=True, head=[], tail=[], length_name="max_query_length")


def test_jobs_whose_ids_changed_carry_the_joint_tag():
    """A template with a prompt before the text changed its ids; the tag (a job param) makes
    their encodings and models again. Text-first templates (LLaRA's) gave the same ids."""
    assert entry_tokenization("systems.dense", {"query_template": "query: {text}"}) == "joint"
    llara = {"query_template": "{text} The next sentence:", "passage_template": "{text} The original sentence:"}
    assert entry_tokenization("systems.dense", llara) == ""
    assert entry_tokenization("systems.sparse", {}) == "joint"  # defaults: "query: {text}"
    assert entry_tokenization("adaptation", {"template": "{text}"}) == ""
    assert entry_tokenization("finetuning", {}) == "joint"
