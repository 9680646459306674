"""Generation from a base or tuned model: greedy or sampled, with a chat prompt rendered through the tokenizer's
chat template exactly as `dlzo.data.chat.render_chat` renders training rows (the template's written BOS is
dropped where the tokenizer adds its own).
"""

from __future__ import annotations

import torch

from dlzo.errors import DlzoError


def chat_prompt(tokenizer, message: str) -> str:
    """`message` as the user's turn, followed by the template's opening of the assistant's turn."""
    return conversation_prompt(tokenizer, [{"role": "user", "content": message}])


def conversation_prompt(tokenizer, messages: list[dict]) -> str:
    """A whole conversation (system, user and assistant turns) through the tokenizer's chat template, ending with
    the opening of the assistant's next turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise DlzoError("--chat: the model's tokenizer has no chat template; pass the prompt as plain text")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tokenizer("", add_special_tokens=True, verbose=False)["input_ids"]
        if ids[:1] == [tokenizer.bos_token_id]:
            text = text[len(bos) :]
    return text


def generate_text(model, tokenizer, prompt: str, *, chat: bool = False, max_new_tokens: int = 64,
                  sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> str:
    """The continuation of `prompt` (special tokens removed): greedy, or sampled with a fixed seed."""
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    return continue_text(model, tokenizer, text, max_new_tokens=max_new_tokens, sample=sample,
                         temperature=temperature, top_p=top_p, seed=seed)


@torch.no_grad()
def continue_text(model, tokenizer, text: str, *, max_new_tokens: int = 64, sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> str:
    """What the model writes after `text`, as it is (no template applied here)."""
    device = next(model.parameters()).device
    inputs = tokenizer(text, return_tensors="pt").to(device)
    if inputs["input_ids"].shape[1] == 0:
        raise DlzoError("--prompt is empty and the tokenizer adds no start token: give the model something to continue")
    decoding = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    if sample:
        torch.manual_seed(seed)
    model.eval()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True,
                            pad_token_id=tokenizer.pad_token_id, **decoding)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
