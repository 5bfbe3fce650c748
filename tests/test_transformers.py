"""transformers models under symfast: DCSConv1D (GPT-2's transposed Linear), tied weights converted once,
export back to transformers' own modules, save_pretrained / from_pretrained.

Tiny GPT-2, Llama and BERT built from configs (no download)."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import symfast  # noqa: E402
from symfast.nn import permutation_basis  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61


def _conv1d(nf=7, nx=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()  # Conv1D starts with a zero bias: give it values the tests can see
    return layer


STRUCTURES_1D = [
    ("elementwise", {}),
    ("elementwise", {"constrain_bias": True}),
    ("group", {}),
    ("group", {"group_dim": 0}),
    ("group", {"constrain_bias": True}),
    ("group", {"group_dim": 0, "constrain_bias": True}),
    ("lowrank", {}),
    ("mirror", {"mirror": permutation_basis(7, [(0, 1), (3, 5)], dtype=torch.float64), "mirror_dim": 1}),
]


# ---------------------------------------------------------------- DCSConv1D
@pytest.mark.parametrize("structure, options", STRUCTURES_1D, ids=lambda v: str(v) if isinstance(v, str) else
                         "-".join(f"{k}" for k in v) or "default")
def test_dcs_conv1d_is_conv1d_with_the_same_function(structure, options):
    from symfast.nn import DCSConv1D

    dense = _conv1d()
    layer = DCSConv1D.from_dense(dense, structure=structure, alpha=1e-3, **options)
    assert isinstance(layer, Conv1D) and (layer.nf, layer.nx) == (7, 5)
    assert layer.weight.shape == dense.weight.shape == (5, 7)  # the transposed layout is kept
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    if structure in ("elementwise", "group"):
        assert torch.equal(layer(x), dense(x)) and torch.equal(layer.weight, dense.weight)
    else:  # through an SVD or a projection: to rounding
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)
    back = layer.to_dense()
    assert type(back) is Conv1D
    torch.testing.assert_close(back(x), dense(x), rtol=1e-12, atol=1e-12)


def test_dcs_conv1d_groups_output_units_by_default_and_joins_the_bias_as_a_row():
    from symfast.nn import DCSConv1D

    layer = DCSConv1D.from_dense(_conv1d(), structure="group", alpha=1e-3)
    assert layer.parametrization.dim == 1 and layer.parametrization.s.shape == (7,)  # one gate per output
    joint = DCSConv1D.from_dense(_conv1d(), structure="group", alpha=1e-3, constrain_bias=True)
    assert joint.parametrization.shape == (6, 7) and joint.parametrization.dim == 1
    with torch.no_grad():
        joint.parametrization.s[2] = 0  # kill output unit 2: its weights and its bias go together
    out = joint(torch.randn(4, 5, dtype=torch.float64))
    assert torch.equal(out[:, 2], torch.zeros(4, dtype=torch.float64))
    inputs = DCSConv1D.from_dense(_conv1d(), structure="group", alpha=1e-3, group_dim=0)
    assert inputs.parametrization.s.shape == (5,) and inputs.bias_parametrization is None


def test_dcs_conv1d_fresh_layer_draws_as_conv1d():
    from symfast.nn import DCSConv1D

    torch.manual_seed(3)
    ref = Conv1D(6, 4)
    torch.manual_seed(3)
    layer = DCSConv1D(6, 4, structure="group", alpha=1e-3)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    assert "structure=group" in repr(layer) and "nf=6, nx=4" in repr(layer)


@pytest.mark.parametrize("rank_alive", [2, 0])
def test_dcs_conv1d_lowrank_exports_two_thin_conv1d_or_a_dead_one(rank_alive):
    from symfast.nn import DCSConv1D

    torch.manual_seed(0)
    a, b = torch.randn(32, rank_alive, dtype=torch.float64), torch.randn(24, rank_alive, dtype=torch.float64)
    dense = _conv1d(nf=24, nx=32)
    with torch.no_grad():
        dense.weight.copy_(a @ b.t())
    layer = DCSConv1D.from_dense(dense, structure="lowrank", alpha=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zero-element init warning escapes
        exported = layer.to_dense()
    if rank_alive:
        assert isinstance(exported, nn.Sequential) and [type(m) for m in exported] == [Conv1D, Conv1D]
        assert (exported[0].nx, exported[0].nf, exported[1].nx, exported[1].nf) == (32, 2, 2, 24)
    else:  # Conv1D cannot take zero inputs: the dead layer is the zero Conv1D
        assert type(exported) is Conv1D and not exported.weight.any()
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(exported(x), dense(x), rtol=1e-10, atol=1e-10)


def test_symfast_never_imports_transformers_itself():
    code = ("import sys, torch, symfast, symfast.nn\n"
            "m = symfast.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), alpha=0.0)\n"
            "symfast.export(m, sparse_format='csr')\n"
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------ whole models
def _gpt2(**kw):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(**kw):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=None, **kw)
    return transformers.LlamaForCausalLM(cfg)


def _bert(**kw):
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=VOCAB, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=0, **kw)
    return transformers.BertForMaskedLM(cfg)


# name -> (builder, the tied weights' holders, the modules sharing a bias, the layer count by type)
MODELS = {
    "gpt2": (_gpt2, ("transformer.wte", "lm_head"), None, {"Conv1D": 8, "Embedding": 2, "Linear": 1}),
    "llama": (lambda: _llama(tie_word_embeddings=True), ("model.embed_tokens", "lm_head"), None,
              {"Linear": 15, "Embedding": 1}),
    "bert": (_bert, ("bert.embeddings.word_embeddings", "cls.predictions.decoder"),
             ("cls.predictions", "cls.predictions.decoder"), {"Linear": 14, "Embedding": 3}),
}
# What stays as it is, reported: the norms, and BERT's head, which holds the decoder's (free) bias.
LEFT = {"LayerNorm", "LlamaRMSNorm", "BertLMPredictionHead"}


def _tokens(batch=2, length=9, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _built(name, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name][0]().eval()
    with torch.no_grad():  # nonzero biases (transformers starts them at zero): the tests must see them
        for m in model.modules():
            if getattr(m, "bias", None) is not None and isinstance(m.bias, nn.Parameter):
                m.bias.normal_(std=0.02)
    return model


def _convert(model, structure="elementwise", **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "symfast.convert: .* were not converted")  # the norms, checked below
        return symfast.convert(model, structure=structure, alpha=1e-4, **kw)


@pytest.mark.parametrize("structure", ["elementwise", "group"])
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_converts_every_linear_conv1d_and_embedding_with_the_tie_kept(name, structure):
    _, tied, bias_shared, counts = MODELS[name]
    model = _built(name)
    before = _logits(model, _tokens())
    dense_types = {n: type(m).__name__ for n, m in model.named_modules()}
    _convert(model, structure)
    report = model.dcs_report
    converted = {n: src for n, src, _ in report.converted}
    by_type = {t: sum(1 for s in converted.values() if s == t) for t in counts}
    assert by_type == counts  # every Linear / Conv1D / Embedding (GPT-2: 11 of 11)
    assert {dense_types[n] for n, _ in converted.items()} == set(counts)
    assert {typ for _, typ, _, _ in report.not_converted} <= LEFT  # no DCS layer for them
    assert report.tied == [tied]
    first, second = (model.get_submodule(n) for n in tied)
    assert first.parametrization is second.parametrization  # one structure for both
    assert sum(isinstance(m, symfast.nn.Structure) and m is first.parametrization for m in model.modules()) == 1
    if bias_shared:  # BERT: the decoder's bias is its head's bias, one tensor
        head, decoder = (model.get_submodule(n) for n in bias_shared)
        assert decoder.bias is head.bias
    # the shared structure is penalized once, and its factors are in one optimizer group once
    structures = {id(m): m for m in model.modules() if isinstance(m, symfast.nn.Structure)}
    torch.testing.assert_close(symfast.penalty(model), sum(s.penalty() for s in structures.values()))
    grouped = [id(p) for g in symfast.param_groups(model) for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    # bit for bit: the twins run the dense layers' own ops on the same weights
    assert torch.equal(_logits(model, _tokens()), before)


def test_tied_structure_gets_the_gradient_of_both_uses():
    """The dense model's tied weight gets the sum of both uses' gradients; through theta = w * u,
    the factor w must get exactly that gradient times u (chain rule), not one use's."""
    dense = _built("gpt2")
    tokens = _tokens()
    dense(input_ids=tokens, labels=tokens).loss.backward()
    grad_theta = dense.transformer.wte.weight.grad.clone()
    dense.zero_grad()
    model = _convert(dense)
    model(input_ids=tokens, labels=tokens).loss.backward()
    p = model.transformer.wte.parametrization
    torch.testing.assert_close(p.w.grad, grad_theta * p.u.detach(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_steps_export_and_save_pretrained_keep_the_tie_and_the_function(name, tmp_path):
    _, tied, bias_shared, _ = MODELS[name]
    model = _convert(_built(name))
    model.train()
    opt = torch.optim.Adam(symfast.param_groups(model), lr=1e-2)
    for step in range(3):
        tokens = _tokens(seed=step + 1)
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    first, second = (model.get_submodule(n) for n in tied)
    assert first.parametrization is second.parametrization and torch.equal(first.weight, second.weight)
    trained = _logits(model, _tokens())
    assert not torch.equal(trained, _logits(_built(name), _tokens()))  # the steps changed the model

    exported = symfast.export(model)
    first, second = (exported.get_submodule(n) for n in tied)
    assert type(first) is nn.Embedding and type(second) is nn.Linear
    assert first.weight is second.weight  # one Parameter, as transformers ties them
    if bias_shared:
        head, decoder = (exported.get_submodule(n) for n in bias_shared)
        assert decoder.bias is head.bias
    assert not any(isinstance(m, (symfast.nn.DCSLayer, symfast.nn.Structure)) for m in exported.modules())
    assert torch.equal(_logits(exported, _tokens()), trained)  # elementwise: exact
    assert exported.config.tie_word_embeddings

    exported.save_pretrained(tmp_path)
    loaded = type(exported).from_pretrained(tmp_path).eval()
    first, second = (loaded.get_submodule(n) for n in tied)
    assert first.weight is second.weight
    assert torch.equal(_logits(loaded, _tokens()), trained)


def test_untied_llama_converts_both_embeddings_separately():
    model = _llama().eval()  # tie_word_embeddings=False, Llama's default
    before = _logits(model, _tokens())
    _convert(model)
    assert model.dcs_report.tied == []
    assert model.model.embed_tokens.parametrization is not model.lm_head.parametrization
    assert torch.equal(_logits(model, _tokens()), before)


@pytest.mark.parametrize("structure", ["lowrank", "mirror"])
def test_gpt2_other_structures_keep_the_function_to_rounding(structure):
    model = _built("gpt2").double()
    tokens = _tokens()
    before = _logits(model, tokens)
    kw = {}
    if structure == "mirror":  # merge output units 0 and 1 of every layer (embedding: features 0 and 1)
        def dim(n, m):
            # the tied lm_head takes the embedding's mirror: one structure has one O
            return 1 if type(m).__name__ in ("Conv1D", "Embedding") or n == "lm_head" else 0
        kw = dict(mirror=lambda n, m: permutation_basis(m.weight.shape[dim(n, m)], [(0, 1)], dtype=torch.float64),
                  mirror_dim=dim)
    _convert(model, structure, **kw)
    assert len(model.dcs_report.converted) == 11 and model.dcs_report.tied == [("transformer.wte", "lm_head")]
    torch.testing.assert_close(_logits(model, tokens), before, rtol=1e-9, atol=1e-9)
    exported = symfast.export(model)
    assert exported.transformer.wte.weight is exported.lm_head.weight  # tied: full size, not two thin layers
    torch.testing.assert_close(_logits(exported, tokens), before, rtol=1e-9, atol=1e-9)


def test_a_tie_convert_cannot_keep_is_reported_loudly_and_left_whole():
    model = _built("gpt2")
    with pytest.warns(UserWarning, match="were not converted"):
        symfast.convert(model, alpha=1e-4, exclude=["lm_head"])
    reasons = {n: r for n, _, _, r in model.dcs_report.not_converted}
    assert "transformer.wte" in reasons
    assert "shared by transformer.wte, lm_head (tied)" in reasons["transformer.wte"]
    assert "left out by include/exclude" in reasons["transformer.wte"]
    assert type(model.transformer.wte) is nn.Embedding and model.transformer.wte.weight is model.lm_head.weight
    # explicit options that disagree: one shared structure takes one value
    model = _built("gpt2")
    with pytest.warns(UserWarning, match="were not converted"):
        symfast.convert(model, structure="group", alpha=1e-4, group_dim={"transformer.wte": 1, "lm_head": 0})
    reasons = {n: r for n, _, _, r in model.dcs_report.not_converted}
    assert "group_dim= differs between them" in reasons["lm_head"] and "transformer.wte" in reasons
    assert model.transformer.wte.weight is model.lm_head.weight


def test_a_weight_shared_with_a_module_without_twin_is_reported():
    class Holder(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.table = weight  # the same Parameter, held by a module convert cannot convert

    emb = nn.Embedding(10, 4)
    model = nn.Sequential(emb, Holder(emb.weight))
    with pytest.warns(UserWarning, match="were not converted"):
        symfast.convert(model, alpha=1e-3)
    reason = dict((n, r) for n, _, _, r in model.dcs_report.not_converted)["0"]
    assert "1 is a Holder, which has no DCS layer" in reason and type(model[0]) is nn.Embedding


def test_gpt2_sparse_export_multiplies_by_sparse_weights():
    model = _convert(_built("gpt2"))
    with torch.no_grad():  # a lasso-trained model: most of each Conv1D weight is zero
        for m in model.modules():
            if type(m).__name__ in ("DCSConv1D", "DCSEmbedding"):  # the embedding is lm_head's weight too
                theta = m.weight
                m.set_weight(theta * (torch.rand_like(theta) > 0.95), *([m.bias] if m._has_bias() else []))
    dense = symfast.export(model)
    with pytest.warns(UserWarning, match=r"left lm_head dense: their weight is tied"):
        sparse = symfast.export(model, sparse_format="csr")
    kinds = {n: type(m).__name__ for n, m in sparse.named_modules()}
    assert sum(k == "SparseLinear" for k in kinds.values()) == 8 and kinds["lm_head"] == "Linear"
    assert sparse.transformer.wte.weight is sparse.lm_head.weight
    torch.testing.assert_close(_logits(sparse, _tokens()), _logits(dense, _tokens()), rtol=1e-5, atol=1e-5)


def test_bert_with_constrain_bias_keeps_its_shared_bias_and_its_tie_whole():
    """constrain_bias=True would compute the decoder's bias from factors of its own, untying it from
    its head's bias; then the decoder stays dense, and so does the embedding tied to it."""
    model = _built("bert")
    before = _logits(model, _tokens())
    with pytest.warns(UserWarning, match="were not converted"):
        symfast.convert(model, alpha=1e-4, constrain_bias=True)
    reasons = {n: r for n, _, _, r in model.dcs_report.not_converted}
    assert "its bias is shared with cls.predictions" in reasons["cls.predictions.decoder"]
    assert "cls.predictions.decoder could not be converted" in reasons["bert.embeddings.word_embeddings"]
    assert model.dcs_report.tied == []
    embedding, decoder = model.bert.embeddings.word_embeddings, model.cls.predictions.decoder
    assert type(embedding) is nn.Embedding and type(decoder) is nn.Linear and embedding.weight is decoder.weight
    assert decoder.bias is model.cls.predictions.bias
    converted = {n for n, _, _ in model.dcs_report.converted}
    assert "bert.embeddings.position_embeddings" in converted and "bert.encoder.layer.0.attention.self.query" in converted
    assert torch.equal(_logits(model, _tokens()), before)
