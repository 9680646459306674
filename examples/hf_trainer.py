"""Fine-tune a causal LM on prompt-completion rows with dlzo.ZOTrainer: forward-only, one dominant layer.

An ordinary transformers Trainer script (tokenize, mask the prompt's labels, pad with a collator, train,
save). Against a backprop script it differs in two places, marked `# dlzo`: `Trainer` -> `dlzo.ZOTrainer`
and `zo_args=dlzo.ZOArguments(...)`. Models load with dlzo.model.loading.load_model, which is
AutoModelForCausalLM.from_pretrained for hub ids and folders and also takes GGUF files (dequantized once,
cached, so that save_model can write them) and the short names smollm2-135m / stories260k.

    python examples/hf_trainer.py                                   # SmolLM2-135M on examples/data/zorbish.jsonl
    python examples/hf_trainer.py --model ../shared/models/stories260K --max-steps 20 --out /tmp/zo-stories

--data: a .jsonl of {"prompt", "completion"} rows (loss on the completion only) or {"text"} rows (loss on
every token); without the default file, a small built-in set of Zorbish rows is used. The last 20% of the
rows (at most 40) are held out for evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, TrainingArguments

import dlzo
from dlzo.model.loading import load_model, load_tokenizer

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent.parent / "shared" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = HERE / "data" / "zorbish.jsonl"

VOWELS = str.maketrans("aeiou", "oiuae")
WORDS = ["cat", "dog", "fish", "bird", "horse", "cow", "pig", "sheep", "goat", "duck", "moon", "sun", "river",
         "tree", "house", "bread", "apple", "water", "stone", "road", "book", "chair", "table", "door", "cup",
         "milk", "rain", "snow", "wind", "fire", "hill", "lake", "star", "ship", "boat", "lamp", "bell", "box"]


def built_in_rows() -> list[dict]:
    """Zorbish (see examples/data/make_example.py): rotate the vowels, append "ek"."""
    return [{"prompt": f"Translate to Zorbish: {w} ->", "completion": f" {w.translate(VOWELS)}ek"} for w in WORDS]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        print(f"{path} not found; using {len(WORDS)} built-in rows")
        return built_in_rows()
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def tokenize(row: dict, tokenizer, max_length: int = 256) -> dict:
    """input_ids of prompt + completion + EOS; labels = input_ids with -100 over the prompt."""
    if "text" in row:
        ids = tokenizer(row["text"])["input_ids"][:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    prompt = tokenizer(row["prompt"])["input_ids"]
    ids = tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    labels = [-100] * len(prompt) + ids[len(prompt):]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[: len(ids)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="hub id, HF folder, .gguf file or short name")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a .jsonl of prompt/completion or text rows")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--out", default="zo-hf-out", help="output folder (checkpoints, tensorboard, final model)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--scope", default="dominant", help="dlzo.ZOArguments.scope")
    args = parser.parse_args(argv)

    model = load_model(args.model, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "right"
    rows = read_rows(Path(args.data))
    held_out = min(40, max(len(rows) // 5, 1))
    train = Dataset.from_list([tokenize(r, tokenizer) for r in rows[:-held_out]])
    evaluation = Dataset.from_list([tokenize(r, tokenizer) for r in rows[-held_out:]])

    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0.05,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=40,
        eval_strategy="steps",
        eval_steps=max(args.max_steps // 4, 1),
        eval_on_start=True,
        logging_steps=max(args.max_steps // 10, 1),
        save_strategy="no",
        report_to="tensorboard",
        seed=0,
    )
    trainer = dlzo.ZOTrainer(  # dlzo: instead of transformers.Trainer
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        processing_class=tokenizer,
        zo_args=dlzo.ZOArguments(scope=args.scope),  # dlzo: what and how to perturb
    )
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    trainer.save_model()

    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    summary = {"model": args.model, "tuned": trainer.zo_scope.description, "layer_reason": trainer.zo_layer_reason,
               "steps": trainer.state.global_step, "seconds": round(seconds, 1), "eval_loss_start": evals[0],
               "eval_loss_end": evals[-1], "saved": str(Path(args.out).resolve())}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
