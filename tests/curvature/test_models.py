"""Real architectures on the fast path of symfast.curvature: tiny transformers models built from
configs (Llama, BERT, GPT-2, ViT), a ResNet-style CNN and DCS-converted CNNs (each structure).

For each, method="fast" (Taylor mode, all directions in one pass) must take no fallback (no
PerSamplePathWarning) and agree with method="reference" (vmap over samples of jvp(grad), an
independent autodiff path) to 1e-10 relative, and with central finite differences of the float64
per-sample losses.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import symfast
from symfast.curvature import functional_loss, per_sample_curvatures, per_sample_directional_derivatives
from symfast.curvature.per_sample import PerSamplePathWarning

transformers = pytest.importorskip("transformers")

DT = torch.float64
EPS = 1e-4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _directions(params, K=2, seed=1):
    """K random directions of norm 1 over all parameters (h stays O(1): finite differences stay accurate)."""
    g = _gen(seed)
    d = {k: torch.randn((K,) + tuple(v.shape), generator=g, dtype=DT) for k, v in params.items()}
    norm = sum(v.reshape(K, -1).pow(2).sum(1) for v in d.values()).sqrt()
    return {k: v / norm.reshape((K,) + (1,) * (v.dim() - 1)) for k, v in d.items()}


def _shift(params, d, eps):
    return {k: params[k] + eps * d[k] for k in params}


def _fd(loss_fn, params, dirs, batch):
    """Central differences along each direction: (first, second) derivatives, [B, K] each."""
    g, h = [], []
    with torch.no_grad():
        l0 = loss_fn(params, batch)
        for k in range(next(iter(dirs.values())).shape[0]):
            n = {name: d[k] for name, d in dirs.items()}
            lp, lm = loss_fn(_shift(params, n, EPS), batch), loss_fn(_shift(params, n, -EPS), batch)
            g.append((lp - lm) / (2 * EPS))
            h.append((lp - 2 * l0 + lm) / EPS**2)
    return torch.stack(g, 1), torch.stack(h, 1)


def _assert_fd_close(actual, expected, what):
    # Central differences in float64 with eps = 1e-4: truncation ~eps^2 |l''''| / 12 and rounding
    # ~1e-16 |l| / eps^2 = 1e-8 |l|, both far below 2e-5 of the values' scale for these O(1) losses.
    scale = expected.abs().max().item() + 1.0
    err = (actual - expected).abs().max().item()
    assert err <= 2e-5 * scale, f"{what}: max |engine - finite differences| = {err:.3e} (scale {scale:.3e})"


def _assert_rel_close(actual, expected, what, rtol=1e-10):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{what}: max |fast - reference| = {err:.3e} (scale {scale:.3e})"


# ------------------------------------------------------------------ models
def _token_batch(B=3, T=5, vocab=32, seed=0, causal=True):
    """Left-padded token ids: row 0 full, row 1 three pads, row 2 one real token.

    Returns (ids, padding mask [B, T], attention mask [B, 1, T, T]). The attention mask is the
    4-D boolean mask HF builds from the padding mask (causal for the LMs), given ready-made: HF's
    own construction branches on the mask's values (is it all ones?), which vmap over samples (the
    reference path) cannot follow. Padded query rows of the causal mask allow no key at all."""
    # no id 0: BERT's pad_token_id, whose embedding row reverse mode leaves out of the gradient
    # (nn.Embedding's padding_idx convention) while forward mode, the jets and finite differences
    # differentiate it
    ids = torch.randint(1, vocab, (B, T), generator=_gen(seed))
    lengths = torch.tensor([T, T - 3, 1])[:B]
    keep = torch.arange(T)[None, :] >= (T - lengths)[:, None]
    allowed = keep[:, None, None, :].expand(B, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    return ids, keep.long(), allowed


def _lm_loss(model, hf_mask=False):
    """Per-sample mean next-token cross-entropy over the real (unpadded) positions. hf_mask: pass
    the [B, T] padding mask and let the model build its attention mask."""

    def loss(p, batch):
        ids, mask, attention = batch
        attention = mask if hf_mask else attention
        logits = torch.func.functional_call(model, p, (ids,), {"attention_mask": attention}).logits
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        V = logits.shape[-1]
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels.reshape(-1), reduction="none")
        ce = ce.view(ids.shape[0], -1)
        return ce.sum(1) / (labels != -100).sum(1).clamp(min=1).to(ce.dtype)

    return loss


def _rms_ops(self, x):
    """LlamaRMSNorm's ops, in the input's dtype."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rms_fused(self, x):
    return F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)


def llama(hf_mask=False):
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DT).eval()
    # LlamaRMSNorm computes in float32 whatever the model's dtype (a choice for half models), which
    # would round this float64 model to float32 and make a 1e-10 comparison measure that rounding.
    # Its formula in the input's dtype instead: once as HF's ops (pow/mean/rsqrt), else F.rms_norm.
    layer = model.model.layers[0]
    layer.input_layernorm.forward = _rms_ops.__get__(layer.input_layernorm)
    for norm in (layer.post_attention_layernorm, model.model.norm):
        norm.forward = _rms_fused.__get__(norm)
    return _lm_loss(model, hf_mask), {k: v.detach() for k, v in model.named_parameters()}, _token_batch()


def gpt2(hf_mask=False):
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                  attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(DT).eval()
    return _lm_loss(model, hf_mask), {k: v.detach() for k, v in model.named_parameters()}, _token_batch()


def bert():
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=12, max_position_embeddings=16, num_labels=3,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).to(DT).eval()
    ids, _, attention = _token_batch(causal=False)
    y = torch.tensor([0, 2, 1])

    def loss(p, batch):
        (ids, attention), y = batch
        logits = torch.func.functional_call(model, p, (ids,), {"attention_mask": attention}).logits
        return F.cross_entropy(logits, y, reduction="none")

    return loss, {k: v.detach() for k, v in model.named_parameters()}, ((ids, attention), y)


def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=12, num_labels=3,
                                 attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).to(DT).eval()
    x = torch.randn(3, 3, 8, 8, generator=_gen(3), dtype=DT)
    y = torch.tensor([1, 0, 2])

    def loss(p, batch):
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)).logits, y, reduction="none")

    return loss, {k: v.detach() for k, v in model.named_parameters()}, (x, y)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        # SiLU, not ReLU: central differences across a kink would be meaningless
        return F.silu(x + self.bn2(self.conv2(F.silu(self.bn1(self.conv1(x))))))


class _ResNet(nn.Module):
    def __init__(self, c=3, classes=3):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block = _Block(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.block(F.silu(self.bn(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet():
    torch.manual_seed(0)
    model = _ResNet().to(DT)
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    loss_fn, params = functional_loss(model, nn.CrossEntropyLoss(reduction="none"))
    x = torch.randn(4, 2, 5, 5, generator=_gen(4), dtype=DT)
    return loss_fn, params, (x, torch.tensor([0, 1, 2, 1]))


def _dcs_mlp(structure):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, 6), nn.Tanh(),
                              nn.Linear(6, 3)).to(DT)
        symfast.convert(model, structure=structure, alpha=0.1, warn=False)
        loss_fn, params = functional_loss(model, nn.CrossEntropyLoss(reduction="none"))
        x = torch.randn(4, 2, 5, generator=_gen(5), dtype=DT)
        return loss_fn, params, (x, torch.tensor([0, 1, 2, 1]))

    return build


MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert, "vit": vit, "resnet-bn-eval": resnet,
          **{f"dcs-{s}-cnn": _dcs_mlp(s) for s in ("elementwise", "group", "lowrank", "mirror")}}


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_follows_the_model_and_matches_reference_and_finite_differences(name):
    loss_fn, params, batch = MODELS[name]()
    dirs = _directions(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)  # the fast path, no fallback
        h = per_sample_curvatures(loss_fn, params, dirs, batch)
        g = per_sample_directional_derivatives(loss_fn, params, dirs, batch)
    assert torch.isfinite(h).all() and torch.isfinite(g).all()
    _assert_rel_close(h, per_sample_curvatures(loss_fn, params, dirs, batch, method="reference"), f"{name}: h")
    _assert_rel_close(g, per_sample_directional_derivatives(loss_fn, params, dirs, batch, method="reference"),
                      f"{name}: g")
    fd_g, fd_h = _fd(loss_fn, params, dirs, batch)
    _assert_fd_close(g, fd_g, f"{name}: g")
    _assert_fd_close(h, fd_h, f"{name}: h")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_masks_built_by_the_model_stay_on_the_fast_path(name):
    """With the [B, T] padding mask, the model builds its attention mask by branching on the mask's
    values: the reference path (vmap over samples) cannot follow that, the jets can; they agree with
    nested forward mode on the whole batch."""
    loss_fn, params, batch = MODELS[name](hf_mask=True)
    dirs = _directions(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        h = per_sample_curvatures(loss_fn, params, dirs, batch)
    _assert_rel_close(h, per_sample_curvatures(loss_fn, params, dirs, batch, method="forward"), f"{name}: h")


@pytest.mark.parametrize("name", ["gpt2", "dcs-group-cnn"])
def test_jet_program_is_a_pure_function_of_its_tensors(name):
    """jet_derivatives traces with make_fx (no .item(), no branch on values) and the trace, replayed
    at other parameters and directions, gives what a fresh pass gives."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from symfast.curvature.exact import ExactMode
    from symfast.curvature.jets import jet_derivatives

    loss_fn, params, batch = MODELS[name]()
    exact = ExactMode("test", decompose_norms=True)

    def program(p, d):
        return jet_derivatives("test", loss_fn, p, d, batch, exact)

    traced = make_fx(program)(params, _directions(params, K=3))
    other_p = {k: v * 1.1 + 0.01 for k, v in params.items()}
    other_d = _directions(params, K=3, seed=9)
    for got, want in zip(traced(other_p, other_d), program(other_p, other_d)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_llama_building_its_mask_replays_each_branch_exactly(monkeypatch):
    """HF's mask construction reads the padding mask's values into Python (is it all ones?): each
    answer is a guard of the replayed graph, a batch with the other answer runs eagerly or gets its
    own graph, and every call gives the eager program's numbers."""
    from symfast.curvature import replay

    cache = replay.ReplayCache(trace_after=0)
    monkeypatch.setattr(replay, "_DEFAULT", cache)
    loss_fn, params, (ids, mask, attention) = llama(hf_mask=True)
    fn = replay.replayable(loss_fn)  # the model is not changed in this test: no state to declare
    dirs = _directions(params)
    full, padded = (ids, torch.ones_like(mask), attention), (ids, mask, attention)
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        for batch in (full, padded, full, padded, full, padded, full, padded, padded):
            got = per_sample_curvatures(fn, params, dirs, batch)
            paths.append(cache.info().last_path)
            want = per_sample_curvatures(loss_fn, params, dirs, batch)  # no state token: eager
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert paths[0] == "trace"
    # the first graph has not replayed yet: no second trace for this miss
    assert paths[1].startswith("eager: guard failed (value read into Python"), paths
    assert paths[2:] == ["replay", "trace"] + ["replay"] * 5  # alternating branches: no retrace
    info = cache.info()
    assert (info.traces, info.replays, info.guard_misses) == (2, 6, 2)
