"""LoRA adapters swapped into a loaded model: several per base, chosen per row of a batch, merged on demand.

    add_adapter(model, LoraConfig(rank=16, alpha=32))       # fresh: A kaiming-uniform, B zeros (changes nothing)
    opt = torch.optim.AdamW(trainable_parameters(model))     # the base is frozen: only adapter tensors train
    torch.save(lora_state_dict(model), "step.pt"); load_lora_state_dict(model, torch.load("step.pt"))
    lora_files.save_adapter(model, "out/adapter", base_model_name_or_path="mistralai/Mistral-7B-v0.3")  # PEFT's
    lora_files.load_adapter(model, "out/adapter", name="math")   # a PEFT folder or mistral-finetune's file
    set_rows(model, ["math", None, -1])   # per row of the next forwards: a name (or its index), None for the
                                          # active adapters, -1 for the base alone
    set_active(model, "math")     # the active adapters: what training and a one-adapter load use
    merge(model)                  # fold the one adapter into float base weights and unswap the layers

A LoRA layer wraps its base linear whatever it is (nn.Linear, fastlinear.HalfLinear, qlinear's int8/int4: the
QLoRA case, gradients reach the input through frozen.py) and adds scaling * B(A(dropout(x))) for the adapters
that apply to each row. Adapter tensors live in float32 by default (as PEFT's autocast_adapter_dtype) whatever
the base's dtype. ventoux's wq/wk rows are in HF's rotary layout, so PEFT's B matrices load as they are, and
mistral-finetune's (consolidated layout) are permuted like the base weights (names.interleaved_to_halves);
lora_files.py reads both formats and writes PEFT's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import VentouxError

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # mistral-finetune's default: every block linear
_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
_TARGET_RE = re.compile(r"^layers\.\d+\.(attention|feed_forward)\.(w[qkvo123])$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def check(self) -> LoraConfig:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise VentouxError(f"LoRA rank must be a positive integer, not {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise VentouxError(f"LoRA dropout must be in [0, 1), not {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise VentouxError(f"LoRA targets {list(self.targets)} must be among {', '.join(TARGETS)}")
        return self


class Adapter(nn.Module):
    """One adapter of one linear: delta(x) = scaling * B(A(dropout(x))), A (rank, in), B (out, rank)."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.lora_A, self.lora_B = nn.Parameter(lora_A), nn.Parameter(lora_B)
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not (self.training and isinstance(self.dropout, nn.Dropout)):
            return _LowRank.apply(x, self.lora_A, self.lora_B, self.scaling)
        x = self.dropout(x.to(self.lora_A.dtype))
        return (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32, whatever the adapter's dtype (merge rounds it once, with the weight)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


BLOCK = 1 << 22  # float32 values in one of _LowRank's temporaries (16 MB)


def _blocks(n: int, width: int) -> list[slice]:
    """Slices of n rows (or columns) of `width` values each, BLOCK values a slice."""
    step = max(1, BLOCK // width)
    return [slice(i, i + step) for i in range(0, n, step)]


class _LowRank(torch.autograd.Function):
    """(x @ A^T @ B^T) * scaling in A and B's dtype, rounded to x's, with autograd's arithmetic in training, but
    lighter: it keeps x as it comes (bf16), not its float32 copy (PEFT's way keeps one per adapter: wq, wk and wv
    each copy theirs, as much as the block's other activations), and it makes the float32 copies of x, of the
    output and of their gradients a block of rows or columns at a time, never whole (117 MB for 2048 tokens of
    14336). Each block is a whole row or column of its product's sums, so the numbers are the unblocked ones."""

    @staticmethod
    def forward(ctx, x, a, b, scaling):
        xs = x.flatten(0, -2)
        with torch.autocast(x.device.type, enabled=False):  # under --bf16 too: h in A's dtype, as backward uses it
            h = torch.cat([xs[r].to(a.dtype) @ a.T for r in _blocks(xs.shape[0], xs.shape[1])])  # (tokens, rank)
            y = xs.new_empty(xs.shape[0], b.shape[0])
            for r in _blocks(y.shape[0], y.shape[1]):
                y[r] = (h[r] @ b.T).mul_(scaling)  # rounded to x's dtype on the copy
        ctx.save_for_backward(x, h, a, b)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, h, a, b = ctx.saved_tensors
        xs, dy, s = x.flatten(0, -2), dy.flatten(0, -2), ctx.scaling
        tokens, width, out = xs.shape[0], xs.shape[1], dy.shape[1]
        # dz = dy * scaling in float32 (made a block at a time); dh = dz @ B (tokens, rank)
        dh = torch.cat([(dy[r].to(b.dtype) * s) @ b for r in _blocks(tokens, out)])
        db = da = dx = None
        if ctx.needs_input_grad[2]:  # dB = dz^T @ h, by columns of dz (sums over tokens)
            db = torch.cat([(dy[:, c].to(b.dtype) * s).T @ h for c in _blocks(out, tokens)])
        if ctx.needs_input_grad[1]:  # dA = dh^T @ x, by columns of x
            da = torch.cat([dh.T @ xs[:, c].to(a.dtype) for c in _blocks(width, tokens)], dim=1)
        shape, dtype = x.shape, x.dtype
        del x, xs  # a remade input (model.remade_in_backward) goes before dx comes: one such tensor fewer at once
        if ctx.needs_input_grad[0]:  # dx = dh @ A by rows, rounded to x's dtype
            dx = dh.new_empty(tokens, width, dtype=dtype)
            for r in _blocks(tokens, width):
                dx[r] = dh[r] @ a
            dx = dx.view(shape)
        return dx, da, db, None


class Selection:
    """Which adapters the next forwards apply, shared by every LoRA layer of one model.

    names: the adapters in index order; groups: (name, row indices, or None for every row) pairs, from
    set_rows (rows None: the active adapters on every row); batch: the row count set_rows was given."""

    def __init__(self):
        self.names: list[str] = []
        self.active: list[str] = []
        self.groups: list[tuple[str, torch.Tensor | None]] = []
        self.batch: int | None = None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, selection: Selection):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        sel = self.selection
        if sel.batch is not None and x.shape[0] != sel.batch:
            raise VentouxError(f"lora.set_rows was given {sel.batch} rows but the forward has {x.shape[0]}; "
                               "call set_rows before each forward with one entry per row")
        for name, rows in sel.groups:
            if name not in self.adapters:
                continue  # this adapter does not target this layer
            adapter = self.adapters[name]
            if rows is None:
                y = y + adapter(x).to(y.dtype)
            else:
                y = y.index_add(0, rows, adapter(x.index_select(0, rows)).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: rank {a.rank}, scaling {a.scaling:g}" for n, a in self.adapters.items())


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _selection(model: nn.Module) -> Selection | None:
    """The model's Selection (install puts it on the model too: set_rows runs before every forward)."""
    return getattr(model, "lora_selection", None)


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters of the model in index order (the numbers set_rows takes)."""
    sel = _selection(model)
    return list(sel.names) if sel else []


def _device(module: nn.Module) -> torch.device:
    return next(t for t in [*module.parameters(), *module.buffers()]).device


def install(model: nn.Module, name: str, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
            scaling: float | dict[str, float], dropout: float = 0.0, activate: bool = True,
            dtype: torch.dtype = torch.float32) -> nn.Module:
    """Add adapter `name` with the given (A, B) per target module (ventoux names: layers.0.attention.wq),
    swapping LoRA layers in where needed and freezing every other tensor of the model."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise VentouxError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    if hasattr(nn.ModuleDict(), name):  # each layer keeps its adapters in a ModuleDict, keyed by name
        raise VentouxError(f"adapter name {name!r} is taken by PyTorch (a module attribute): choose another name")
    if name in adapter_names(model):
        raise VentouxError(f"the model already has an adapter called {name!r}; choose another name")
    sel = _selection(model) or Selection()
    for module_name, (a, b) in tensors.items():
        if not _TARGET_RE.match(module_name):
            raise VentouxError(f"adapter {name!r} targets {module_name!r}: LoRA applies only to the block "
                               f"linears {', '.join(TARGETS)} (never embeddings or the output head)")
        try:
            layer = model.get_submodule(module_name)
        except AttributeError:
            raise VentouxError(f"adapter {name!r} targets {module_name!r}, which this model does not have "
                               "(the adapter was made for a deeper model)") from None
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer, sel)
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        if a.dim() != 2 or (*a.shape, *b.shape) != (a.shape[0], layer.in_features, layer.out_features, a.shape[0]):
            raise VentouxError(f"adapter {name!r} for {module_name} has A {list(a.shape)} and B {list(b.shape)}, "
                               f"but the model's layer is {layer.out_features}x{layer.in_features}: the adapter "
                               "was made for another model")
        device = _device(layer.base)
        s = scaling[module_name] if isinstance(scaling, dict) else scaling
        layer.adapters[name] = Adapter(a.to(device, dtype), b.to(device, dtype), s, dropout)
    for n, p in model.named_parameters():  # the base is frozen; adapters train
        p.requires_grad_(".adapters." in n)
    model.lora_selection = sel  # a plain attribute (not a module): found without walking the modules
    sel.names.append(name)
    if activate:
        sel.active = [name]
    set_rows(model, None)
    return model


def add_adapter(model: nn.Module, config: LoraConfig = LoraConfig(), name: str = "default", activate: bool = True,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh adapter on config.targets of every block: A kaiming-uniform (as PEFT), B zeros."""
    config.check()
    tensors = {}
    for layer in range(len(model.layers)):
        for target in config.targets:
            module_name = f"layers.{layer}.{_PARENT[target]}.{target}"
            base = model.get_submodule(module_name)
            a = torch.empty(config.rank, base.in_features)  # drawn in float32; install casts to dtype
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            tensors[module_name] = (a, torch.zeros(base.out_features, config.rank))
    return install(model, name, tensors, config.scaling, config.dropout, activate, dtype)


def check_adapter(model: nn.Module, name: str | None) -> None:
    """Raise VentouxError unless `name` is None or one of the model's adapters (for a request's adapter)."""
    if name is not None and name not in adapter_names(model):
        raise VentouxError(f"unknown adapter {name!r}; this model has {adapter_names(model) or 'no adapters'} "
                           "(load them with ventoux.load(..., lora={name: path}))")


def set_active(model: nn.Module, names: str | list[str] | None) -> None:
    """Apply these adapters (None or []: none) to every row whose choice is None (and to every row after
    set_rows(model, None)): what training and a one-adapter load use."""
    names = [names] if isinstance(names, str) else list(names or [])
    for name in names:
        check_adapter(model, name)
    sel = _selection(model)
    if sel is not None:
        sel.active = names
        set_rows(model, None)


def set_rows(model: nn.Module, rows: list[str | int | None] | torch.Tensor | None) -> None:
    """Choose each row's adapter for the next forwards (call it before each forward whose rows differ).
    rows[i]: an adapter name, its index in adapter_names(model), -1 for the base alone, or None for the active
    adapters (set_active; what load(lora=path) turns on). rows None: the active adapters on every row."""
    sel = _selection(model)
    if sel is None:  # no adapters: a row may only ask for none
        for r in [] if rows is None else list(rows):
            if isinstance(r, str):
                check_adapter(model, r)
            elif r is not None and int(r) != -1:
                raise VentouxError(f"adapter index {int(r)} is out of range: this model has no adapters")
        return
    if rows is None:
        sel.groups, sel.batch = [(n, None) for n in sel.active], None
        return
    chosen = [_chosen(sel, r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
    device = next(iter(model.parameters())).device
    sel.groups = []
    for name in sel.names:
        picked = [i for i, names in enumerate(chosen) if name in names]
        if len(picked) == len(chosen):
            sel.groups.append((name, None))  # every row: no gather
        elif picked:
            sel.groups.append((name, torch.tensor(picked, device=device)))
    # row indices only fit forwards of this many rows; a choice the same for every row fits any batch
    sel.batch = len(chosen) if any(rows is not None for _, rows in sel.groups) else None


def _chosen(sel: Selection, row: str | int | None) -> list[str]:
    if row is None:
        return sel.active
    if isinstance(row, str):
        if row not in sel.names:
            raise VentouxError(f"unknown adapter {row!r}; this model has {sel.names}")
        return [row]
    if not -1 <= int(row) < len(sel.names):
        raise VentouxError(f"adapter index {int(row)} is out of range: this model has {len(sel.names)} "
                           f"adapter(s) {sel.names} (-1: the base alone)")
    return [] if int(row) == -1 else [sel.names[int(row)]]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors an optimizer should hold: those that need a gradient (the adapters, after add_adapter)."""
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors (all adapters, or just `name`) under the model's own names, e.g.
    layers.0.attention.wq.adapters.default.lora_A: what a training checkpoint needs, not the frozen base."""
    marker = ".adapters." + (f"{name}." if name else "")  # parameters, not state_dict(): a packed base unpacks
    return {k: p.detach() for k, p in model.named_parameters() if marker in k}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put lora_state_dict's tensors back (the adapters must already be added, with the same shapes)."""
    own = lora_state_dict(model)
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise VentouxError(f"the adapter state does not match the model's adapters (missing {missing[:2]}, "
                           f"unexpected {extra[:2]}); was it saved with other --rank/--targets?")
    for key, t in state.items():
        if t.shape != own[key].shape:
            raise VentouxError(f"adapter tensor {key} is {list(t.shape)}, the model's is {list(own[key].shape)}")
    model.load_state_dict(state, strict=False)


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter `name` (default: the only one) into the base weights, in place, and unswap every LoRA
    layer (other adapters are dropped). The bases must be float linears: a quantized weight cannot absorb it."""
    names = adapter_names(model)
    if name is None:
        if len(names) > 1:
            raise VentouxError(f"the model has several adapters {names}: say which one to merge")
        name = names[0] if names else None
    elif name not in names:
        raise VentouxError(f"unknown adapter {name!r}; this model has {names or 'none'}")
    for module_name, layer in lora_layers(model).items():
        if name in layer.adapters:
            if not isinstance(layer.base, nn.Linear):
                raise VentouxError(f"cannot merge into {module_name}: its base is {type(layer.base).__name__}; "
                                   "load the base model unquantized to merge an adapter")
            w = layer.base.weight
            with torch.no_grad():  # summed in float32, rounded once to the weight's dtype
                w.copy_(w.float() + layer.adapters[name].delta_weight().to(w.device))
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    model.__dict__.pop("lora_selection", None)
    return model

