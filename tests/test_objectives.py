"""Training on a metric or a reward that has no gradient (--objective, --reward, ZOArguments(reward=...)):
the step's values against brute force, both branches' completions against each branch alone, common random
numbers, the reward function's errors, bit-exact replay and resume, and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, assert_replay_and_resume_exact, small_run, tiny_model
from dlzo.cli.main import main
from dlzo.data.examples import Example
from dlzo.engine.scoring import candidate_scores, encode, token_logprobs
from dlzo.errors import DlzoError
from dlzo.evaluation.branched_generation import BranchedLeaves, SharedNoise, complete, tuned_in
from dlzo.evaluation.objectives import GenerationRunner, RunObjective, accuracy_loss, prompt_text
from dlzo.evaluation.rewards import Reward, RewardError, load_reward
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train
from dlzo.training.prepare import make_zo_optimizer, prepare_model
from dlzo.training.run_data import load_data
from dlzo.training.step import batch_indices

PROMPTS = ["Once upon a time", "The dog", "Lily saw a", "Tom was", "The sun", "A little girl", "One day", "Ben had a",
           "The cat", "Sue went to", "Mom said", "The bird"]
# A reward with something to move: the more " the" and the fewer words, the better.
REWARD = ("def reward(prompts, completions, rows):\n"
          "    return [float(c.count(' the')) - 0.1 * len(c.split()) for c in completions]\n")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(stories_path):
    from dlzo.model.loading import load_tokenizer

    return load_tokenizer(stories_path)


@pytest.fixture()
def files(tmp_path) -> dict[str, str]:
    """Prompt rows (with an extra field), prompt-completion rows and a reward file."""
    prompts, pairs = tmp_path / "prompts.jsonl", tmp_path / "pairs.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS * 2)))
    pairs.write_text("".join(json.dumps({"prompt": p, "completion": " there was a dog"}) + "\n" for p in PROMPTS * 2))
    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / "questions.jsonl").write_text(json.dumps({"question": "a"}) + "\n" + json.dumps({"question": "b"}) + "\n")
    return {"prompts": str(prompts), "pairs": str(pairs), "reward": f"{tmp_path / 'reward.py'}:reward",
            "questions": str(tmp_path / "questions.jsonl")}


def generating_run(**changes) -> dict:
    return {**dict(model=str(STORIES), batch_size=4, lr=1e-2, eps=1e-2, quiet=True, steps=6, eval_every=3,
                   scope="layer:2", max_new_tokens=6, eval_batch_size=8), **changes}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ the pieces


@pytest.mark.requires_shared
def test_accuracy_loss_is_minus_the_fraction_ranked_right(tokenizer):
    model = tiny_model("llama")
    examples = [Example(f"Review {i}:", [" good", " bad", " fine"], i % 3) for i in range(7)]
    batch = encode(tokenizer, examples)
    logprobs = token_logprobs(model, batch)
    scores = candidate_scores(batch, logprobs)
    right = sum(int(scores[i].argmax()) == e.label for i, e in enumerate(examples))
    assert float(accuracy_loss(batch, logprobs)) == -right / len(examples)


@pytest.mark.requires_shared
def test_both_branches_in_one_batch_write_what_each_branch_writes_alone(tokenizer):
    model = tiny_model("llama")
    params = dict(model.named_parameters())
    names = [n for n in params if ".layers.2." in n]
    generator = torch.Generator().manual_seed(0)
    plus = {n: params[n].detach() + 0.3 * torch.randn(params[n].shape, generator=generator) for n in names}
    minus = {n: params[n].detach() - 0.3 * torch.randn(params[n].shape, generator=generator) for n in names}
    settings = dict(max_new_tokens=10, max_length=128)
    with BranchedLeaves(model, names).applied(plus, minus):
        both = complete(model, tokenizer, PROMPTS[:3], copies=2, **settings)
    alone = []
    for tensors in (plus, minus):
        with tuned_in(model, tensors):
            alone += complete(model, tokenizer, PROMPTS[:3], **settings)
    assert both == alone
    assert both[:3] != both[3:] and complete(model, tokenizer, PROMPTS[:3], **settings) != both[:3]
    # sampled: both branches at the same weights draw the same completions (common random numbers), and a batch
    # of one branch draws what the first half of two does
    with BranchedLeaves(model, names).applied(plus, plus):
        sampled = complete(model, tokenizer, PROMPTS[:3], copies=2, noise=SharedNoise(7, 1.0, 2), **settings)
    with tuned_in(model, plus):
        single = complete(model, tokenizer, PROMPTS[:3], noise=SharedNoise(7, 1.0), **settings)
        greedy = complete(model, tokenizer, PROMPTS[:3], **settings)
    assert sampled[:3] == sampled[3:] == single and single != greedy


def test_shared_noise_samples_the_softmax():
    """Gumbel-max: argmax(logits/T + G) over many positions draws each token with probability softmax(logits/T)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    counts = torch.zeros(4)
    for position in range(4000):
        counts[int(SharedNoise(3, 2.0)(torch.zeros(1, position, dtype=torch.long), logits).argmax())] += 1
    assert torch.allclose(counts / 4000, torch.softmax(logits[0] / 2.0, -1), atol=0.025)


@pytest.mark.requires_shared
def test_a_chat_models_prompts_go_through_its_template(tokenizer):
    example = Example("Name a colour.", [""], 0)
    assert prompt_text(tokenizer, example, chat=False) == "Name a colour."
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        runner = GenerationRunner(tiny_model("llama"), tokenizer, [], False, RunObjective("reward", Reward(len)), 4, 64)
        assert runner.chat and prompt_text(tokenizer, example, runner.chat) == "<|user|>Name a colour.\n<|assistant|>"
        assert not GenerationRunner(tiny_model("llama"), tokenizer, [], False, RunObjective("f1"), 4, 64).chat
    finally:
        tokenizer.chat_template = None


def test_a_reward_that_answers_wrongly_is_one_line_naming_it_and_the_row():
    def bad_row(prompts, completions, rows):
        if any(r["id"] == 2 for r in rows):
            raise KeyError("no answer")
        return [1.0] * len(prompts)

    rows, where = [{"id": i} for i in range(4)], [f"p.jsonl:{i + 1}" for i in range(4)]
    cases = [(bad_row, "raised KeyError on p.jsonl:3: 'no answer'"),
             (lambda p, c, r: [1.0], "returned 1 values for 4 completions"),
             (lambda p, c, r: [1.0, "high", 0.0, 0.0], "returned 'high' (str) for p.jsonl:2"),
             (lambda p, c, r: [1.0, 1.0, math.nan, 0.0], "returned nan (float) for p.jsonl:3"),
             (lambda p, c, r: 1.0, "returned a float")]
    for function, said in cases:
        with pytest.raises(RewardError, match=r"^reward .*") as caught:
            Reward(function, "check (r.py)")(["a"] * 4, ["b"] * 4, rows, where)
        assert said in str(caught.value) and "\n" not in str(caught.value)
    assert Reward(lambda p, c, r: [True, 2, 0.5, torch.tensor(1.0).item()])(["a"] * 4, ["b"] * 4, rows) == [1, 2, 0.5, 1]


def test_loading_a_reward_file_fails_in_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("def reward(:\n")
    (tmp_path / "ok.py").write_text("value = 3\ndef reward(p, c, r):\n    return [0.0] * len(c)\n")
    for spec, said in [("nocolon.py", "expected PATH.py:FUNCTION"), (f"{tmp_path}/none.py:reward", "no file"),
                       (f"{tmp_path}/broken.py:reward", "importing"), (f"{tmp_path}/ok.py:other", "defines no other"),
                       (f"{tmp_path}/ok.py:value", "is a int, not a function")]:
        with pytest.raises(DlzoError, match=said):
            load_reward(spec)
    assert load_reward(f"{tmp_path}/ok.py:reward")(["a"], ["b"], [{}]) == [0.0]


# ------------------------------------------------------------------------------------------------ runs


@pytest.mark.requires_shared
@pytest.mark.parametrize("fast", [True, False])
def test_accuracy_run_steps_on_minus_accuracy_and_replays_and_resumes_bit_exactly(tmp_path, fast):
    options = small_run(steps=8, eval_every=4, scope="layer:1", objective="accuracy", eps=0.1, lr=1e-2,
                        fast_path=fast)
    trained, stopped = assert_replay_and_resume_exact(tmp_path, options, stops=[6])
    whole = tmp_path / "whole"
    assert (stopped / "trajectory.jsonl").read_text() == (whole / "trajectory.jsonl").read_text()
    steps = records(whole / "trajectory.jsonl")
    for entry in steps:  # g = (L+ - L-)/2ε with L = -accuracy of the step's 4 examples
        plus, minus = entry["accuracy_plus"][0], entry["accuracy_minus"][0]
        assert plus * 4 == round(plus * 4) and entry["grads"][0] == pytest.approx((minus - plus) / 0.2)
    assert any(entry["grads"][0] for entry in steps), "no step moved: eps too small to flip a prediction"
    results = json.loads((whole / "results.json").read_text())
    evaluations = [r for r in records(whole / "metrics.jsonl") if "dev_loss" in r]
    assert all(r["dev_loss"] == -r["dev_accuracy"] for r in evaluations)
    assert results["dev_accuracy_best"] == max(r["dev_accuracy"] for r in evaluations) == -results["dev_loss_best"]
    assert results["objective"] == "accuracy" and results["test_metric"] == "accuracy"


@pytest.mark.requires_shared
def test_f1_and_reward_runs_replay_and_resume_bit_exactly(tmp_path, files):
    """F1 by the one-sided estimator (one branch at a time, tensors swapped in); a sampled reward in place."""
    f1 = generating_run(data=files["pairs"], objective="f1", estimator="one-sided", q=2)
    assert_replay_and_resume_exact(tmp_path / "f1", f1, stops=[4])
    rewarded = generating_run(data=files["prompts"], reward=files["reward"], temperature=1.0, fast_path=False)
    _, stopped = assert_replay_and_resume_exact(tmp_path / "reward", rewarded, stops=[4])
    assert (stopped / "trajectory.jsonl").read_text() == (tmp_path / "reward" / "whole" / "trajectory.jsonl").read_text()


@pytest.mark.requires_shared
def test_reward_run_records_the_reward_of_each_branch_and_of_the_dev_prompts(tmp_path, files):
    results = train(TrainConfig(**generating_run(data=files["prompts"], reward=files["reward"]), out=str(tmp_path / "r")))
    steps = records(tmp_path / "r" / "trajectory.jsonl")
    for entry in steps:
        assert entry["grads"][0] == pytest.approx((entry["reward_minus"][0] - entry["reward_plus"][0]) / 2e-2)
    assert any(entry["grads"][0] for entry in steps)
    dev = [r for r in records(tmp_path / "r" / "metrics.jsonl") if "dev_reward" in r]
    assert results["reward_start"] == dev[0]["dev_reward"] and results["reward_best"] == max(r["dev_reward"] for r in dev)
    assert results["test_metric"] == "reward" and results["test_value"] == results["reward_best"]
    # the first step's rewards, recomputed: greedy completions of its batch at θ±εz, swapped in one branch at a time
    config = TrainConfig(**generating_run(data=files["prompts"], reward=files["reward"]))
    config.validate()
    prepared = prepare_model(config, [])
    zo = make_zo_optimizer(prepared)
    train_rows = load_data(config).splits.train
    batch = [train_rows[i] for i in batch_indices(0, len(train_rows), 4, config.seed)]
    function = load_reward(files["reward"])
    for tensors, key in zip(zo.perturbed(zo.seeds_for_step(0)[0])[:2], ("reward_plus", "reward_minus")):
        with tuned_in(prepared.model, tensors):
            texts = complete(prepared.model, prepared.tokenizer, [e.prompt for e in batch], max_new_tokens=6,
                             max_length=512)
        values = function([e.prompt for e in batch], texts, [e.row for e in batch])
        assert sum(values) / 4 == pytest.approx(steps[0][key][0])


@pytest.mark.requires_shared
def test_a_reward_that_raises_stops_the_run_in_one_line_and_it_resumes_to_the_same_weights(tmp_path, files, capsys):
    """The function raises from its 6th call on: the run stops naming it and a row, keeps its logged steps, and
    once the file is fixed resumes to the weights of a run that never failed."""
    flaky = tmp_path / "flaky.py"
    flaky.write_text("calls = [0]\n" + REWARD.replace("    return", "    calls[0] += 1\n    if calls[0] >= 6:\n"
                                                      "        raise ValueError('judge offline')\n    return"))
    out = tmp_path / "run"
    args = ["train", "--model", STORIES, "--data", files["prompts"], "--reward", f"{flaky}:reward", "--out", out,
            "--batch-size", 4, "--lr", 1e-2, "--eps", 1e-2, "--steps", 6, "--eval-every", 3, "--scope", "layer:2",
            "--max-new-tokens", 6, "--eval-batch-size", 8, "--quiet"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "reward reward (" in err and "raised ValueError on" in err
    assert "prompts.jsonl:" in err and f"dlzo train --resume {out}" in err
    done = len(records(out / "trajectory.jsonl"))
    assert 0 < done < 6
    flaky.write_text(REWARD)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    train(TrainConfig(**generating_run(data=files["prompts"], reward=str(f"{flaky}:reward")), out=str(tmp_path / "whole")))
    whole, resumed = load_file(tmp_path / "whole" / "final.safetensors"), load_file(out / "final.safetensors")
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


@pytest.mark.requires_shared
def test_eval_reward_scores_a_run_on_its_dev_prompts_and_a_base_model_on_every_row(tmp_path, files, capsys):
    train(TrainConfig(**generating_run(data=files["prompts"], reward=files["reward"], steps=3), out=str(tmp_path / "r")))
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert main(["eval", "--run", str(tmp_path / "r"), "--out", str(tmp_path / "e")]) == 0
    scored = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert scored["mean_reward"] == results["reward_best"] and scored["num_examples"] == 2
    assert main(["eval", "--model", str(STORIES), "--data", files["prompts"], "--reward", files["reward"],
                 "--max-new-tokens", "6", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["num_examples"] == len(PROMPTS) * 2
    capsys.readouterr()


@pytest.mark.requires_shared
@pytest.mark.parametrize("changes,said", [
    (dict(objective="accuracy", data="pairs"), "--objective accuracy ranks the options"),
    (dict(objective="f1"), "sst2 is a classification task"),
    (dict(reward="reward"), "--reward needs --data"),
    (dict(reward="reward", data="prompts", optimizer="adamw"), "has no gradient"),
    (dict(objective="accuracy", zo_update="hizoo"), "hizoo's curvature needs a smooth loss"),
    (dict(temperature=1.0), "--temperature samples"),
    (dict(reward="reward", data="prompts", objective="f1"), "leave --objective at loss"),
    (dict(reward="nowhere.py:reward", data="prompts"), "no file /.*/nowhere.py"),
    (dict(data="questions", reward="reward"), "needs a 'prompt' field"),
])
def test_objective_flags_that_do_not_fit_are_one_line_before_anything_is_written(tmp_path, files, changes, said):
    changes = {k: files.get(v, v) if isinstance(v, str) and k in ("data", "reward") else v for k, v in changes.items()}
    with pytest.raises(DlzoError, match=said):
        train(TrainConfig(**small_run(**changes), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ ZOTrainer


def zo_trainer(stories_path, out, zo_args, train_dataset, trainer_class=None, **settings):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    import dlzo

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(stories_path)
    args = TrainingArguments(**{**dict(output_dir=str(out), max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4,
                                       report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                                       disable_tqdm=True, seed=3), **settings})
    return (trainer_class or dlzo.ZOTrainer)(model=model, args=args, train_dataset=train_dataset,
                                              processing_class=tokenizer, zo_args=zo_args, **(
                                                  {} if zo_args.reward else {"data_collator": _lm_collator(tokenizer)}))


def _lm_collator(tokenizer):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


@pytest.mark.requires_shared
def test_zo_trainer_steps_on_a_reward_of_both_branches_completions(stories_path, tmp_path):
    """ZOArguments(reward=function): prompt rows pass through whole, each step's completions at θ±εz are what the
    weights swapped in by hand write, g = (L+ - L-)/2ε with L = -mean reward, and evaluate() gives -mean reward."""
    import dlzo

    calls = []

    def reward(prompts, completions, rows):
        calls.append((list(prompts), list(completions), [r["id"] for r in rows]))
        return [float(c.count(" the")) - 0.1 * len(c.split()) for c in completions]

    rows = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    trainer = zo_trainer(stories_path, tmp_path, dlzo.ZOArguments(layer=2, eps=5e-2, reward=reward, max_new_tokens=6),
                         rows)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    history = trainer.zo_history
    assert len(history) == 3 and any(h["projected_grads"][0] for h in history)
    for h in history:
        assert h["projected_grads"][0] == pytest.approx((h["loss_plus"][0] - h["loss_minus"][0]) / 0.1)
    prompts, plus_texts, ids = calls[0]
    assert calls[1][0] == prompts and ids == [rows[i]["id"] for i in ids]  # both branches: the same rows, every field
    seed, names = history[0]["seeds"][0], trainer.zo_scope.names
    fresh = zo_trainer(stories_path, tmp_path / "fresh", dlzo.ZOArguments(layer=2, reward=reward), rows)
    for sign, written in ((1, plus_texts), (-1, calls[1][1])):
        tensors = {n: start[n] + sign * 5e-2 * trainer._zo.sample(seed, i, start[n]) for i, n in enumerate(names)}
        with tuned_in(fresh.model, tensors):
            assert complete(fresh.model, fresh.processing_class, prompts, max_new_tokens=6, max_length=512) == written
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, start[n])}
    assert moved and moved <= set(names)
    evaluated = trainer.evaluate(eval_dataset=rows[:4])["eval_loss"]
    texts = complete(trainer.model, trainer.processing_class, [r["prompt"] for r in rows[:4]], max_new_tokens=6,
                     max_length=512)
    assert evaluated == pytest.approx(-sum(reward([], texts, rows[:4])) / 4)
    trainer.save_model(str(tmp_path / "saved"))  # the function is recorded by name
    assert json.loads((tmp_path / "saved" / "dlzo_zo.json").read_text())["zo_args"]["reward"].endswith("reward")


@pytest.mark.requires_shared
def test_zo_trainer_steps_on_a_compute_loss_that_returns_a_number_without_gradient(stories_path, tmp_path):
    """The documented override: compute_loss returns -token accuracy (a float, no graph); the step perturbs in
    place, and its g is (L+ - L-)/2ε of that metric at θ±εz, recomputed by hand."""
    import dlzo

    seen = []

    class TokenAccuracyTrainer(dlzo.ZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append({k: v.clone() for k, v in inputs.items()})
            return -token_accuracy(model, inputs)

    texts = ["Once upon a time there was a little dog.", "The sun was hot and the sky was blue.",
             "Lily liked to play in the park.", "Tom had a big red car."] * 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    trainer = zo_trainer(stories_path, tmp_path, dlzo.ZOArguments(layer=2, eps=0.05), [tokenizer(t) for t in texts],
                         TokenAccuracyTrainer, max_steps=1)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    first = trainer.zo_history[0]
    seed, names = first["seeds"][0], trainer.zo_scope.names
    model = zo_trainer(stories_path, tmp_path / "m", dlzo.ZOArguments(layer=2), []).model
    zs = {n: trainer._zo.sample(seed, i, start[n]) for i, n in enumerate(names)}
    for sign, key, inputs in ((1, "loss_plus", seen[0]), (-1, "loss_minus", seen[1])):
        with tuned_in(model, {n: start[n] + sign * 0.05 * zs[n] for n in names}):
            assert first[key][0] == -token_accuracy(model, inputs)
    g = first["projected_grads"][0]
    assert g == (first["loss_plus"][0] - first["loss_minus"][0]) / (2 * 0.05) and g != 0
    for name, param in trainer.model.named_parameters():
        expected = start[name] - first["lr"] * g * zs[name] if name in zs else start[name]
        torch.testing.assert_close(param.detach(), expected)


def token_accuracy(model, inputs) -> float:
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["labels"][:, 1:]
    scored = labels != -100
    return float((logits[:, :-1].argmax(-1) == labels)[scored].float().mean())
