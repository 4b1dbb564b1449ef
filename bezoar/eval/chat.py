"""Chat messages as the prompt text a bezoar model was trained on (the OpenBezoar template).

``chat_prompt(messages)`` is the one place where the server's chat endpoint and MT-Bench's
answer generation turn a conversation into text, so what a model is served with is what it was
trained on::

    ### System:
    {system}

    ### Instruction:
    {instruction}

    ### Response:

A single user message is the instruction as is. A longer conversation becomes the instruction as
``Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...`` lines (the convention the HH-RLHF stages train
on), and the model answers the last user message. System messages (and "developer" ones)
replace the template's default system line.
"""

from __future__ import annotations

from bezoar.data.formats import PromptTemplate, hh_instruction

#: Text at which a chat answer ends even if the model does not emit EOS: the start of a new
#: template section means the model has begun to write the next turn itself.
CHAT_STOP = ("### Instruction:", "### System:", "### Response:")

SYSTEM_ROLES = ("system", "developer")
ROLES = SYSTEM_ROLES + ("user", "assistant")


class ChatError(ValueError):
    """A conversation that cannot be rendered; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def message_text(content, where: str) -> str:
    """A message's content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatError(f"{where}.content[{i}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                                "supported", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatError(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def chat_prompt(messages: list[dict], template: PromptTemplate | None = None) -> str:
    """The prompt text for a conversation that ends with a user message."""
    template = template or PromptTemplate()
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list", "messages")
    system_parts: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ChatError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}.role {role!r} is not supported; use one of {', '.join(ROLES)}", f"{where}.role")
        text = message_text(message.get("content"), where)
        if role in SYSTEM_ROLES:
            system_parts.append(text.strip())
        else:
            turns.append(("human" if role == "user" else "assistant", text.strip()))
    if not turns or turns[-1][0] != "human":
        raise ChatError("the last message (other than system messages) must come from the user", "messages")
    system = "\n\n".join(p for p in system_parts if p) or None
    return template.render(hh_instruction(turns), system=system)
