"""dlzo.ZOTrainer: a transformers.Trainer doing ZO steps; on stories260K (real tokenizer) and tiny models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model
from dlzo.engine.fastpath import BranchedForward
from dlzo.engine.layer_choice import layer_parameters

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "Once upon a time there was a little dog named Tim.",
    "The sun was hot and the sky was blue.",
    "Lily liked to play in the park with her red ball every day.",
    "Tom had a big car.",
    "One day, a bird sat on the tree and sang a happy song to the kids.",
    "Mom made a cake.",
    "The cat saw a fish in the water and wanted to eat it.",
    "Ben and Sue went to the store to buy some milk and bread for lunch.",
    "It was a cold day.",
    "The little girl found a shiny stone near the river.",
    "He ran fast.",
    "They all laughed and played until the sun went down behind the hill.",
    "The dog barked at the moon.",
    "She gave her friend a big hug.",
    "The boat was small but strong, and it took them across the lake.",
    "At night the stars came out.",
]


# ------------------------------------------------------------------------------------ helpers


def stories_tokenizer_for_training(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def make_trainer(path, out, zo=None, texts=TEXTS, model=None, eval_texts=None, **overrides):
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, TrainingArguments

    import dlzo

    tokenizer = stories_tokenizer_for_training(path)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(path)
    settings = dict(output_dir=str(out), max_steps=4, learning_rate=1e-3, per_device_train_batch_size=4,
                    report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=3)
    settings.update(overrides)
    evaluation = [tokenizer(t) for t in eval_texts] if eval_texts else None
    return dlzo.ZOTrainer(model=model, args=TrainingArguments(**settings), train_dataset=[tokenizer(t) for t in texts],
                          eval_dataset=evaluation,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                          zo_args=zo if zo is not None else dlzo.ZOArguments(layer=2))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def causal_batch(vocab: int, rows: int = 3, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, labels -100 over each row's first tokens and its padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (rows, length), generator=generator)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    labels = input_ids.clone()
    for row in range(rows):
        real = length - 3 * row
        attention_mask[row, real:] = 0
        input_ids[row, real:] = 0
        labels[row, real:] = -100
        labels[row, : 2 + row] = -100  # a "prompt" without loss
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ------------------------------------------------------------------------------------ the fast path's model loss


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "opt", "gemma2", "phi3", "gpt_neox", "falcon"])
@pytest.mark.parametrize("layers", [[1], [0, 2]])
def test_pair_model_loss_equals_the_models_own_loss(arch, layers):
    """Both halves of the one doubled forward give model(**batch).loss at θ+εz and θ-εz (float32, 1e-5)."""
    model = tiny_model(arch, layers=4)
    batch = causal_batch(model.config.vocab_size)
    named = [item for layer in layers for item in layer_parameters(model, layer)]
    torch.manual_seed(0)
    zs = [torch.randn_like(p) for _, p in named]
    eps = 1e-2
    plus = {n: p.detach() + eps * z for (n, p), z in zip(named, zs)}
    minus = {n: p.detach() - eps * z for (n, p), z in zip(named, zs)}
    fast = BranchedForward(model, [n for n, _ in named]).pair_model_loss(batch, plus, minus)
    plain = []
    with torch.no_grad():
        for sign in (1, -1):
            for (_, p), z in zip(named, zs):
                p.data.add_(z, alpha=sign * eps)
            plain.append(float(model(**batch, use_cache=False).loss))
            for (_, p), z in zip(named, zs):
                p.data.add_(z, alpha=-sign * eps)
    assert abs(float(fast[0] - fast[1])) > 1e-6  # the perturbation matters
    for f, p in zip(fast, plain):
        assert float(f) == pytest.approx(p, abs=1e-5)


# ------------------------------------------------------------------------------------ arguments


def test_zo_arguments_parse_beside_training_arguments():
    from transformers import HfArgumentParser, TrainingArguments

    import dlzo

    training, zo = HfArgumentParser((TrainingArguments, dlzo.ZOArguments)).parse_args_into_dataclasses(
        ["--output_dir", "x", "--learning_rate", "1e-4", "--scope", "layer:3", "--eps", "1e-2", "--q", "2"])
    assert (training.learning_rate, zo.scope, zo.eps, zo.q, zo.layer) == (1e-4, "layer:3", 1e-2, 2, None)
    with pytest.raises(Exception, match="scope"):
        dlzo.ZOArguments(scope="everything")
    with pytest.raises(ValueError, match="layer"):
        dlzo.ZOArguments(scope="layer:1", layer=2)
    with pytest.raises(ValueError, match="distribution"):
        dlzo.ZOArguments(distribution="uniform")


def test_args_without_meaning_for_zo_warn_once_each(stories_path, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(stories_path, tmp_path, max_steps=1)
    assert not [w for w in caught if "ZOTrainer ignores" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(stories_path, tmp_path, max_steps=1, optim="sgd", adam_beta1=0.5, max_grad_norm=0.3)
    ours = sorted(re.search(r"TrainingArguments\.(\w+)", str(w.message)).group(1)
                  for w in caught if "ZOTrainer ignores" in str(w.message))
    assert ours == ["adam_beta1", "max_grad_norm", "optim"]


def test_an_optimizer_passed_in_is_refused(tmp_path):
    from transformers import TrainingArguments

    import dlzo

    model = tiny_model("llama")
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="optimizer"):
        dlzo.ZOTrainer(model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
                       zo_args=dlzo.ZOArguments(layer=0))


# ------------------------------------------------------------------------------------ training


def test_train_end_to_end_forward_only_and_save_model_loads(stories_path, tmp_path):
    """No gradients, no optimizer state, eval loss and tensorboard logs, and save_model writes a folder that
    transformers loads in which only the tuned layer's tensors differ from the base model."""
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(stories_path, tmp_path / "run", eval_strategy="steps", eval_steps=2,
                           report_to=["tensorboard"], max_steps=4, eval_texts=TEXTS[:8])
    base = weights(trainer.model)
    trainer.train()

    assert trainer.state.global_step == 4
    assert all(p.grad is None for p in trainer.model.parameters())
    optimizer = trainer.optimizer
    assert not optimizer.state and not any(optimizer.state.values())
    model_ids = {id(p) for p in trainer.model.parameters()}
    assert not any(id(p) in model_ids for group in optimizer.param_groups for p in group["params"])
    history = trainer.state.log_history
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]
    assert all("grad_norm" not in e for e in history) and any("zo_projected_grad" in e for e in history)
    assert list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))

    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    changed = {n for n, p in loaded.named_parameters() if not torch.equal(p, base[n])}
    assert changed == set(trainer.zo_scope.names)
    assert all(n.startswith("model.layers.2.") for n in changed)
    info = json.loads((tmp_path / "final" / "dlzo_zo.json").read_text())
    assert info["names"] == trainer.zo_scope.names and info["step_count"] == 4


def test_epochs_and_load_best_model_at_end(stories_path, tmp_path):
    from safetensors.torch import load_file

    trainer = make_trainer(stories_path, tmp_path, max_steps=-1, num_train_epochs=1, eval_strategy="steps",
                           eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                           metric_for_best_model="eval_loss", learning_rate=3e-3, eval_texts=TEXTS[:4])
    trainer.train()
    assert trainer.state.global_step == len(TEXTS) // 4
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    best = min(evals, key=evals.get)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    saved = load_file(str(Path(trainer.state.best_model_checkpoint) / "model.safetensors"))
    current = trainer.model.state_dict()
    assert all(torch.equal(current[n], saved[n]) for n in trainer.zo_scope.names)


def test_scheduler_lr_drives_each_step_and_the_log_replays(stories_path, tmp_path):
    """The lr of step t is the scheduler's (linear warmup then decay), and the logged (seeds, grads, lr)
    rebuild the trained weights bit for bit from the base model with ZOOptimizer.replay_step."""
    from transformers import get_scheduler

    from dlzo.engine.zo import ZOOptimizer

    trainer = make_trainer(stories_path, tmp_path, max_steps=6, lr_scheduler_type="linear", warmup_steps=2,
                           weight_decay=0.1)
    base = weights(trainer.model)
    trainer.train()
    dummy = torch.optim.SGD([torch.zeros(1)], lr=1e-3)
    schedule = get_scheduler("linear", dummy, num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(schedule.get_last_lr()[0])
        dummy.step()
        schedule.step()
    assert [h["lr"] for h in trainer.zo_history] == pytest.approx(expected)
    assert trainer.zo_history[0]["lr"] == 0.0

    replay_model = make_trainer(stories_path, tmp_path / "replay", max_steps=1).model
    replay_model.load_state_dict({n: base[n] for n in base}, strict=False)
    params = dict(replay_model.named_parameters())
    replay = ZOOptimizer([(n, params[n]) for n in trainer.zo_scope.names], eps=trainer.zo_args.eps,
                         weight_decay=0.1, seed=trainer.args.seed)
    for h in trainer.zo_history:
        replay.replay_step(h["seeds"], h["projected_grads"], h["lr"], h["skipped"])
    trained = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], trained[n]) for n in trainer.zo_scope.names)


def test_total_flos_counts_forwards_only(stories_path, tmp_path):
    """total_flos: 2 FLOPs per non-embedding parameter and token for each of the 2q forwards of a ZO step,
    not Trainer's 6 (forward and backward). Four steps of batch 4 on one text repeated (no padding)."""
    import dlzo

    trainer = make_trainer(stories_path, tmp_path / "run", zo=dlzo.ZOArguments(layer=2, q=3), max_steps=4,
                           texts=[TEXTS[0]] * 8)
    parameters = trainer.model.num_parameters(exclude_embeddings=True)
    tokens = len(trainer.train_dataset[0]["input_ids"])
    assert trainer.floating_point_ops({"input_ids": torch.ones(2, 10, dtype=torch.long)}) == 2 * 20 * parameters * 6
    trainer.train()
    assert trainer.state.total_flos == 4 * 4 * tokens * 2 * parameters * 6


def test_gradient_accumulation_uses_one_direction_per_optimizer_step(stories_path, tmp_path):
    """2 micro-batches of 2 rows x accumulation 2 == 1 batch of 4 rows: the same z for both micro-batches and
    their losses averaged by label tokens, i.e. the loss of the whole batch."""
    whole = make_trainer(stories_path, tmp_path / "a", max_steps=3, per_device_train_batch_size=4)
    base = weights(whole.model)
    whole.train()
    accumulated = make_trainer(stories_path, tmp_path / "b", max_steps=3, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2)
    accumulated.train()
    assert accumulated.state.global_step == 3
    for a, b in zip(whole.zo_history, accumulated.zo_history):
        assert a["seeds"] == b["seeds"]
        assert a["loss_plus"][0] == pytest.approx(b["loss_plus"][0], abs=1e-5)
        assert a["projected_grads"][0] == pytest.approx(b["projected_grads"][0], rel=1e-2, abs=1e-2)
    w, b = dict(whole.model.named_parameters()), dict(accumulated.model.named_parameters())
    assert all(torch.allclose(w[n], b[n], atol=1e-6) for n in whole.zo_scope.names)
    assert max(float((w[n].detach() - base[n]).abs().max()) for n in whole.zo_scope.names) > 1e-4  # not vacuous


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(stories_path, tmp_path):
    settings = dict(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2, save_strategy="steps",
                    save_steps=3, lr_scheduler_type="cosine", warmup_steps=1)
    straight = make_trainer(stories_path, tmp_path / "straight", **settings)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "dlzo_zo.json").exists()
    resumed = make_trainer(stories_path, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    assert resumed._zo.step_count == straight._zo.step_count == 6
    assert resumed.zo_history == straight.zo_history[3:]
    s, r = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(s[n], r[n]) for n in s)



@pytest.mark.parametrize("zo", [dict(estimator="one-sided", q=2), dict(zo_update="hizoo")],
                         ids=["one-sided", "hizoo"])
def test_one_sided_and_hizoo_steps_replay_and_accumulate(stories_path, tmp_path, zo):
    """ZOArguments' estimator and zo_update reach the optimizer: the logged g is (L(θ+εz) - L(θ))/ε with L(θ)
    shared by the directions (one-sided) or (L+ - L-)/2ε with HiZOO's curvature; the log (curvatures included)
    rebuilds the tuned weights bit for bit from the base model; and 2 micro-batches of 2 rows give the whole
    batch's g (their losses, L(θ) included, averaged before g is formed)."""
    from transformers import AutoModelForCausalLM

    import dlzo
    from dlzo.engine.zo import ZOOptimizer

    args = dlzo.ZOArguments(layer=2, **zo)
    whole = make_trainer(stories_path, tmp_path / "a", zo=args, max_steps=3, per_device_train_batch_size=4)
    base = weights(whole.model)
    whole.train()
    assert whole._zo.estimator == args.estimator and whole._zo.update_rule == args.zo_update
    for h in whole.zo_history:
        if args.estimator == "one-sided":
            assert len(h["loss_minus"]) == 2 and len(set(h["loss_minus"])) == 1  # L(θ), once a step
            assert h["projected_grads"] == [(p - m) / args.eps for p, m in zip(h["loss_plus"], h["loss_minus"])]
        else:
            assert h["projected_grads"] == [(p - m) / (2 * args.eps) for p, m in zip(h["loss_plus"], h["loss_minus"])]
            assert len(h["curvatures"]) == 1 and h["curvatures"][0] >= 0

    fresh = AutoModelForCausalLM.from_pretrained(stories_path)
    params = dict(fresh.named_parameters())
    assert all(torch.equal(params[n], base[n]) for n in whole.zo_scope.names)
    replay = ZOOptimizer([(n, params[n]) for n in whole.zo_scope.names], eps=args.eps, seed=whole.args.seed,
                         update_rule=args.zo_update, estimator=args.estimator)
    for h in whole.zo_history:
        replay.replay_step(h["seeds"], h["projected_grads"], h["lr"], h["skipped"], curvatures=h.get("curvatures"))
    trained = dict(whole.model.named_parameters())
    assert all(torch.equal(params[n], trained[n]) for n in whole.zo_scope.names)
    assert max(float((trained[n].detach() - base[n]).abs().max()) for n in whole.zo_scope.names) > 1e-4

    accumulated = make_trainer(stories_path, tmp_path / "b", zo=args, max_steps=3, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2)
    accumulated.train()
    assert len(accumulated.zo_history) == 3
    for a, b in zip(whole.zo_history, accumulated.zo_history):
        assert a["seeds"] == b["seeds"] and ("curvatures" in a) == ("curvatures" in b)
        assert a["loss_minus"] == pytest.approx(b["loss_minus"], abs=1e-5)
        assert a["projected_grads"] == pytest.approx(b["projected_grads"], rel=1e-2, abs=1e-2)


def test_a_stateful_update_rule_resumes_bit_for_bit(stories_path, tmp_path):
    """zo_update=adam: optimizer.pt carries Adam's moments and bias-correction count, so a run resumed from
    step 3 of 6 ends on the uninterrupted run's tensors bit for bit (moments started afresh would not)."""
    import dlzo

    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, zo=dlzo.ZOArguments(layer=2, zo_update="adam"))
    straight = make_trainer(stories_path, tmp_path / "straight", **settings)
    straight.train()
    resumed = make_trainer(stories_path, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    assert resumed._zo.updates == straight._zo.updates == 6
    assert resumed.zo_history == straight.zo_history[3:]
    s, r = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(s[n], r[n]) for n in straight.zo_scope.names)

def test_lowrank_directions_and_the_mask_reach_the_optimizer_and_resume_bit_for_bit(stories_path, tmp_path):
    """ZOArguments' lowrank_rank, lowrank_lazy and zo_mask are `dlzo train`'s: the matrices move only where the
    mask (their smallest-magnitude half at step 0) lets them, the log replays the run from the base weights with
    the same options, and a resume from step 3 of 6 (V changes at step 4: lazy 2) ends on the same tensors."""
    from transformers import AutoModelForCausalLM

    import dlzo
    from dlzo.engine.directions import small_magnitudes
    from dlzo.engine.zo import ZOOptimizer

    args = dlzo.ZOArguments(layer=2, distribution="lowrank", lowrank_rank=2, lowrank_lazy=2, zo_mask=0.5)
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, zo=args)
    straight = make_trainer(stories_path, tmp_path / "straight", **settings)
    base = weights(straight.model)
    straight.train()
    assert (straight._zo.rank, straight._zo.lazy_steps, straight._zo.mask_fraction) == (2, 2, 0.5)
    trained = dict(straight.model.named_parameters())
    for name in straight.zo_scope.names:
        moved = trained[name].detach() != base[name]
        if base[name].dim() == 2:
            assert moved.any() and not (moved & ~small_magnitudes(base[name], 0.5)).any(), name
    fresh = dict(AutoModelForCausalLM.from_pretrained(stories_path).named_parameters())
    replay = ZOOptimizer([(n, fresh[n]) for n in straight.zo_scope.names], eps=args.eps, seed=straight.args.seed,
                         distribution="lowrank", rank=2, lazy_steps=2, mask_fraction=0.5)
    for h in straight.zo_history:
        replay.replay_step(h["seeds"], h["projected_grads"], h["lr"], h["skipped"])
    assert all(torch.equal(fresh[n], trained[n]) for n in straight.zo_scope.names)
    resumed = make_trainer(stories_path, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    assert resumed.zo_history == straight.zo_history[3:]
    r = dict(resumed.model.named_parameters())
    assert all(torch.equal(trained[n], r[n]) for n in straight.zo_scope.names)
    with pytest.raises(ValueError, match="zo_mask must be in"):
        dlzo.ZOArguments(zo_mask=1.0)


def test_non_finite_steps_are_skipped(stories_path, tmp_path):
    trainer = make_trainer(stories_path, tmp_path, max_steps=2)
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = float("nan")  # outside the tuned layer: every loss is NaN
    base = weights(trainer.model)
    trainer.train()
    assert [h["skipped"] for h in trainer.zo_history] == [True, True]
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if n in trainer.zo_scope.names)
    assert trainer.state.log_history[-2]["zo_skipped_steps"] == 2


@pytest.mark.slow
def test_skipped_steps_are_counted_across_a_resume(stories_path, tmp_path):
    """zo_skipped_steps counts the whole run: a run resumed from its step-2 checkpoint (2 steps skipped before)
    logs 4 after skipping 2 more, not 2 (the count restarted with each train() call)."""
    def nan_trainer(out):
        trainer = make_trainer(stories_path, out, max_steps=4, save_strategy="steps", save_steps=2)
        with torch.no_grad():
            trainer.model.model.norm.weight[0] = float("nan")
        return trainer

    nan_trainer(tmp_path / "first").train()
    resumed = nan_trainer(tmp_path / "second")
    resumed.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))
    assert [h["skipped"] for h in resumed.zo_history] == [True, True]
    assert resumed.state.log_history[-2]["zo_skipped_steps"] == 4


def test_bf16_autocast_steps(stories_path, tmp_path):
    trainer = make_trainer(stories_path, tmp_path, max_steps=2, bf16=True)
    base = weights(trainer.model)
    trainer.train()
    assert not any(h["skipped"] for h in trainer.zo_history)
    assert any(not torch.equal(p, base[n]) for n, p in trainer.model.named_parameters())


def test_fp16_grad_scaler_steps_the_zo_update(stories_path, tmp_path):
    """On CUDA, fp16 steps the optimizer through a GradScaler, which checks gradients and a scale that no
    backward set up; a CPU GradScaler stands in for it here."""
    trainer = make_trainer(stories_path, tmp_path, max_steps=3, fp16=True)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    base = weights(trainer.model)
    trainer.train()
    assert trainer.optimizer.scaler is trainer.accelerator.scaler
    assert [h["skipped"] for h in trainer.zo_history] == [False] * 3
    assert [h["lr"] for h in trainer.zo_history] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    assert any(not torch.equal(p, base[n]) for n, p in trainer.model.named_parameters())


def test_fast_and_plain_paths_train_alike(stories_path, tmp_path):
    import dlzo

    fast = make_trainer(stories_path, tmp_path / "f", max_steps=3)
    plain = make_trainer(stories_path, tmp_path / "p", max_steps=3, zo=dlzo.ZOArguments(layer=2, fast_path=False))
    assert fast._branched is not None and plain._branched is None
    fast.train()
    plain.train()
    for a, b in zip(fast.zo_history, plain.zo_history):
        assert a["loss_plus"][0] == pytest.approx(b["loss_plus"][0], abs=1e-5)
        assert a["loss_minus"][0] == pytest.approx(b["loss_minus"][0], abs=1e-5)
    f, p = dict(fast.model.named_parameters()), dict(plain.model.named_parameters())
    assert all(torch.allclose(f[n], p[n], atol=1e-5) for n in f)


def test_label_smoothing_is_the_loss_of_both_branches(stories_path, tmp_path):
    """With label_smoothing_factor, Trainer.compute_loss pops the labels from the inputs it is given: the
    second forward (θ-εz) had none and the first step raised. Both branches are now the smoothed loss: each
    within the perturbation's reach of the untrained model's smoothed loss on the same batch, their mean
    within second order of it."""
    from transformers.trainer_pt_utils import LabelSmoother

    trainer = make_trainer(stories_path, tmp_path, max_steps=1, per_device_train_batch_size=len(TEXTS),
                           label_smoothing_factor=0.1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(TEXTS))])
    with torch.no_grad():
        start = LabelSmoother(epsilon=0.1)(trainer.model(input_ids=batch["input_ids"],
                                                         attention_mask=batch["attention_mask"]),
                                           batch["labels"], shift_labels=True).item()
    trainer.train()
    plus, minus = trainer.zo_history[0]["loss_plus"][0], trainer.zo_history[0]["loss_minus"][0]
    assert plus != minus and abs(plus - start) < 1e-2 and abs(minus - start) < 1e-2
    # the mean moves by the second-order term, eps²·z'Hz/2 (1.6e-4 here); the unsmoothed loss is 1.88, not 3.81
    assert (plus + minus) / 2 == pytest.approx(start, abs=1e-3)


# ------------------------------------------------------------------------------------ scopes


def test_dominant_scope_falls_back_to_the_most_sensitive_layer(stories_path, tmp_path):
    """stories260K has no massive activations: with the sun rule the trainer measures each layer's sensitivity
    instead."""
    import dlzo

    trainer = make_trainer(stories_path, tmp_path, zo=dlzo.ZOArguments(rule="sun"))
    layer, means = trainer.layer_sensitivity()
    assert trainer.zo_scope.layers == [layer] and means[layer] == max(means)
    assert "fell back to the most perturbation-sensitive layer" in trainer.zo_layer_reason


def test_dominant_scope_uses_the_guarded_rule_by_default(stories_path, tmp_path):
    """ZOArguments() takes `dlzo train`'s default rule: on stories260K (no massive activations) the last layer,
    with the guarded rule's record kept for the checkpoints."""
    import dlzo

    trainer = make_trainer(stories_path, tmp_path, zo=dlzo.ZOArguments())
    assert trainer.zo_scope.layers == [4] and trainer.zo_layer_choice["rule"] == "guarded"
    assert trainer.zo_layer_choice["paper_rule_layer"] is None and "tuning the last layer 4" in trainer.zo_layer_reason


def test_dominant_scope_takes_the_probes_layer_or_the_given_one(stories_path, tmp_path, monkeypatch):
    import dlzo
    import dlzo.engine.layer_choice

    stats = [SimpleNamespace(max_abs=1000.0, ratio=5000.0)] * 5
    rules = []

    def planted(model, tokenizer, texts, rule):
        rules.append(rule)
        return SimpleNamespace(dominant_layer=3, reason="a planted jump", layers=stats)

    monkeypatch.setattr(dlzo.engine.layer_choice, "find_dominant_layer", planted)
    assert make_trainer(stories_path, tmp_path, zo=dlzo.ZOArguments(rule="sun")).zo_scope.layers == [3]
    onset = make_trainer(stories_path, tmp_path, zo=dlzo.ZOArguments(rule="onset"))
    assert rules == ["sun", "onset"] and onset.zo_scope.layers == [3]
    with pytest.raises(ValueError, match="rule must be one of guarded, sun, onset, screen"):
        dlzo.ZOArguments(rule="largest")
    given = make_trainer(stories_path, tmp_path, zo=dlzo.ZOArguments(layer=1))
    assert given.zo_scope.layers == [1] and all(".layers.1." in n for n in given.zo_scope.names)


def test_layers_params_full_and_lora_scopes(stories_path, tmp_path):
    import dlzo

    two = make_trainer(stories_path, tmp_path / "two", zo=dlzo.ZOArguments(scope="layers:0,3", params="mlp"))
    assert two.zo_scope.layers == [0, 3] and all(".mlp." in n for n in two.zo_scope.names)

    full = make_trainer(stories_path, tmp_path / "full", max_steps=2, zo=dlzo.ZOArguments(scope="full"))
    assert full._branched is None
    base = weights(full.model)
    full.train()
    assert not any(h["skipped"] for h in full.zo_history)
    assert not torch.equal(full.model.model.embed_tokens.weight, base["model.embed_tokens.weight"])

    lora = make_trainer(stories_path, tmp_path / "lora", max_steps=2, zo=dlzo.ZOArguments(scope="lora"))
    assert all("lora_" in n for n in lora.zo_scope.names) and lora._branched is not None
    base = weights(lora.model)
    lora.train()
    changed = {n for n, p in lora.model.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)
    lora.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()



def test_dominant_lora_scope_puts_adapters_on_the_dominant_layer_only(stories_path, tmp_path, monkeypatch):
    """dominant-lora: the layer is probed on the base model, the adapters go on that layer alone, and only they
    train; with no massive activations and no layer given it says what to pass."""
    import dlzo
    import dlzo.engine.layer_choice

    given = make_trainer(stories_path, tmp_path / "given", max_steps=2,
                         zo=dlzo.ZOArguments(scope="dominant-lora", layer=2))
    lora_names = [n for n, _ in given.model.named_parameters() if "lora_" in n]
    assert lora_names and all(".layers.2." in n for n in lora_names) and given.zo_scope.names == lora_names
    assert given._branched is not None and given.zo_layer_reason == "layer given by ZOArguments.layer"
    base = weights(given.model)
    given.train()
    changed = {n for n, p in given.model.named_parameters() if not torch.equal(p, base[n])}
    assert changed and changed <= set(lora_names)

    with pytest.raises(ValueError, match="dominant-lora: probe found no massive activations.*layer=K"):
        make_trainer(stories_path, tmp_path / "none", zo=dlzo.ZOArguments(scope="dominant-lora", rule="sun"))
    stats = [SimpleNamespace(max_abs=1000.0, ratio=5000.0)] * 5
    monkeypatch.setattr(dlzo.engine.layer_choice, "find_dominant_layer",
                        lambda *args, **kwargs: SimpleNamespace(dominant_layer=1, layers=stats))
    probed = make_trainer(stories_path, tmp_path / "probed", zo=dlzo.ZOArguments(scope="dominant-lora", rule="sun"))
    assert all(".layers.1." in n for n in probed.zo_scope.names) and "probe" in probed.zo_layer_reason


# ------------------------------------------------------------------------------------ the example and the docs


@pytest.mark.slow
def test_example_script_trains_reports_eval_loss_and_saves(stories_path, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "example"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--model", stories_path,
                          "--max-steps", "4", "--batch-size", "8", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["eval_loss_start"] > 0 and summary["eval_loss_end"] > 0
    # the Trainer's own log line of an evaluation (recent transformers print its numbers as strings)
    assert re.search(r"'eval_loss': '?\d+\.\d+", run.stdout + run.stderr), "the Trainer logged no evaluation"
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.config.num_hidden_layers == 5


def five_line_script() -> str:
    text = (ROOT / "docs" / "hf-trainer.md").read_text()
    return re.search(r"<!-- five-line script -->\s*```python\n(.*?)```", text, re.S).group(1)


def test_five_line_script_of_the_docs_runs(stories_path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    script = five_line_script()
    readme = re.search(r"<!-- five-line script[^>]*-->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert readme and readme.group(1) == script  # the README shows the script this test runs
    assert re.search(r'^name = "[^"]+"', script, re.M)
    script = re.sub(r'^name = "[^"]+"', f"name = {stories_path!r}", script, count=1, flags=re.M)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script, "docs/hf-trainer.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step > 0
    saved = Path(namespace["trainer"].args.output_dir)
    assert (tmp_path / saved / "model.safetensors").exists() or (saved / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(str(tmp_path / saved) if not saved.is_absolute() else str(saved))
    assert os.path.exists(tmp_path / saved / "dlzo_zo.json")
