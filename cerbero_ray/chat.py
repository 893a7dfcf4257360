"""The cerbero chat format: its tags, its system line, the stop string, and the one Jinja template
that renders it. Plain Python (no transformers), so configs and request validation can use it.

    <s>Questa è una conversazione tra un umano ed un assistente AI.
    [|Umano|] Ciao!
    [|AI|] Ciao, come posso aiutarti?
    </s>

The assistant's text (the space after the tag, the content and its newline, and the end-of-text
token after the last answer) sits inside ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` yields the loss mask.
"""

from __future__ import annotations

SYSTEM_LINE = "Questa è una conversazione tra un umano ed un assistente AI."
USER_TAG = "[|Umano|]"
STOP_STRING = USER_TAG
ASSISTANT_TAGS = {"AI": "[|AI|]", "Assistente": "[|Assistente|]"}


ROLE_TAGS = (USER_TAG, *ASSISTANT_TAGS.values())
SEED_QUESTION = "Come posso distinguere un AI da un umano?"  # the seed's own example prompt


def seed_prompt(assistant_tag: str = "AI") -> str:
    """The seed's example prompt, as its README runs the GGUF file: the system line, one question,
    the assistant's tag."""
    return f"{SYSTEM_LINE}\n{USER_TAG} {SEED_QUESTION}\n{ASSISTANT_TAGS[assistant_tag]}"


def assistant_tag_of(template: str | None) -> str:
    """Which assistant tag (``AI`` or ``Assistente``) a chat template renders; ``AI`` when unknown."""
    return next((k for k, tag in ASSISTANT_TAGS.items() if k != "AI" and template and tag in template), "AI")


def _invisible(ch: str) -> bool:
    """Whitespace, or a character that shows nothing (format and control characters: U+200B,
    U+2060, U+FEFF, bidi marks…)."""
    import unicodedata

    return ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp")


def forges_turn(text: str) -> bool:
    """Whether a line of ``text`` starts, after whitespace and invisible characters, with a role tag:
    in the cerbero format that opens a turn, so inside a message it would forge one (and in training
    data, put the loss mask on the wrong tokens)."""
    for line in text.splitlines():
        i = 0
        while i < len(line) and _invisible(line[i]):
            i += 1
        if line.startswith(ROLE_TAGS, i):
            return True
    return False


def chat_template(assistant_tag: str = "AI", system_line: str = SYSTEM_LINE) -> str:
    """The Jinja chat template of the cerbero format, with ``[|AI|]`` or ``[|Assistente|]`` turns."""
    if assistant_tag not in ASSISTANT_TAGS:
        raise ValueError(f"tokenizer.assistant_tag must be one of {sorted(ASSISTANT_TAGS)}, got {assistant_tag!r}")
    tag = ASSISTANT_TAGS[assistant_tag]
    system = system_line.replace("\\", "\\\\").replace("'", "\\'")
    return (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
        f"{{%- else %}}{{%- set system = '{system}' %}}{{%- set turns = messages %}}{{%- endif %}}"
        "{{- bos_token + system + '\\n' }}"
        "{%- for message in turns %}"
        f"{{%- if message['role'] == 'user' %}}{{{{- '{USER_TAG} ' + message['content'] + '\\n' }}}}"
        f"{{%- elif message['role'] == 'assistant' %}}{{{{- '{tag}' }}}}"
        "{%- generation %}{{- ' ' + message['content'] + '\\n' }}"
        "{%- if loop.last and not add_generation_prompt %}{{- eos_token }}{%- endif %}{%- endgeneration %}"
        "{%- else %}{{- raise_exception('unknown role: ' + message['role']) }}{%- endif %}"
        "{%- endfor %}"
        f"{{%- if add_generation_prompt %}}{{{{- '{tag}' }}}}{{%- endif %}}"
    )


def plain_template(template: str) -> str:
    """``template`` without the ``{% generation %}`` markers (transformers' extension for the loss
    mask), for engines with a plain Jinja renderer (llama.cpp, llama-cpp-python); it renders the same."""
    return template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
