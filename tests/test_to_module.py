"""``fxprune.to_module``: the pruned sizes written back into the model's own modules.

Property: for every Hugging Face family of tests/hf_models.py, a plan of whole heads (kv groups or query heads
inside them) and MLP channels gives a copy of the model, of its own class, that computes what the masked
original computes on fresh inputs at other batch sizes and lengths than the trace's; the input model is left as
it was. Causal LMs keep ``generate`` with the key/value cache and, where every layer keeps the same sizes,
``save_pretrained`` / ``from_pretrained``. What a model's code cannot express is refused with the reason.
"""
import tempfile
import warnings

import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st

transformers = pytest.importorskip("transformers")

import fxprune  # noqa: E402
from fxprune.verify import masked  # noqa: E402
from helpers import assert_unchanged, examples, randomize as randomize_timm, state_snapshot  # noqa: E402
from hf_models import FAMILIES, VOCAB, Arch, build, inputs, randomize  # noqa: E402
from test_hf import TRACE_SEQ, _options, archs, fresh_inputs, output_error  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::fxprune.PruningShortfallWarning",
                                        "ignore:fxprune.*cannot describe the pruned sizes")


@pytest.mark.parametrize("name", list(FAMILIES))
@settings(max_examples=examples(1), phases=[Phase.explicit, Phase.reuse, Phase.generate], deadline=None)
@given(data=st.data())
def test_own_code_at_pruned_sizes_equals_masked_original(name, data):
    family = FAMILIES[name]
    case = f"{name}-to_module"
    arch = data.draw(archs(family, case), "arch")
    head_ratio = data.draw(_options((0.5, 0.75), case, "head_ratio"), "head_ratio")
    heads = data.draw(_options(("kv_groups", "q_heads") if family.gqa else ("kv_groups",), case, "heads"), "heads")
    model = build(family, arch, family.attentions[-1])
    snapshot, config = state_snapshot(model), model.config.to_dict()
    generator = torch.Generator().manual_seed(1)
    example = inputs(family, 1, TRACE_SEQ, generator)
    analysis = fxprune.analyze(model, example)
    plan = fxprune.plan(analysis, 0.25, head_ratio=head_ratio, heads=heads, kinds=("mlp",))
    pruned = fxprune.apply(analysis, plan)

    small = fxprune.to_module(model, pruned, example_inputs=example)
    assert type(small) is type(model)
    assert fxprune.count_params(small) == fxprune.count_params(pruned) < fxprune.count_params(model)
    reference = masked(model, analysis, plan)
    with torch.no_grad():
        for x in fresh_inputs(family, generator):
            assert output_error(pruned(*x), small(*x)) < 1e-5
            assert output_error(pruned(*x), reference(*x)) < 1e-5
    assert_unchanged(model, snapshot)
    assert model.config.to_dict() == config


def _causal_lm(cls: str, config: str, seed: int = 0, **sizes) -> torch.nn.Module:
    settings_ = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, attn_implementation="sdpa", pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = getattr(transformers, cls)(getattr(transformers, config)(**{**settings_, **sizes}))
    return randomize(model, seed).eval()


CAUSAL_LMS = {
    "Llama": lambda: _causal_lm("LlamaForCausalLM", "LlamaConfig", head_dim=8, num_key_value_heads=2),
    "Qwen3": lambda: _causal_lm("Qwen3ForCausalLM", "Qwen3Config", head_dim=8, num_key_value_heads=2),
    "Phi-3": lambda: _causal_lm("Phi3ForCausalLM", "Phi3Config", head_dim=8, num_key_value_heads=2),
    "GPT-2": lambda: _causal_lm("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_head=4, n_layer=2, n_inner=48,
                                n_positions=64),
}


@pytest.mark.parametrize("name, heads", [("Llama", "q_heads"), ("Qwen3", "kv_groups"), ("Phi-3", "kv_groups"),
                                         ("GPT-2", "kv_groups")])
def test_generate_with_cache_at_pruned_sizes(name, heads):
    """Cached decoding (each step reads the key/value cache of the steps before) gives the logits the pruned
    module computes on the whole sequence, with the residual width narrowed too."""
    model = CAUSAL_LMS[name]()
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    pruned = fxprune.prune(model, 0.25, example_inputs=(ids,), head_ratio=0.5, heads=heads,
                           kinds=("mlp", "residual"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = fxprune.to_module(model, pruned, example_inputs=(ids,))
    # GPT2Config derives head_dim from n_embd / n_head: no config says both narrower stream and fewer heads
    assert any("cannot describe" in str(w.message) for w in caught) == (name == "GPT-2")
    assert small.get_input_embeddings().embedding_dim < model.get_input_embeddings().embedding_dim
    prompt = ids[:, :4]
    out = small.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences.shape[1] == 10
    with torch.no_grad():
        whole = pruned(out.sequences).logits[:, prompt.shape[1] - 1:-1]
    assert fxprune.relative_error(torch.stack(out.logits, 1), whole) < 1e-5


def test_uniform_plan_round_trips_through_save_pretrained():
    model = CAUSAL_LMS["Llama"]()
    config = model.config.to_dict()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    pruned = fxprune.prune(model, 0.25, example_inputs=(ids,), head_ratio=0.5, heads="q_heads",
                           kinds=("mlp", "residual"))
    small = fxprune.to_module(model, pruned, example_inputs=(ids,))
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
    assert small.config.intermediate_size == 36 and small.config.hidden_size == 24
    assert all(layer.self_attn.num_key_value_groups == 1 for layer in small.model.layers)
    assert model.config.to_dict() == config
    with tempfile.TemporaryDirectory() as directory:
        small.save_pretrained(directory)
        again = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, small(ids).logits)


@pytest.mark.parametrize("name, options, sizes", [
    ("Llama", dict(kinds=("mlp",), ignored_layers=["model.layers.1.mlp.down_proj"]),
     lambda m: [m.get_submodule(f"model.layers.{i}.mlp.down_proj").weight.shape[1] for i in range(2)]),
    # Phi-3 slices its fused qkv where the config's head count says: each layer needs its own
    ("Phi-3", dict(kinds=("mlp",), head_ratio=0.5, ignored_layers=["model.layers.1.self_attn.qkv_proj"]),
     lambda m: [m.get_submodule(f"model.layers.{i}.self_attn.o_proj").weight.shape[1] for i in range(2)]),
])
def test_layers_of_different_sizes_warn_that_the_config_cannot_say_them(name, options, sizes):
    model = CAUSAL_LMS[name]()
    config = model.config.to_dict()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    pruned = fxprune.prune(model, 0.25, example_inputs=(ids,), **options)
    assert sizes(pruned)[0] < sizes(pruned)[1] == sizes(model)[1]
    with pytest.warns(UserWarning, match="Config cannot describe the pruned sizes"):
        small = fxprune.to_module(model, pruned, example_inputs=(ids,))
    assert small.config.to_dict() == config  # the original's sizes: the config does not lie about one layer
    with torch.no_grad():
        assert fxprune.relative_error(small(ids).logits, pruned(ids).logits) < 1e-5


def test_compensated_and_trained_weights_carry_over():
    """The copy holds the pruned module's tensors, not the original's sliced: compensation is kept, and the
    copy owns them (changing it leaves the pruned module alone)."""
    model = CAUSAL_LMS["Llama"]()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 6), generator=generator)
    data = [(torch.randint(3, VOCAB, (4, 8), generator=generator),) for _ in range(3)]
    pruned = fxprune.prune(model, 0.5, example_inputs=(ids,), head_ratio=0.5, kinds=("mlp",), reweight_data=data,
                           compensation="least_squares")
    assert fxprune.plan_of(pruned) and pruned.meta["fxprune_compensated"]
    small = fxprune.to_module(model, pruned, example_inputs=(ids,))
    plain = fxprune.apply(model, fxprune.plan_of(pruned), example_inputs=(ids,))
    with torch.no_grad():
        assert torch.equal(small(ids).logits, pruned(ids).logits)
        assert not torch.allclose(small(ids).logits, plain(ids).logits)
        small.model.layers[0].mlp.down_proj.weight.zero_()
    assert pruned.get_submodule("model.layers.0.mlp.down_proj").weight.abs().sum() > 0


def test_what_the_model_code_cannot_express_is_refused():
    model = CAUSAL_LMS["Llama"]()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    inside = fxprune.prune(model, 0.25, example_inputs=(ids,))  # q/k and v channels inside heads
    with pytest.raises(fxprune.InvalidArgumentError, match="inside heads .*self_attn.q_proj:qk"):
        fxprune.to_module(model, inside, example_inputs=(ids,))
    branches = fxprune.prune(model, 0.5, example_inputs=(ids,), kinds=("depth",))
    with pytest.raises(fxprune.InvalidArgumentError, match="residual branches"):
        fxprune.to_module(model, branches, example_inputs=(ids,))
    data = [(torch.randint(3, VOCAB, (4, 8)),)]
    reweighted = fxprune.prune(model, 0.25, example_inputs=(ids,), kinds=("mlp",), reweight_data=data,
                               compensation="reweight")
    with pytest.raises(fxprune.InvalidArgumentError, match="fold_reweights"):
        fxprune.to_module(model, reweighted, example_inputs=(ids,))
    with pytest.raises(fxprune.InvalidArgumentError, match="GraphModule"):
        fxprune.to_module(model, model, example_inputs=(ids,))


def test_timm_vit_and_swin_follow_and_beit_names_the_module_that_cannot():
    import timm

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vit = randomize_timm(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                           num_classes=5)).eval()
    swin = randomize_timm(timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, depths=(2, 1),
                                            num_heads=(2, 4), embed_dim=32, num_classes=5)).eval()
    for model in (vit, swin):
        pruned = fxprune.prune(model, 0.25, example_inputs=(x,), head_ratio=0.5, kinds=("mlp", "residual"))
        small = fxprune.to_module(model, pruned, example_inputs=(x,))
        assert type(small) is type(model)
        y = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            assert fxprune.relative_error(small(y), pruned(y)) < 1e-5
    assert vit.blocks[0].attn.num_heads == 3 and small.layers[0].blocks[0].attn.num_heads == 1
    beit = randomize_timm(timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32,
                                            num_heads=4, num_classes=5)).eval()
    pruned = fxprune.prune(beit, 0.25, example_inputs=(x,), head_ratio=0.5, kinds=("mlp",))
    with pytest.raises(fxprune.RewriteError, match="module 'blocks.0.attn' \\(Attention\\)"):  # reshapes to its input's width
        fxprune.to_module(beit, pruned, example_inputs=(x,))


@pytest.mark.parametrize("name", ["BERT", "DistilBERT", "GPT-2"])
def test_mlp_plan_round_trips_where_the_config_names_the_mlp_width(name):
    """GPT-2 leaves ``n_inner`` to a default (4 × n_embd): the new width is written in all the same."""
    family = FAMILIES[name]
    model = build(family, Arch(heads=2, head_dim=8, layers=2, intermediate=32))
    example = inputs(family, 2, TRACE_SEQ, torch.Generator().manual_seed(0))
    pruned = fxprune.prune(model, 0.25, example_inputs=example, kinds=("mlp",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config can say it: no warning
        small = fxprune.to_module(model, pruned, example_inputs=example)
    with tempfile.TemporaryDirectory() as directory:
        small.save_pretrained(directory)
        again = type(model).from_pretrained(directory).eval()
    with torch.no_grad():
        # from_pretrained may pick another attention implementation: equal to rounding
        assert fxprune.relative_error(again(*example).last_hidden_state, small(*example).last_hidden_state) < 1e-5
    assert fxprune.count_params(again) < fxprune.count_params(model)


def test_macs_budget_of_whole_heads_mlp_and_residual_decodes_with_cache():
    """The budget form a deployed decoder wants: kinds ("heads", "mlp", "residual") under one MACs target, then
    the model's own class back; layers keep different head counts, which the config cannot say."""
    model = CAUSAL_LMS["Qwen3"]()
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    pruned = fxprune.prune(model, example_inputs=(ids,), target_macs=0.5, kinds=("heads", "mlp", "residual"))
    assert fxprune.plan_of(pruned).options["reached"] == pytest.approx(0.5, abs=0.02)
    small = fxprune.to_module(model, pruned, example_inputs=(ids,))
    out = small.generate(ids[:, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    with torch.no_grad():
        whole = pruned(out.sequences).logits[:, 3:-1]
    assert fxprune.relative_error(torch.stack(out.logits, 1), whole) < 1e-5


def test_whole_layers_leave_the_decoder_with_fewer_layers():
    """kinds "layers": a block's attention and MLP go together, so to_module deletes the block from
    ``model.layers``; the later layers' ``layer_idx`` (the cache's key) and the config's layer count and layer
    types follow, cached decoding and from_pretrained included. MACs counted on the pruned graph are what the
    budget planned (torch.export's metadata asserts no longer keep removed layers' work alive)."""
    model = _causal_lm("Qwen2ForCausalLM", "Qwen2Config", num_hidden_layers=4, num_key_value_heads=2)
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    plan = fxprune.plan(model, 0.5, example_inputs=(ids,), kinds=("layers", "mlp"))
    assert len(plan.options["layers"]) == 2 and len(plan.branches) == 4
    # the first and the third layer, whichever the scores chose: the last ones keep their index when deleted
    plan.options["layers"] = ["model.layers.0", "model.layers.2"]
    plan.branches = [f"{block}:{kind}" for block in plan.options["layers"] for kind in ("attention", "mlp")]
    pruned = fxprune.apply(model, plan, example_inputs=(ids,))
    small = fxprune.to_module(model, pruned, example_inputs=(ids,))
    assert len(small.model.layers) == small.config.num_hidden_layers == 2 == len(small.config.layer_types)
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    assert len(model.model.layers) == model.config.num_hidden_layers == 4
    out = small.generate(ids[:, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    with torch.no_grad():
        whole = pruned(out.sequences).logits[:, 3:-1]
    assert fxprune.relative_error(torch.stack(out.logits, 1), whole) < 1e-5
    with tempfile.TemporaryDirectory() as directory:
        small.save_pretrained(directory)
        again = transformers.Qwen2ForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        assert fxprune.relative_error(again(ids).logits, small(ids).logits) < 1e-6

    budget = fxprune.prune(model, example_inputs=(ids,), target_macs=0.6, kinds=("layers",))
    reached = fxprune.plan_of(budget).options["reached"]
    assert fxprune.count_macs(budget, (ids,)) / fxprune.count_macs(model, (ids,)) == pytest.approx(reached, abs=1e-9)


def test_whole_layers_of_timm_vit_and_the_blocks_that_cannot_go():
    import timm

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vit = randomize_timm(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                                           num_classes=5)).eval()
    pruned = fxprune.prune(vit, 0.5, example_inputs=(x,), kinds=("layers",))
    small = fxprune.to_module(vit, pruned, example_inputs=(x,))
    assert len(small.blocks) == 2 and len(vit.blocks) == 4
    y = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert fxprune.relative_error(small(y), pruned(y)) < 1e-5
    # BERT normalises after each residual add (post-norm): without its branches the block still has its norms
    family = FAMILIES["BERT"]
    bert = build(family, Arch(heads=2, head_dim=8, layers=3, intermediate=16))
    example = inputs(family, 2, TRACE_SEQ, torch.Generator().manual_seed(0))
    plan = fxprune.plan(bert, 0.4, example_inputs=example, kinds=("layers",))
    block = plan.options["layers"][0]
    assert block.startswith("encoder.layer.") and {f"{block}.attention:attention", f"{block}:mlp"} <= set(plan.branches)
    with pytest.raises(fxprune.InvalidArgumentError, match=f"cannot delete block '{block}'.*LayerNorm"):
        fxprune.to_module(bert, fxprune.apply(bert, plan, example_inputs=example), example_inputs=example)
