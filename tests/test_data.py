"""Fine-tuning on your own data (dlzo.data.user_data): the four formats, the sources, the split, the one-line errors,
and that the losses read exactly the intended tokens, on the fast path as on the plain one."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from dlzo.data.examples import Example, SpanExample
from dlzo.data.hub import parse_hub_source
from dlzo.data.readers import read_rows
from dlzo.data.user_data import UserTask, count_truncated, load_user_data, row_ranges
from dlzo.engine.fastpath import BranchedForward
from dlzo.engine.scoring import (
    batch_loss,
    candidate_scores,
    encode,
    per_example_losses,
    span_tokens,
    token_logprobs,
)
from dlzo.errors import DlzoError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
FORMAT_FILES = {"text": "text", "prompt_completion": "prompt-completion", "chat": "chat",
                "classification": "classification"}
# A minimal template in the usual shape: BOS written as text, a header per turn, an end-of-turn token.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(stories_tokenizer):
    tokenizer = copy.deepcopy(stories_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def example_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / f"{name}.jsonl").read_text().splitlines()]


def all_examples(name: str, tokenizer):
    """The rows of an example file in file order (train and dev put back together)."""
    data = load_user_data(str(EXAMPLES / f"{name}.jsonl"), tokenizer, eval_fraction=0.5)
    order = {n: i for i, n in enumerate([*_numbers(data.split_record["train_rows"]),
                                         *_numbers(data.split_record["dev_rows"])])}
    both = data.train + data.dev
    return [both[order[n]] for n in sorted(order)], data


def _numbers(ranges: str) -> list[int]:
    out = []
    for part in filter(None, ranges.split(",")):
        first, _, last = part.partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return out


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# ----------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name,fmt", list(FORMAT_FILES.items()))
def test_each_example_file_is_read_in_its_format(name, fmt, chat_tokenizer):
    data = load_user_data(str(EXAMPLES / f"{name}.jsonl"), chat_tokenizer)
    assert data.format == fmt and data.generation == (fmt != "classification")
    assert (len(data.train), len(data.dev)) == (2, 1)  # 10% of 3 rows, at least 1
    task = UserTask(data)
    assert (task.name, task.generation, task.metric) == (name, data.generation,
                                                          "loss" if data.generation else "accuracy")
    splits = task.splits(seed=5, num_train=1)  # the split was made at load time
    assert (splits.train, splits.dev, splits.test) == (data.train, data.dev, [])
    # the text a probe or an in-context demonstration reads: the row's prompt with its right answer
    whole = {"text": lambda r: r["text"], "prompt-completion": lambda r: r["prompt"] + r["completion"],
             "classification": lambda r: r["prompt"] + r["options"][row_label(r)]}
    if fmt in whole:
        assert sorted(task.prompt_text(e) for e in data.train + data.dev) == sorted(map(whole[fmt], example_rows(name)))


def test_rows_become_the_examples_the_scorer_expects(chat_tokenizer):
    [text, *_], _ = all_examples("text", chat_tokenizer)
    assert text.prompt == "" and text.spans == [(0, len(text.continuations[0]))]
    [pc, *_], _ = all_examples("prompt_completion", chat_tokenizer)
    assert (pc.prompt, pc.continuations, pc.label, pc.answers) == ("Translate to Zorbish: cat ->", [" cotek"], 0,
                                                                    ["cotek"])
    assert pc.spans == [(len(pc.prompt), len(pc.prompt) + len(" cotek"))]
    classification, _ = all_examples("classification", chat_tokenizer)
    assert [(e.continuations, e.label) for e in classification] == [
        ([" yes", " no"], 0), ([" yes", " no"], 1), ([" maanek", " moonek", " muunek"], 0)]
    assert not any(isinstance(e, SpanExample) for e in classification)


def test_chat_scores_every_assistant_turn_and_its_end_of_turn(chat_tokenizer):
    chats, _ = all_examples("chat", chat_tokenizer)
    two_turns = chats[1]  # system, user, assistant, user, assistant
    text = two_turns.prompt + two_turns.continuations[0]
    assert not text.startswith("<s>")  # the template's BOS text is dropped: the tokenizer adds its own
    assert [text[s:e] for s, e in two_turns.spans] == ["dagek</s>\n", "fushek</s>\n"]
    assert two_turns.prompt.endswith("<|assistant|>\n") and two_turns.answers == ["dagek"]
    batch = encode(chat_tokenizer, [two_turns], generation=True)
    scored = chat_tokenizer.decode(batch.token_target.tolist())
    assert "dagek" in scored and "fushek" in scored and "user" not in scored and "fish" not in scored
    assert batch.input_ids[0].tolist().count(chat_tokenizer.bos_token_id) == 1


def test_hub_sources_name_config_split_and_a_split_slice():
    assert parse_hub_source("hf:org/rows") == ("org/rows", None, None)  # read_rows takes the train split
    assert parse_hub_source("hf:org/rows::test") == ("org/rows", None, "test")
    assert parse_hub_source("hf:org/rows:en:train[:100]") == ("org/rows", "en", "train[:100]")
    assert parse_hub_source("rows.jsonl") is None and parse_hub_source("hfrows.jsonl") is None
    for bad in ("hf:", "hf", "hf:a:b:c:d"):
        with pytest.raises(DlzoError, match=f"^{bad}: expected hf:NAME"):
            read_rows(bad)


def test_an_empty_assistant_turn_is_not_scored(tmp_path, chat_tokenizer):
    """An empty assistant turn between others was scored (its end-of-turn alone: the model learned to reply
    with nothing); it is skipped, the next turn is the first scored one and the answer generation is scored on."""
    turns = [{"role": "user", "content": "cat"}, {"role": "assistant", "content": " "},
             {"role": "user", "content": "dog"}, {"role": "assistant", "content": "dagek"}]
    data = load_user_data(write(tmp_path, "c.jsonl", lines({"messages": turns}, {"messages": turns})),
                          chat_tokenizer, max_eval=1)
    example = data.train[0]
    text = example.prompt + example.continuations[0]
    assert [text[s:e] for s, e in example.spans] == ["dagek</s>\n"] and example.answers == ["dagek"]
    assert example.prompt.endswith("dog</s>\n<|assistant|>\n")


def test_offsets_and_prefix_tokenization_mark_the_same_tokens(chat_tokenizer):
    """Slow tokenizers (no offsets) find the spans by tokenizing up to each boundary: same tokens."""

    class Slow:
        is_fast = False

        def __call__(self, *args, **kwargs):
            return chat_tokenizer(*args, **kwargs)

    for name in FORMAT_FILES:
        for example in all_examples(name, chat_tokenizer)[0]:
            if isinstance(example, SpanExample):
                text = example.prompt + example.continuations[0]
                assert span_tokens(Slow(), text, example.spans) == span_tokens(chat_tokenizer, text, example.spans)


# ----------------------------------------------------------------------------------------------- sources


ROWS = [{"question": f"Translate to Zorbish: {w} ->", "reply": f" {z}", "id": i}
        for i, (w, z) in enumerate([("cat", "cotek"), ("dog", "dagek"), ("fish", "fushek"), ("moon", "maanek")])]


def test_jsonl_json_csv_parquet_and_hub_sources_give_the_same_examples(tmp_path, monkeypatch):
    import csv

    import datasets
    import huggingface_hub.constants
    import pyarrow as pa
    import pyarrow.parquet as pq

    sources = {"jsonl": write(tmp_path, "d.jsonl", lines(*ROWS)),
               "json": write(tmp_path, "d.json", json.dumps(ROWS, indent=2))}
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    sources["csv"] = str(tmp_path / "d.csv")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    sources["parquet"] = str(tmp_path / "d.parquet")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text(lines(*ROWS))
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path.parent / f"{tmp_path.name}-cache")
    sources["hub"] = f"hf:{tmp_path / 'hub'}"
    loaded = {kind: load_user_data(source, columns="prompt=question,completion=reply", eval_fraction=0.25, seed=1)
              for kind, source in sources.items()}
    reference = loaded["jsonl"]
    assert reference.format == "prompt-completion" and len(reference.dev) == 1
    assert SpanExample("Translate to Zorbish: cat ->", [" cotek"], 0, ["cotek"],
                       spans=[(28, 34)]) in reference.train + reference.dev
    for kind, data in loaded.items():
        assert (data.train, data.dev, data.format) == (reference.train, reference.dev, reference.format), kind
    assert any("ignored: id" in note for note in reference.notes)
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing  # nothing written beside the data


def test_json_rows_are_located_by_line(tmp_path):
    path = write(tmp_path, "d.json", '[\n  {"text": "a"},\n\n  {"text": 3}\n]')
    assert [r.where for r in read_rows(path)] == [f"{path}:2", f"{path}:4"]
    with pytest.raises(DlzoError, match=r"d\.json:4: field 'text' must be a string, not int"):
        load_user_data(path)


def test_held_out_split_is_seeded_disjoint_and_recorded():
    source = str(EXAMPLES / "zorbish.jsonl")
    data = load_user_data(source, eval_fraction=0.1, seed=3)
    record = data.split_record
    train_rows, dev_rows = _numbers(record["train_rows"]), _numbers(record["dev_rows"])
    assert (len(data.train), len(data.dev)) == (180, 20) == (record["num_train"], record["num_dev"])
    assert sorted(train_rows + dev_rows) == list(range(1, 201))
    rows = example_rows("zorbish")
    assert [e.prompt for e in data.dev] == [rows[n - 1]["prompt"] for n in dev_rows]
    assert load_user_data(source, eval_fraction=0.1, seed=3).split_record == record
    assert load_user_data(source, eval_fraction=0.1, seed=4).split_record["dev_rows"] != record["dev_rows"]
    assert len(load_user_data(source, eval_fraction=0.5, max_eval=7).dev) == 7
    assert record["eval_fraction"] == 0.1 and record["dev_source"] == source and record["seed"] == 3
    json.dumps(record)  # goes into run.json


def test_eval_source_is_the_dev_set(tmp_path):
    source = str(EXAMPLES / "zorbish.jsonl")
    data = load_user_data(source, eval_source=str(EXAMPLES / "prompt_completion.jsonl"))
    assert len(data.train) == 200 and [e.answers for e in data.dev] == [["cotek"], ["maanek"], ["ruvirek"]]
    assert data.split_record["train_rows"] == "1-200" and data.split_record["dev_rows"] == "1-3"
    capped = load_user_data(source, eval_source=source, max_eval=5)
    assert len(capped.dev) == 5 and any("seeded sample" in note for note in capped.notes)


def test_row_ranges():
    assert row_ranges([7, 1, 2, 3, 5, 8]) == "1-3,5,7-8" and row_ranges([4]) == "4" and row_ranges([]) == ""


# ------------------------------------------------------------------------------------------- long rows


def test_long_rows_keep_bos_and_completion_and_are_counted(stories_tokenizer):
    data = load_user_data(str(EXAMPLES / "zorbish.jsonl"), stories_tokenizer, max_length=20)
    example = next(e for e in data.train if len(stories_tokenizer(e.prompt + e.continuations[0])["input_ids"]) > 20)
    whole, cut = encode(stories_tokenizer, [example], max_length=512), encode(stories_tokenizer, [example], max_length=20)
    assert cut.input_ids.shape[1] == 20 and cut.input_ids[0, 0] == stories_tokenizer.bos_token_id
    assert cut.token_target.tolist() == whole.token_target.tolist()  # every completion token still scored
    for row, position, target in zip(cut.token_row, cut.token_position, cut.token_target):
        assert cut.input_ids[row, position + 1] == target
    assert data.split_record["rows_truncated"] == count_truncated(data.train + data.dev, stories_tokenizer, 20) > 0
    assert any("prompts from the left" in note for note in data.notes)
    # a text row has no prompt to cut: its end goes
    text = SpanExample("", ["one two three four five six seven eight nine ten"], 0, spans=[(0, 49)])
    ids = stories_tokenizer(text.continuations[0])["input_ids"]
    assert encode(stories_tokenizer, [text], max_length=8).input_ids[0].tolist() == ids[:8]


# ----------------------------------------------------------------------------------------- the losses


def hand_labels(name: str, row: dict, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per scored sequence, labels -100 where no loss is read, built without dlzo.data."""

    def tok(text):
        return tokenizer(text)["input_ids"]

    def masked(full: str, spans: list[tuple[int, int]]):
        ids, labels = tok(full), [-100] * len(tok(full))
        for start, end in spans:
            low = next(i for i, (a, b) in enumerate(zip(tok(full[:start]) + [None], ids)) if a != b)
            high = len(ids) if end == len(full) else next(
                i for i, (a, b) in enumerate(zip(tok(full[:end]) + [None], ids)) if a != b)
            labels[low:high] = ids[low:high]
        labels[0] = -100
        return ids, labels

    if name == "text":
        return [masked(row["text"], [(0, len(row["text"]))])]
    if name == "prompt_completion":
        prompt = tok(row["prompt"])
        ids = tok(row["prompt"] + row["completion"])
        assert ids[: len(prompt)] == prompt
        return [(ids, [-100] * len(prompt) + ids[len(prompt) :])]
    if name == "classification":
        return [hand_labels("prompt_completion", {"prompt": row["prompt"], "completion": option}, tokenizer)[0]
                for option in row["options"]]
    full, spans = "", []  # chat, rendered by hand the way CHAT_TEMPLATE does
    for message in row["messages"]:
        full += f"<|{message['role']}|>\n"
        if message["role"] == "assistant":
            spans.append((len(full), len(full) + len(message["content"]) + len("</s>\n")))
        full += message["content"] + "</s>\n"
    return [masked(full, spans)]


@pytest.mark.parametrize("name", list(FORMAT_FILES))
def test_loss_reads_exactly_the_intended_tokens(name, chat_tokenizer):
    """Against a brute-force loss: full logits, cross-entropy with -100 on every token not to be learned."""
    model = tiny_model("llama")
    examples, data = all_examples(name, chat_tokenizer)
    for row, example in zip(example_rows(name), examples):
        expected_losses = []
        for ids, labels in hand_labels(name, row, chat_tokenizer):
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            expected_losses.append(F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=-100))
        if name == "classification":
            expected = F.cross_entropy(-torch.stack(expected_losses)[None], torch.tensor([row_label(row)]))
        else:
            expected = expected_losses[0]
            ids, labels = hand_labels(name, row, chat_tokenizer)[0]
        batch = encode(chat_tokenizer, [example], generation=data.generation)
        if name != "classification":  # the very tokens, in order, each read at the position before it
            assert batch.token_target.tolist() == [t for t in labels if t != -100]
            assert batch.token_position.tolist() == [i - 1 for i, t in enumerate(labels) if t != -100]
            assert batch.input_ids[0].tolist() == ids
        got = per_example_losses(batch, token_logprobs(model, batch))[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def row_label(row: dict) -> int:
    return row["label"] if "label" in row else row["options"].index(row["answer"])


@pytest.mark.parametrize("name", list(FORMAT_FILES))
@pytest.mark.parametrize("padding", ["left", "right", "packed"])
def test_fast_path_equals_plain_path_for_user_data(name, padding, chat_tokenizer):
    """(L+, L-) of BranchedForward (answer-only logits, both branches in one forward, the tokenizer's padding
    side or the packed layout) equal the plain path's (in-place perturbation, full logits, left padding)."""
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.padding_side = "left" if padding == "packed" else padding
    model = tiny_model("llama", layers=4)
    examples, data = all_examples(name, tokenizer)
    tuned = [(n, p) for n, p in model.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2."))]
    torch.manual_seed(0)
    zs = [torch.randn_like(p) for _, p in tuned]
    eps = 1e-2
    plus = {n: p.detach() + eps * z for (n, p), z in zip(tuned, zs)}
    minus = {n: p.detach() - eps * z for (n, p), z in zip(tuned, zs)}
    fast_batch = encode(tokenizer, examples, generation=data.generation,
                        layout="packed" if padding == "packed" else "padded")
    if padding != "packed":
        assert (fast_batch.attention_mask == 0).any()  # rows of different lengths: padding is exercised
        pad_column = 0 if padding == "left" else -1
        assert (fast_batch.attention_mask[:, pad_column] == 0).any()
    fast = BranchedForward(model, [n for n, _ in tuned]).loss_pair(fast_batch, plus, minus)
    plain_batch = encode(tokenizer, examples, pack_single_token=False, generation=data.generation,
                         padding_side="left")
    plain = []
    for sign in (1, -1):
        for (_, p), z in zip(tuned, zs):
            p.data.add_(z, alpha=sign * eps)
        plain.append(batch_loss(model, plain_batch, full_logits=True))
        for (_, p), z in zip(tuned, zs):
            p.data.add_(z, alpha=-sign * eps)
    assert abs(float(fast[0] - fast[1])) > 1e-6  # the perturbation matters
    for f, p in zip(fast, plain):
        assert float(f) == pytest.approx(float(p), abs=1e-5)


def test_right_padding_gives_the_scores_of_left_padding(stories_tokenizer):
    model = tiny_model("llama")
    examples = [Example("Once upon a time there was", [" a", " the"], 1), Example("Hi", [" cat", " dog"], 0),
                Example("The little girl went to the park and saw", [" a big dog", " the sun"], 0)]
    left = encode(stories_tokenizer, examples, padding_side="left")
    right = encode(stories_tokenizer, examples, padding_side="right")
    assert (right.attention_mask[:, -1] == 0).any() and not torch.equal(left.input_ids, right.input_ids)
    torch.testing.assert_close(candidate_scores(right, token_logprobs(model, right)),
                               candidate_scores(left, token_logprobs(model, left)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- examples


def test_example_file_regenerates_exactly(tmp_path):
    out = tmp_path / "zorbish.jsonl"
    subprocess.run([sys.executable, str(EXAMPLES / "make_example.py"), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == (EXAMPLES / "zorbish.jsonl").read_bytes()
    assert len(example_rows("zorbish")) == 200
    assert all(path.stat().st_size < 50_000 for path in EXAMPLES.iterdir())


# ----------------------------------------------------------------------------------------------- bad input


CLASSIFY = {"prompt": "p", "options": [" a", " b"], "label": 0}
BAD_FILES = {
    # id: (file name, content, load_user_data keywords, fragments the one-line message must hold)
    "empty file": ("e.jsonl", "\n  \n", {}, ["e.jsonl", "empty file"]),
    "invalid json": ("j.jsonl", lines({"text": "a"}, '{"text": "b",}'), {}, ["j.jsonl:2", "not valid JSON"]),
    "not an object": ("o.jsonl", lines({"text": "a"}, '["text"]'), {}, ["o.jsonl:2", "expected a JSON object"]),
    "no format": ("n.jsonl", lines({"question": "q", "response": "r"}), {},
                  ["n.jsonl:1", "'question', 'response'", "match no format", "text {text}",
                   "prompt-completion {prompt, completion}", "chat {messages}", "classification"]),
    "mixed formats": ("m.jsonl", lines({"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": " c"}), {},
                      ["m.jsonl:3", "prompt-completion row", "m.jsonl:1 is a text row", "one format"]),
    "label outside options": ("l.jsonl", lines(CLASSIFY, {**CLASSIFY, "label": 2}), {},
                              ["l.jsonl:2", "label 2 is outside the 2 options"]),
    "label not an index": ("l.jsonl", lines({**CLASSIFY, "label": "a"}), {}, ["l.jsonl:1", "'label'", "integer"]),
    "answer not an option": ("a.jsonl", lines({"prompt": "p", "options": [" a", " b"], "answer": " c"}), {},
                             ["a.jsonl:1", "answer ' c' is not one of the options"]),
    "no label or answer": ("a.jsonl", lines({"prompt": "p", "options": [" a", " b"]}), {},
                           ["a.jsonl:1", "needs 'label'", "or 'answer'"]),
    "one option": ("a.jsonl", lines({**CLASSIFY, "options": [" a"]}), {}, ["a.jsonl:1", "at least 2 options"]),
    "non-string completion": ("s.jsonl", lines({"prompt": "p", "completion": " c"}, {"prompt": "p", "completion": 42}),
                              {}, ["s.jsonl:2", "field 'completion' must be a string, not int"]),
    "non-string option": ("s.jsonl", lines({**CLASSIFY, "options": [" a", 2]}), {},
                          ["s.jsonl:1", "option 1 must be a string, not int"]),
    "non-string chat content": ("s.jsonl", lines({"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": [{"type": "text", "text": "a"}]}]}), {},
        ["s.jsonl:1", "content of message 2 must be a string, not list"]),
    "null text": ("s.jsonl", lines({"text": None}), {}, ["s.jsonl:1", "field 'text' must be a string, not null"]),
    "empty completion": ("c.jsonl", lines({"prompt": "p", "completion": " c"}, {"prompt": "p", "completion": " "}),
                         {}, ["c.jsonl:2", "empty completion", "nothing to learn"]),
    "empty text": ("t.jsonl", lines({"text": ""}), {}, ["t.jsonl:1", "empty text", "nothing to learn"]),
    "chat without assistant": ("c.jsonl", lines({"messages": [{"role": "user", "content": "hi"}]}), {},
                               ["c.jsonl:1", "no assistant turn", "nothing to learn"]),
    "message without content": ("c.jsonl", lines({"messages": [{"role": "user"}]}), {},
                                ["c.jsonl:1", "message 1 needs 'role' and 'content'"]),
    "unknown columns field": ("u.jsonl", lines({"question": "q", "answer": " a"}),
                              {"columns": "prompt=question,reply=answer"}, ["--columns", "unknown field 'reply'"]),
    "columns malformed": ("u.jsonl", lines({"question": "q"}), {"columns": "prompt"}, ["--columns", "FIELD=COLUMN"]),
    "columns name absent": ("u.jsonl", lines({"question": "q", "answer": " a"}, {"q": "q", "answer": " a"}),
                            {"columns": "prompt=question,completion=answer"},
                            ["u.jsonl:2", "no column 'question'", "prompt=question"]),
    "csv without header": ("h.csv", "Translate cat,cotek\nTranslate dog,dagek\n", {},
                           ["h.csv:1", "no header row"]),
    "csv ragged row": ("r.csv", "prompt,completion\np,c\np,c,x\n", {}, ["r.csv:3", "3 fields", "2 columns"]),
    "csv options not json": ("o.csv", "prompt,options,label\np,a|b,0\n", {},
                             ["o.csv:2", "column 'options' must hold a JSON list"]),
    "json not a list": ("d.json", json.dumps({"text": "a"}), {}, ["d.json", "expected a JSON list"]),
    "json invalid": ("d.json", '[\n {"text": "a"},\n {"text": }\n]', {}, ["d.json:3", "not valid JSON"]),
    "unknown suffix": ("d.txt", "hello\n", {}, ["d.txt", "unknown file type '.txt'"]),
    "forced format missing field": ("f.jsonl", lines({"prompt": "p", "completion": " c"}, {"prompt": "p"}),
                                    {"data_format": "prompt-completion"},
                                    ["f.jsonl:2", "missing field 'completion'", "prompt-completion format"]),
    "unknown data format": ("f.jsonl", lines({"text": "a"}), {"data_format": "sft"}, ["--data-format 'sft'"]),
    "one row": ("f.jsonl", lines({"text": "a"}), {}, ["f.jsonl", "only 1 row", "--eval-data"]),
    "eval fraction": ("f.jsonl", lines({"text": "a"}, {"text": "b"}), {"eval_fraction": 1.5}, ["--eval-fraction"]),
    # json keeps the last of a key given twice: the row would train on a prompt its author did not see first
    "duplicate key": ("k.jsonl", lines({"text": "a"}, '{"prompt": "c", "completion": " d", "prompt": "x"}'), {},
                      ["k.jsonl:2", "key 'prompt' appears twice"]),
    "duplicate key in json": ("k.json", '[\n {"text": "a"},\n {"text": "b", "text": "c"}\n]', {},
                              ["k.json:3", "key 'text' appears twice"]),
    "duplicate key in a csv cell": ("k.csv", 'messages\n"[{""role"": ""user"", ""role"": ""x"", ""content"": ""q""}]"\n',
                                    {}, ["k.csv:2", "key 'role' appears twice"]),
    # '²' and '--1' passed str.isdigit and int() raised a traceback
    "csv label not an integer": ("l.csv", 'prompt,options,label\np,"["" a"","" b""]",²\n', {},
                                 ["l.csv:2", "'label' must be an integer index", "'²'"]),
    "csv label two minus signs": ("l.csv", 'prompt,options,label\np,"["" a"","" b""]",--1\n', {},
                                  ["l.csv:2", "'label' must be an integer index", "'--1'"]),
}


def test_a_table_may_leave_label_or_answer_out_and_cells_may_be_long(tmp_path):
    """An empty CSV cell is an absent field (the answer column of a row that gives its label), a label column
    with gaps read from parquet is float (1.0: the index 1), and a cell longer than csv's default 131,072
    characters is an ordinary text row."""
    rows = 'prompt,options,answer,label\np,"["" a"","" b""]",,1\nq,"["" a"","" b""]", a,\n'
    data = load_user_data(write(tmp_path, "c.csv", rows), data_format="classification", max_eval=1)
    assert sorted(e.label for e in data.train + data.dev) == [0, 1]
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"prompt": ["p", "q"], "options": [[" a", " b"]] * 2, "label": [1, None],
                              "answer": [None, " a"]})
    frame.to_parquet(tmp_path / "gaps.parquet")
    assert frame["label"].dtype == float
    data = load_user_data(str(tmp_path / "gaps.parquet"), data_format="classification", max_eval=1)
    assert sorted(e.label for e in data.train + data.dev) == [0, 1]
    long = "word " * 40_000
    data = load_user_data(write(tmp_path, "long.csv", f'text\n"{long}"\nshort\n'), max_eval=1)
    assert sorted(len(e.prompt + e.continuations[0]) for e in data.train + data.dev)[-1] >= len(long) - 1


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_is_one_line_naming_the_place(case, tmp_path, chat_tokenizer):
    name, content, keywords, fragments = BAD_FILES[case]
    with pytest.raises(DlzoError) as caught:
        load_user_data(write(tmp_path, name, content), chat_tokenizer, **keywords)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_file_and_eval_file_of_another_format(tmp_path):
    with pytest.raises(DlzoError, match=r"^data file not found: .*nope\.jsonl$"):
        load_user_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DlzoError, match=r"^data file not found: .*nope\.jsonl$"):
        load_user_data(str(EXAMPLES / "text.jsonl"), eval_source=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DlzoError, match=r"classification\.jsonl: its rows are classification, but those of "
                                        r".*text\.jsonl are text"):
        load_user_data(str(EXAMPLES / "text.jsonl"), eval_source=str(EXAMPLES / "classification.jsonl"))


def test_chat_needs_a_tokenizer_with_a_chat_template(stories_tokenizer):
    assert not stories_tokenizer.chat_template
    with pytest.raises(DlzoError) as caught:
        load_user_data(str(EXAMPLES / "chat.jsonl"), stories_tokenizer)
    message = str(caught.value)
    assert "\n" not in message and "chat.jsonl" in message and "no chat template" in message
    assert "prompt-completion" in message


def test_chat_template_errors_are_one_line(tmp_path, chat_tokenizer):
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system role\nhere') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DlzoError) as caught:
        load_user_data(str(EXAMPLES / "chat.jsonl"), tokenizer)
    assert "\n" not in str(caught.value) and "chat.jsonl:2" in str(caught.value)


def test_hub_split_that_does_not_exist_and_offline_hub(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text(lines({"text": "a"}, {"text": "b"}))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(DlzoError) as caught:
        load_user_data(f"hf:{tmp_path / 'hub'}::validation")
    assert "\n" not in str(caught.value) and "split 'validation' does not exist" in str(caught.value)
    assert f"hf:{tmp_path / 'hub'}::validation" in str(caught.value)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DlzoError) as caught:
        load_user_data("hf:someone/data")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("hf:someone/data: ") and "offline" in message
    with pytest.raises(DlzoError, match="expected hf:NAME"):
        load_user_data("hf:a:b:c:d")
