"""`dlzo chat`: an interactive conversation with a tuned run (or a base model) through its chat template.

Each turn the whole conversation so far is rendered with the tokenizer's chat template and the model writes the
assistant's next turn, so a run tuned on chat rows is talked to exactly as it was trained. Lines starting with
`/` are commands: /reset forgets the conversation, /exit (or end of input, Ctrl-D) leaves.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from dlzo.cli.options import EvalConfig, GenerateConfig
from dlzo.evaluation.generation import continue_text, conversation_prompt
from dlzo.fields import known_checkpoint, option, same_as
from dlzo.model.loading import load_model, load_tokenizer, resolve_model_source
from dlzo.training.config import ModelOptions
from dlzo.training.run_model import load_checkpoint_of_run

PROMPT = "you> "


@dataclass
class ChatConfig(ModelOptions):
    run: str = option("", "chat with the tuned tensors of this training run")
    model: str = option("", "the base model without --run (with --run: another base, default the run's own)")
    checkpoint: str = same_as(EvalConfig, "checkpoint")
    system: str = option("", "a system message that opens the conversation (when the template has a system role)")
    max_new_tokens: int = option(256, "tokens of each reply at most")
    sample: bool = same_as(GenerateConfig, "sample")
    temperature: float = same_as(GenerateConfig, "temperature")
    top_p: float = same_as(GenerateConfig, "top_p")
    seed: int = same_as(GenerateConfig, "seed")

    def validate(self) -> None:
        GenerateConfig.validate(self)  # the same flags, the same checks (chat has no --prompt to check)
        known_checkpoint(self.checkpoint)


def _model_and_tokenizer(config: ChatConfig):
    if config.run:
        prepared = load_checkpoint_of_run(config.run, config.checkpoint, config.model or None, config.device,
                                          config.dtype)
        return prepared.model, prepared.tokenizer
    resolve_model_source(config.model)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    conversation_prompt(tokenizer, [{"role": "user", "content": "hi"}])  # no template: say so before loading
    return load_model(config.model, dtype=config.dtype, device=config.device,
                      trust_remote_code=config.trust_remote_code), tokenizer


def chat_command(config: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[dict]:
    """Talk until /exit or end of input; returns the conversation (for tests and scripts)."""
    config.validate()
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer = _model_and_tokenizer(config)
    opening = [{"role": "system", "content": config.system}] if config.system else []
    conversation = list(opening)
    conversation_prompt(tokenizer, conversation + [{"role": "user", "content": "hi"}])  # the template takes these
    print("dlzo chat: /reset forgets the conversation, /exit or Ctrl-D leaves", file=stdout, flush=True)
    for turn, line in enumerate(_lines(stdin, stdout)):
        message = line.strip()
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            conversation = list(opening)
            print("(conversation forgotten)", file=stdout, flush=True)
            continue
        if not message:
            continue
        conversation.append({"role": "user", "content": message})
        reply = continue_text(model, tokenizer, conversation_prompt(tokenizer, conversation),
                              max_new_tokens=config.max_new_tokens, sample=config.sample,
                              temperature=config.temperature, top_p=config.top_p, seed=config.seed + turn)
        conversation.append({"role": "assistant", "content": reply.strip()})
        print(reply.strip(), file=stdout, flush=True)
    return conversation


def _lines(stdin: TextIO, stdout: TextIO):
    """The user's lines, each after the prompt; input() where it is a terminal, so line editing works."""
    while True:
        if stdin is sys.stdin and sys.stdin.isatty():
            try:
                yield input(PROMPT)
            except EOFError:
                print(file=stdout)
                return
            continue
        print(PROMPT, end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return
        yield line
