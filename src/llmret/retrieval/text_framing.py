"""How a query or a passage is framed before it is tokenised: the settings that every text
encoder and every stage that trains one share (:class:`TextFraming`), and their checks.

The bounds of the lengths come from the config schema (:func:`llmret.schema.check_bounds`,
called by each spec with its own entry); what a schema cannot say, one ``{text}`` per
template, is checked here.
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATES = ("query_template", "passage_template")
FIELDS = (*TEMPLATES, "append_eos", "max_query_length", "max_passage_length")


def check_template(spec: object, name: str) -> None:
    """``ValueError`` unless the template ``spec.<name>`` holds ``{text}`` exactly once."""
    value = getattr(spec, name)
    if value.count("{text}") != 1:
        raise ValueError(f"{name} must contain '{{text}}' exactly once: {value!r}")


def check_templates(spec: object) -> None:
    """Both templates (query and passage) hold ``{text}`` exactly once."""
    for name in TEMPLATES:
        check_template(spec, name)


@dataclass(frozen=True)
class TextFraming:
    """Templates (``{text}`` marks where the text goes), whether EOS ends the text, and the
    max lengths in tokens (the frame's special tokens and EOS included). No defaults here:
    each subclass takes its own config entry's schema defaults
    (:func:`llmret.schema.defaults_from`: a dense system frames ``{text}``, a fine-tuning
    run ``query: {text}``) and calls :func:`llmret.schema.check_bounds` for its entry."""

    query_template: str
    passage_template: str
    append_eos: bool
    max_query_length: int
    max_passage_length: int

    def __post_init__(self) -> None:
        check_templates(self)
