"""Chat rows: rendered with the tokenizer's chat template, the loss on every assistant turn (the scored character
spans of a `SpanExample`).
"""

from __future__ import annotations

from dlzo.data.examples import SpanExample
from dlzo.data.readers import Row, _json_cell, _kind
from dlzo.errors import DlzoError, first_line


def _chat(row: Row, tokenizer, source: str) -> SpanExample:
    messages = _json_cell(row, "messages", "list of messages")
    if not isinstance(messages, list) or not messages:
        raise DlzoError(f"{row.where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DlzoError(f"{row.where}: message {index} needs 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise DlzoError(f"{row.where}: the {key} of message {index} must be a string, not "
                                f"{_kind(message[key])}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DlzoError(f"{row.where}: no assistant turn: nothing to learn from this conversation")
    scored = [i for i in turns if messages[i]["content"].strip()]  # render_chat leaves empty turns unscored
    if not scored:
        raise DlzoError(f"{row.where}: every assistant turn is empty: nothing to learn from this conversation")
    if tokenizer is None:
        raise DlzoError(f"{source}: chat rows are rendered with the model's chat template: load them with its tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise DlzoError(f"{source}: the model's tokenizer has no chat template, so chat rows cannot be rendered; "
                        f"write the rows as prompt-completion instead ({{\"prompt\": ..., \"completion\": ...}})")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full, spans = render_chat(tokenizer, messages, row.where)
    first = spans[0][0]
    return SpanExample(full[:first], [full[first:]], 0, answers=[messages[scored[0]]["content"]], spans=spans)


def render_chat(tokenizer, messages: list[dict], where: str = "chat") -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template, and the character span of each assistant turn (its
    content and the template's end-of-turn text, which the model must learn to emit too)."""

    def render(part: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja's TemplateError, the template's raise_exception(): one line
            raise DlzoError(f"{where}: the chat template refused this conversation: {first_line(err)}") from None

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = render(messages[:index], True)
        except DlzoError:
            before = None  # a template that refuses a conversation not starting with a user turn
        upto = render(messages[: index + 1], False)
        if before is not None and full.startswith(upto) and upto.startswith(before) and len(before) >= cursor \
                and len(upto) > len(before):
            span = (len(before), len(upto))
        else:  # the template renders earlier turns differently (drops reasoning, say): find the content
            start = full.find(message["content"], cursor)
            if start < 0:
                raise DlzoError(f"{where}: cannot find assistant turn {index + 1} in the chat template's output")
            span = (start, start + len(message["content"]))
        if span[1] > span[0] and message["content"].strip():  # an empty turn would teach empty replies
            spans.append(span)
        cursor = span[1]
    # The template writes the BOS token as text; the tokenizer adds its own, so drop the written one.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and full.startswith(bos):
        ids = tokenizer("", add_special_tokens=True, verbose=False)["input_ids"]
        if ids[:1] == [tokenizer.bos_token_id]:
            full = full[len(bos) :]
            spans = [(max(s - len(bos), 0), e - len(bos)) for s, e in spans]
    return full, spans

