"""`dlzo generate`: what the tuned model (or the base) now says to a prompt, greedy or sampled.

A run trained on chat rows (or any run with --chat) gets the prompt as a user turn of the tokenizer's chat
template, rendered with the generation prompt, exactly as `dlzo.data.render_chat` renders training rows: the
template's written BOS is dropped where the tokenizer adds its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dlzo.errors import DlzoError
from dlzo.models import load_model, load_tokenizer, resolve_model_source
from dlzo.options import GenerateConfig
from dlzo.run import load_checkpoint_of_run


def chat_prompt(tokenizer, message: str) -> str:
    """`message` as the user's turn, followed by the template's opening of the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise DlzoError("--chat: the model's tokenizer has no chat template; pass the prompt as plain text")
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tokenizer("", add_special_tokens=True, verbose=False)["input_ids"]
        if ids[:1] == [tokenizer.bos_token_id]:
            text = text[len(bos) :]
    return text


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, *, chat: bool = False, max_new_tokens: int = 64,
                  sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> str:
    """The continuation of `prompt` (special tokens removed): greedy, or sampled with a fixed seed."""
    text = chat_prompt(tokenizer, prompt) if chat else prompt
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


def run_data_format(run: str | Path) -> str | None:
    """The format of the rows a run was trained on (None for a task run)."""
    path = Path(run) / "run.json"
    if not path.exists():
        raise DlzoError(f"--run {run}: no run.json there (not a dlzo run folder)")
    return (json.loads(path.read_text()).get("data") or {}).get("format")


def generate_command(config: GenerateConfig) -> str:
    """`dlzo generate`: print the continuation of --prompt by the run's tuned model or the base --model."""
    config.validate()
    if config.run:
        chat = config.chat or run_data_format(config.run) == "chat"
        prepared = load_checkpoint_of_run(config.run, config.checkpoint, config.model or None,
                                          config.device, config.dtype)
        model, tokenizer = prepared.model, prepared.tokenizer
    else:
        resolve_model_source(config.model)
        chat = config.chat
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        if chat:
            chat_prompt(tokenizer, config.prompt)  # no chat template: say so before loading the model
        model = load_model(config.model, dtype=config.dtype, device=config.device,
                           trust_remote_code=config.trust_remote_code)
    text = generate_text(model, tokenizer, config.prompt, chat=chat, max_new_tokens=config.max_new_tokens,
                         sample=config.sample, temperature=config.temperature, top_p=config.top_p, seed=config.seed)
    print(text)
    return text
