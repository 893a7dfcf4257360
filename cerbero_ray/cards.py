"""What the cards of a trained model folder (:mod:`cerbero_ray.train.card`) and of an export folder
(:mod:`cerbero_ray.export.card`) share: the Hub's metadata block, written by
``huggingface_hub.ModelCardData`` (the form the Hub parses), and the chat-format and usage sections."""

from __future__ import annotations

import os

CARD = "README.md"  # a model folder's card: where the Hub reads it


def write_card(directory: str, card: str | None) -> None:
    """``card`` as the card of the local folder ``directory`` (nothing when None)."""
    if card is not None:
        with open(os.path.join(directory, CARD), "w") as f:
            f.write(card)


def front_matter(**meta) -> list[str]:
    """The card's first lines: its metadata (``ModelCardData``'s fields; None ones left out)."""
    from huggingface_hub import ModelCardData

    return ["---", ModelCardData(**meta).to_yaml(), "---", ""]


def chat_and_use(intro: str, prompt: str, code: list[str]) -> list[str]:
    """The "Chat format" section (``intro``, then ``prompt`` as the template writes it) and the
    "Use" section (``code``, Python that loads the model and answers)."""
    said = [intro, ""] if intro else []
    chat = ["## Chat format", "", *said, "```", prompt.rstrip("\n"), "```", ""]
    return [*chat, "## Use", "", "```python", *code, "```", ""]
