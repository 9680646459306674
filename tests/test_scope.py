import pytest

from conftest import tiny_model
from dlzo.engine.scope import add_lora, parse_scope, select
from dlzo.errors import DlzoError
from dlzo.model.loading import decoder_layers


@pytest.mark.parametrize("text,kind,layers", [
    ("full", "full", []), ("dominant", "dominant", []), ("lora", "lora", []), ("dominant-lora", "dominant-lora", []),
    ("layer:3", "layers", [3]), ("layers:5, 1,1", "layers", [1, 5]), (" Layer:0 ", "layers", [0]),
])
def test_parse_scope(text, kind, layers):
    spec = parse_scope(text)
    assert (spec.kind, spec.layers) == (kind, layers)


@pytest.mark.parametrize("text", ["layer:1,2", "layer:", "layers:x", "everything", "layer:-1"])
def test_bad_scope_lists_the_choices(text):
    with pytest.raises(DlzoError, match=r"is not one of: full \| dominant \| layer:K"):
        parse_scope(text)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "opt"])
def test_layer_scope_selects_exactly_that_layers_tensors(arch):
    model = tiny_model(arch)
    scope = select(model, parse_scope("layer:2"), [2])
    layer = decoder_layers(model)[2]
    assert scope.tuned == sum(p.numel() for p in layer.parameters())  # brute force: the block's own count
    assert scope.layers == [2]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in layer.parameters()}
    assert 0 < scope.fraction < 0.5


def test_params_mlp_attn_and_regex_partition_a_llama_layer():
    model = tiny_model("llama")
    layer_total = sum(p.numel() for p in decoder_layers(model)[1].parameters())
    mlp = select(model, parse_scope("layer:1"), [1], "mlp")
    attn = select(model, parse_scope("layer:1"), [1], "attn")
    norms = select(model, parse_scope("layer:1"), [1], r"layernorm")
    assert not set(mlp.names) & set(attn.names)
    assert mlp.tuned + attn.tuned + norms.tuned == layer_total  # the norms are neither attention nor MLP
    assert all("post_attention_layernorm" not in n for n in attn.names)


def test_selections_that_select_nothing_or_a_missing_layer_are_errors():
    model = tiny_model("llama")
    with pytest.raises(DlzoError, match="selects no tensors"):
        select(model, parse_scope("layer:1"), [1], "no_such_tensor")
    with pytest.raises(DlzoError, match=r"layer 9 does not exist \(the model has layers 0..3\)"):
        select(model, parse_scope("layer:9"), [9])
    with pytest.raises(DlzoError, match="not a valid regex|neither all/mlp/attn"):
        select(model, parse_scope("full"), [], "(")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lora_on_q_and_v_of_chosen_layers(arch):
    model = add_lora(tiny_model(arch), [2])
    scope = select(model, parse_scope("dominant-lora"), [2])
    assert scope.names and all("lora_" in n and ".layers.2." in n for n in scope.names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in scope.names} == {"q_proj", "v_proj"}
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.0)
    # rank-8 A (r x in) and B (out x r) on q and v; Qwen3's grouped-query v_proj is narrower than q_proj
    q, v = (decoder_layers(model)[2].self_attn.q_proj, decoder_layers(model)[2].self_attn.v_proj)
    expected = sum(8 * (m.in_features + m.out_features) for m in (q, v))
    assert scope.tuned == expected


def test_lezo_scope_covers_every_decoder_layer_with_its_groups():
    model = tiny_model("llama")
    scope = select(model, parse_scope("lezo:2"), [])
    assert scope.description == "lezo:2" and scope.sampled_layers == 2
    assert len(scope.layer_groups) == len(scope.names) and set(scope.layer_groups) == set(range(len(decoder_layers(model))))
    assert all(f".layers.{g}." in n for n, g in zip(scope.names, scope.layer_groups))
    with pytest.raises(DlzoError, match="lezo:99"):
        select(tiny_model("llama"), parse_scope("lezo:99"), [])
