"""Joined products (fusedproducts.py): a block's wq, wk, wv and its w1, w3 as one kernel call each. They give the
numbers of the layers one by one, bit for bit, and keep no second copy of the weights. They step aside for
adapters, gradients and re-stored layers."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, hf_model, ventoux_from_hf
from safetensors.torch import load_file, save_file

from ventoux import fusedproducts
from ventoux.api import load_model
from ventoux.cache import KVCache
from ventoux.fusedproducts import SharedInputProducts, joinable
from ventoux.lora import LoraConfig, add_adapter
from ventoux.model import Attention, FeedForward
from ventoux.qlinear import Int4Linear, Int6Linear, Int8Linear
from ventoux.weights import save_hf


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_hf(ventoux_from_hf(hf_model(TINY)), folder)
    return folder


@pytest.fixture
def joined_calls(monkeypatch):
    """Every call of a SharedInputProducts, by the sizes it splits into."""
    calls, call = [], SharedInputProducts.__call__
    monkeypatch.setattr(SharedInputProducts, "__call__",
                        lambda self, x: calls.append(tuple(self.sizes)) or call(self, x))
    return calls


def decode(model, steps=6):
    """Logits of a 12-token prefill and `steps` decode steps, for two rows at different positions."""
    tokens = torch.randint(0, TINY.vocab_size, (2, 12 + steps), generator=torch.Generator().manual_seed(3))
    cache = KVCache(TINY, 2, dtype=model.dtype, capacity=32)
    with torch.inference_mode():
        out = [model(tokens[:, :12], torch.arange(12).expand(2, 12), cache=cache)]
        for t in range(12, 12 + steps):
            out.append(model(tokens[:, t:t + 1], torch.tensor([[t], [t + 1]]), cache=cache))
    return torch.cat(out, 1)


def unjoin(model):
    for m in model.modules():
        if isinstance(m, Attention):
            m.joined_qkv = None
        elif isinstance(m, FeedForward):
            m.joined_gate_up = None


def storage_bytes(model) -> int:
    """The bytes of every distinct storage behind the model's buffers and parameters."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.buffers(), *model.parameters()]}
    return sum(storages.values())


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.bfloat16), ("int8-g32", torch.bfloat16),
                                          ("int4", torch.bfloat16), ("int4", torch.float16), ("int6", torch.bfloat16)])
def test_joined_products_give_the_layers_numbers_in_four_calls_a_block(kernel_isa, tiny_dir, scheme, dtype,
                                                                       joined_calls):
    model = load_model(tiny_dir, TINY, dtype, quantize=scheme)
    joined = decode(model)
    q, kv, hidden = TINY.n_heads * TINY.head_dim, TINY.n_kv_heads * TINY.head_dim, TINY.hidden_dim
    # the prefill and each of the 6 steps: one call for wq/wk/wv and one for w1/w3, per block
    assert joined_calls == 7 * TINY.n_layers * [(q, kv, kv), (hidden, hidden)]
    with torch.inference_mode():  # in the activations' dtype, as each layer's
        outputs = model.layers[0].attention.joined_qkv(torch.ones(1, TINY.dim, dtype=dtype))
    assert [y.dtype for y in outputs] == 3 * [dtype]
    unjoin(model)
    assert torch.equal(decode(model), joined)  # the same numbers as the layers one by one
    assert len(joined_calls) == 7 * 2 * TINY.n_layers + 1  # one direct call above, none once unjoined


@pytest.mark.parametrize("scheme", ["int4", "int8"])  # int8: one scale a row, an (N,) tensor
def test_joining_keeps_one_copy_of_the_weights_and_the_saved_tensors(kernel_isa, tiny_dir, tmp_path, monkeypatch,
                                                                     scheme):
    model = load_model(tiny_dir, TINY, torch.bfloat16, quantize=scheme)
    monkeypatch.setattr(fusedproducts, "fuse_shared_inputs", lambda m: m)
    alone = load_model(tiny_dir, TINY, torch.bfloat16, quantize=scheme)
    assert model.layers[0].attention.joined_qkv is not None and alone.layers[0].attention.joined_qkv is None
    # the joined tiles are the layers' storage: nothing is held twice (a scale tensor rounds up to 64 bytes)
    assert abs(storage_bytes(model) - storage_bytes(alone)) < 64 * 5 * TINY.n_layers
    # each layer's tiles are its own rows of the joined ones, no more (what the benchmarks count as bytes read)
    shapes = {name: b.shape for name, b in model.named_buffers()}
    assert shapes == {name: b.shape for name, b in alone.named_buffers()}
    wq = model.layers[0].attention.wq
    assert wq.qweight.untyped_storage().data_ptr() == model.layers[0].attention.joined_qkv.tiles[0].data_ptr()
    state, expected = model.state_dict(), alone.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    save_file(state, tmp_path / "joined.safetensors")  # the canonical tensors share no memory
    reloaded = load_file(tmp_path / "joined.safetensors")
    assert all(torch.equal(reloaded[k], expected[k]) for k in expected)


def test_an_adapter_on_a_joined_layer_runs_the_layers_one_by_one(kernel_isa, tiny_dir, joined_calls):
    model = load_model(tiny_dir, TINY, torch.bfloat16, quantize="int4")
    base = decode(model, steps=2)
    add_adapter(model, LoraConfig(rank=4, targets=("wq", "wv")), dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: give the adapters an effect
    joined_calls.clear()
    adapted = decode(model, steps=2)
    assert joined_calls == 3 * TINY.n_layers * [(TINY.hidden_dim, TINY.hidden_dim)]  # only w1/w3 still joined
    assert not torch.allclose(adapted, base, atol=1e-2)  # the adapters act: wq and wv did not run joined


def test_gradients_and_restored_layers_run_the_layers_one_by_one(kernel_isa, tiny_dir, joined_calls):
    model = load_model(tiny_dir, TINY, torch.float32, quantize="int8")
    attention = model.layers[0].attention
    x = torch.randn(1, 3, TINY.dim, requires_grad=True)
    q, k, v = attention.qkv(x)
    (q.sum() + k.sum() + v.sum()).backward()  # the input's gradient through the layers' own backward
    assert not joined_calls and x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(attention.qkv(x), (attention.wq(x), attention.wk(x),
                                                                        attention.wv(x))))
    assert joined_calls == [(TINY.n_heads * TINY.head_dim, *2 * [TINY.n_kv_heads * TINY.head_dim])]
    # a layer loaded again (load_state_dict re-stores its tiles): the joined call ends and frees its tiles
    attention.wk.load_state_dict(attention.wk.state_dict())
    with torch.no_grad():
        out = attention.qkv(x)
    assert len(joined_calls) == 1 and attention.joined_qkv.tiles is None
    with torch.no_grad():
        assert torch.equal(out[1], attention.wk(x))


def layer(cls, rows, group=32, kernel="vnni"):
    w = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
    return cls.from_float(w, group, kernel=kernel)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, Int6Linear])
def test_only_vnni_layers_of_one_kind_and_width_are_joined(kernel_isa, cls):
    assert joinable([layer(cls, 32), layer(cls, 16), layer(cls, 16)])
    other = Int4Linear if cls is Int8Linear else Int8Linear
    assert not joinable([layer(cls, 32), layer(other, 16)])  # two kinds of product
    assert not joinable([layer(other, 32), layer(cls, 16)])
    assert not joinable([layer(cls, 32), layer(cls, 16, group=64)])  # two group sizes
    assert not joinable([layer(cls, 32), layer(cls, 16, kernel="fallback")])  # a layer off the kernel
    assert not joinable([layer(cls, 32), layer(cls, 24)])  # rows that end inside a 16-row tile
    assert not joinable([torch.nn.Linear(128, 32), torch.nn.Linear(128, 16)])  # float layers: their own kernels
    wide = layer(cls, 16)
    wide.in_features = 100  # 100 inputs padded to 128: another width than 128 inputs
    assert not joinable([layer(cls, 32), wide])
