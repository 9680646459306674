import pytest
import torch

from conftest import DATA, tiny_model
from dlzo.data.benchmarks import load_task
from dlzo.data.examples import Example
from dlzo.engine.scoring import batch_loss, candidate_scores, encode, per_example_losses, token_logprobs
from dlzo.model.loading import load_model


def examples(name, count=6):
    return load_task(name, DATA).splits(num_train=count, num_dev=0, num_test=1).train


def single_token_examples():
    # " a" and " the" are one piece each in the stories260K vocabulary: these pack into one row.
    return [Example("Once upon a time there was", [" a", " the"], i % 2) for i in range(3)] + [
        Example("The cat sat on", [" the", " a"], 0)]


@pytest.fixture(scope="module")
def stories(stories_path):
    return load_model(stories_path)


@pytest.mark.parametrize("task", ["sst2", "copa", "cb"])
def test_batch_scores_equal_one_example_at_a_time(task, stories, stories_tokenizer):
    chosen = examples(task)
    batch = encode(stories_tokenizer, chosen)
    batched = per_example_losses(batch, token_logprobs(stories, batch))
    brute = torch.stack([batch_loss(stories, encode(stories_tokenizer, [e], pack_single_token=False),
                                    full_logits=True) for e in chosen])
    torch.testing.assert_close(batched, brute, rtol=1e-5, atol=1e-5)


def test_packed_candidates_equal_one_sequence_per_candidate(stories, stories_tokenizer):
    chosen = single_token_examples()
    packed = encode(stories_tokenizer, chosen)
    separate = encode(stories_tokenizer, chosen, pack_single_token=False)
    assert packed.input_ids.shape[0] == len(chosen) and separate.input_ids.shape[0] == 2 * len(chosen)
    torch.testing.assert_close(candidate_scores(packed, token_logprobs(stories, packed)),
                               candidate_scores(separate, token_logprobs(stories, separate, full_logits=True)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_scores_do_not_change_with_padding(arch, stories_tokenizer):
    model = tiny_model(arch)
    short = examples("sst2", 2)
    long = [Example("word " * 60, [" great", " terrible"], 0)]
    alone = candidate_scores(b := encode(stories_tokenizer, short), token_logprobs(model, b))
    padded = candidate_scores(b := encode(stories_tokenizer, short + long), token_logprobs(model, b))[:2]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


def test_classification_loss_is_cross_entropy_over_mean_logprobs(stories, stories_tokenizer):
    chosen = examples("cb", 3)
    batch = encode(stories_tokenizer, chosen)
    logprobs = token_logprobs(stories, batch)
    scores = candidate_scores(batch, logprobs)
    expected = torch.nn.functional.cross_entropy(scores, torch.tensor([e.label for e in chosen]))
    torch.testing.assert_close(batch_loss(stories, batch), expected)


def test_packed_rows_are_no_wider_than_the_longest_sequence(stories_tokenizer):
    chosen = examples("copa", 5) + examples("sst2", 4)
    padded = encode(stories_tokenizer, chosen, pack_single_token=False, layout="padded")
    packed = encode(stories_tokenizer, chosen, pack_single_token=False, layout="packed")
    assert packed.input_ids.shape[1] == padded.input_ids.shape[1]  # padded width = longest sequence
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    # every sequence's tokens land where the packing says they do
    for row, position, target in zip(packed.token_row, packed.token_position, packed.token_target):
        assert packed.input_ids[row, position + 1] == target


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "opt"])
def test_packed_layout_equals_padded_or_is_refused(arch, stories_tokenizer):
    from dlzo.engine.scoring import supports_packing

    model = tiny_model(arch)
    chosen = examples("copa", 5) + examples("sst2", 4)
    padded = encode(stories_tokenizer, chosen, layout="padded")
    packed = encode(stories_tokenizer, chosen, layout="packed")
    assert packed.input_ids.numel() < padded.input_ids.numel()
    same = torch.allclose(candidate_scores(padded, token_logprobs(model, padded)),
                          candidate_scores(packed, token_logprobs(model, packed)), atol=1e-5)
    assert supports_packing(model, stories_tokenizer) == same
    assert same or arch == "opt"  # OPT ignores restarted positions: the check must catch it
