"""`dlzo chat`: the conversation goes through the chat template turn by turn; /reset, /exit and end of input."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from dlzo.cli.chat import ChatConfig, chat_command
from dlzo.cli.main import main
from dlzo.evaluation.generation import continue_text, conversation_prompt

# a ChatML-like template: every turn framed by markers the test can find in the rendered text
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, stories_path) -> Path:
    """A tiny random Llama with stories260K's tokenizer and a chat template, saved as a Hugging Face folder."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-model")
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    tiny_model("llama", layers=2).save_pretrained(folder)
    return folder


def test_each_reply_continues_the_whole_conversation_rendered_by_the_template(chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stdin = io.StringIO("Hello there\n\nHow are you?\n/exit\nnever read\n")
    stdout = io.StringIO()
    config = ChatConfig(model=str(chat_model), max_new_tokens=5, system="Be brief.")
    conversation = chat_command(config, stdin, stdout)
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user", "assistant"]
    assert [conversation[1]["content"], conversation[3]["content"]] == ["Hello there", "How are you?"]
    # brute force: the second reply is what the model greedily writes after the rendered first three turns + user
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32)
    rendered = conversation_prompt(tokenizer, conversation[:4])
    assert rendered.count("<|user|>") == 2 and "<|system|>Be brief.<|end|>" in rendered
    assert rendered.endswith("<|user|>How are you?<|end|><|assistant|>")
    expected = continue_text(model, tokenizer, rendered, max_new_tokens=5).strip()
    assert conversation[4]["content"] == expected
    assert "never read" not in stdout.getvalue()


def test_reset_forgets_and_end_of_input_leaves(chat_model):
    stdin = io.StringIO("one\n/reset\ntwo\n")
    conversation = chat_command(ChatConfig(model=str(chat_model), max_new_tokens=2), stdin, io.StringIO())
    assert [m["content"] for m in conversation if m["role"] == "user"] == ["two"]


def test_a_model_without_a_chat_template_is_one_line(stories_path, capsys):
    assert main(["chat", "--model", stories_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chat template" in err[0]


@pytest.mark.slow
def test_chat_in_a_pseudo_terminal(chat_model):
    """The real command in a terminal: prompt, reply, Ctrl-D leaves with exit 0."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "dlzo", "chat", "--model", str(chat_model),
                                "--max-new-tokens", "3"], stdin=follower, stdout=follower, stderr=follower,
                               close_fds=True)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float = 120.0, times: int = 1) -> None:
        nonlocal seen
        deadline = time.time() + timeout
        while seen.count(marker) < times and time.time() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        assert seen.count(marker) >= times, seen.decode(errors="replace")

    read_until(b"you> ")
    os.write(leader, b"Hello\n")
    read_until(b"you> Hello", 10)  # the terminal echoes the line
    read_until(b"you> ", times=2)  # the reply, then the next prompt
    reply = seen.split(b"you> Hello", 1)[1].split(b"you> ")[0].strip()
    assert reply, seen.decode(errors="replace")
    os.write(leader, b"\x04")  # Ctrl-D
    assert process.wait(timeout=60) == 0
    os.close(leader)
