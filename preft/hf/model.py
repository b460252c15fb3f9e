"""Named adapters injected into a transformers causal LM, driven by a per-token ``adapter_mask``.

``PreftModel`` is used for training, evaluation and as the reference generator the serving
engine is tested against. It follows DESIGN §1:

- ``forward(..., adapter_mask=M)`` adapts token ``t`` of row ``b`` iff ``M[b, t] == 1``;
- without a mask it follows each row's policy: with an empty cache every real token is a
  prompt token and is adapted; with a non-empty cache (decode) only ``all``-policy rows are.

Rows of one batch may use different adapters (a multi-user training batch, a mixed reference
batch): every injected layer applies all of them in one grouped low-rank product, the engine's
PyTorch ``grouped_low_rank_reference`` (each adapter on its own tokens at its own rank), with autograd.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from preft.adapters import (
    Adapter,
    LoraConfig,
    ReftConfig,
    check_family,
    fingerprint,
    load_adapter,
    lora_key,
    parse_positions,
    reft_key,
    reft_position_mask,
    save_adapter,
)
from preft.adapters.base_model import check_config_fits
from preft.adapters.maths import direft_factors, loreft_factors
from preft.errors import PreftError, UnknownTargetModuleError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def cache_argument(model: nn.Module) -> str:
    """The name a transformers model's forward takes its KV cache under: ``cache`` from transformers 5.24
    on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return _cache_argument(type(model))


@functools.cache
def _cache_argument(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


@dataclass
class BatchAdapters:
    """Which adapter each row uses and where: shared by every injected layer during one forward."""

    row_adapter: list[str | None]
    adapter_mask: Tensor  # [B, T] float: 1 where the row's adapter acts
    _token_slots: dict = field(default_factory=dict, repr=False)  # computed once per forward, shared by the layers

    @property
    def names(self) -> set[str]:
        """The adapters some row of the batch uses."""
        return {a for a in self.row_adapter if a is not None}

    def mask_for(self, name: str) -> Tensor | None:
        """``[B, T]`` mask of the tokens adapted by ``name`` (None if no row uses it)."""
        rows = [a == name for a in self.row_adapter]
        if not any(rows):
            return None
        select = torch.tensor(rows, device=self.adapter_mask.device, dtype=self.adapter_mask.dtype)
        return self.adapter_mask * select[:, None]

    def token_slots(self, names: tuple[str, ...], positions: tuple[tuple[int, int] | None, ...] | None = None) -> Tensor | None:
        """``[B * T]``: for each token, the index in ``names`` of the adapter acting on it, or -1.

        The ``token_slot`` of the grouped low-rank product (``preft.engine.lowrank``). ``positions``
        (ReFT) restricts each adapter to its pyreft-style positions. None when no token is adapted.
        """
        key = (names, positions)
        if key not in self._token_slots:
            slot = torch.full((self.adapter_mask.numel(),), -1, dtype=torch.long, device=self.adapter_mask.device)
            for i, name in enumerate(names):
                mask = self.mask_for(name)
                if mask is None:
                    continue
                if positions is not None:
                    mask = reft_position_mask(mask, positions[i])
                slot = torch.where(mask.reshape(-1) > 0, i, slot)
            self._token_slots[key] = slot if bool((slot >= 0).any()) else None
        return self._token_slots[key]


def grouped_delta(
    x: Tensor,
    token_slot: Tensor,
    factors: list[tuple[Tensor, Tensor | None, Tensor]],
    scaling: list[float],
    dropouts: list[nn.Module],
) -> Tensor:
    """``[N, out]``: token ``n`` gets ``low_rank_delta`` of adapter ``token_slot[n]`` (0 where -1), with autograd.

    ``factors[i] = (down [r_i, in], bias [r_i] | None, up [out, r_i])``. One call of the engine's
    grouped product (``grouped_low_rank_reference``: each adapter on its own tokens at its own rank)
    per distinct dropout setting; the factors are stacked (zero-padded to the largest rank), so
    gradients reach every adapter's parameters.
    """
    # Imported here: preft.engine's sampler imports preft.hf, so a module-level import would be circular.
    from preft.engine.lowrank import grouped_low_rank_reference

    r_max = max(down.shape[0] for down, _, _ in factors)
    down = torch.stack([F.pad(d, (0, 0, 0, r_max - d.shape[0])) for d, _, _ in factors])
    up = torch.stack([F.pad(u, (0, r_max - u.shape[1])) for _, _, u in factors])
    bias = None if factors[0][1] is None else torch.stack([F.pad(b, (0, r_max - b.shape[0])) for _, b, _ in factors])
    ranks = [d.shape[0] for d, _, _ in factors]
    # Adapters with the same dropout share one dropped-out input (one call when, as usual, all do).
    groups: dict[tuple[float, bool], list[int]] = {}
    for i, dropout in enumerate(dropouts):
        groups.setdefault((float(getattr(dropout, "p", 0.0)), dropout.training), []).append(i)
    out = None
    for members in groups.values():
        slots = token_slot
        if len(groups) > 1:
            keep = torch.zeros(len(factors) + 1, dtype=torch.bool, device=token_slot.device)
            keep[torch.tensor(members, device=token_slot.device)] = True
            slots = torch.where(keep[token_slot], token_slot, -1)  # index -1 reads keep[-1] = False
        out = grouped_low_rank_reference(dropouts[members[0]](x), slots, down, up, bias, ranks, scaling, out=out)
    return out


class LoraWeights(nn.Module):
    def __init__(self, config: LoraConfig, fan_in: int, fan_out: int):
        super().__init__()
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.r, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, config.r))  # B = 0: the adapter starts as identity
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)  # PEFT's default init of A
        self.dropout = nn.Dropout(config.lora_dropout)


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus named LoRA adapters, each applied where the batch mask says."""

    def __init__(self, base: nn.Linear, batch: _BatchRef):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self._batch = batch

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        batch = self._batch.current
        if batch is None:
            return out
        names = tuple(n for n in self.adapters if n in batch.names)
        token_slot = batch.token_slots(names) if names else None
        if token_slot is None:
            return out
        weights = [self.adapters[n] for n in names]
        x = x.reshape(-1, x.shape[-1]).to(weights[0].lora_A.dtype)
        factors = [(w.lora_A, None, w.lora_B) for w in weights]
        delta = grouped_delta(x, token_slot, factors, [w.scaling for w in weights], [w.dropout for w in weights])
        return out + delta.view(out.shape).to(out.dtype)


def orthonormal_rows(basis: Tensor) -> Tensor:
    """The ``[r, d]`` matrix with orthonormal rows spanning ``basis``'s rows (QR, signs fixed).

    Used as LoReFT's parametrization of R instead of ``torch.nn.utils.parametrizations.orthogonal``:
    its Householder map reads signs from the raw diagonal with ``.int()``, so AdamW's weight decay
    (-1 -> -0.999) silently collapses R to zero; matrix_exp/cayley would build d x d matrices.
    """
    q, r = torch.linalg.qr(basis.t())
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).t()


class ReftEdit(nn.Module):
    """LoReFT or DiReFT weights for one decoder layer (R kept orthonormal by ``orthonormal_rows``)."""

    def __init__(self, config: ReftConfig, hidden: int):
        super().__init__()
        self.kind = config.kind
        self.source = nn.Linear(hidden, config.r)
        if config.kind == "loreft":
            self.rotate_basis = nn.Parameter(torch.empty(config.r, hidden))
            nn.init.orthogonal_(self.rotate_basis)
        else:
            self.proj = nn.Parameter(torch.empty(config.r, hidden))
            nn.init.kaiming_uniform_(self.proj, a=5**0.5)
        self.dropout = nn.Dropout(config.dropout)

    def rotate(self) -> Tensor:
        """LoReFT's R ``[r, d]``, rows orthonormal."""
        return orthonormal_rows(self.rotate_basis)

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.kind == "loreft":
            return loreft_factors(self.rotate(), self.source.weight, self.source.bias)
        return direft_factors(self.proj, self.source.weight, self.source.bias)


class _BatchRef:
    """Holds the current ``BatchAdapters``; kept after forward so gradient checkpointing can recompute."""

    current: BatchAdapters | None = None


class PreftModel(nn.Module):
    """A transformers causal LM with named prefill-only (or all-token) adapters.

    Base weights are frozen; adapter parameters are trainable. Rows of one batch may use
    different adapters or none (``adapter_names``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        check_family(model.config)
        self.model = model
        self.configs: dict[str, LoraConfig | ReftConfig] = {}
        self.reft = nn.ModuleDict()  # name -> ModuleDict(layer -> ReftEdit)
        self._batch = _BatchRef()
        self._lora_layers: dict[tuple[int, str], LoraLinear] = {}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(self.decoder_layers):
            layer.register_forward_hook(self._reft_hook(i))

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    # ---- adapters -------------------------------------------------------------------------

    def add_adapter(self, name: str, config: LoraConfig | ReftConfig | Adapter) -> None:
        """Add a new adapter (freshly initialised from a config, or with an ``Adapter``'s weights)."""
        if not ADAPTER_NAME.match(name):
            raise PreftError(f"adapter name {name!r} must use only letters, digits, '_' and '-'")
        if name in self.configs:
            raise PreftError(f"adapter {name!r} already exists; remove it first")
        adapter = config if isinstance(config, Adapter) else None
        config = adapter.config if adapter else config
        check_config_fits(config, self.config)  # layers and rank against this model, for a bare config too
        if adapter is not None:
            adapter.validate(self.config)
        ref = next(self.model.parameters())
        if isinstance(config, LoraConfig):
            layers = config.layers if config.layers is not None else range(len(self.decoder_layers))
            for i in layers:
                if not 0 <= i < len(self.decoder_layers):
                    raise PreftError(f"LoRA layer {i} is out of range: the model has {len(self.decoder_layers)} layers")
                for module in config.modules():
                    linear = self._lora_layer(i, module)
                    linear.adapters[name] = LoraWeights(config, linear.base.in_features, linear.base.out_features).to(ref.device)
        else:
            layers = config.layers if config.layers is not None else range(len(self.decoder_layers))
            hidden = self.config.hidden_size
            edits = nn.ModuleDict({str(i): ReftEdit(config, hidden) for i in layers}).to(ref.device)
            self.reft[name] = edits
        self.configs[name] = config
        if adapter is not None:
            self.set_adapter_weights(name, adapter)

    def _lora_layer(self, layer: int, module: str) -> LoraLinear:
        if (layer, module) in self._lora_layers:
            return self._lora_layers[(layer, module)]
        decoder = self.decoder_layers[layer]
        parent = decoder.self_attn if hasattr(decoder.self_attn, module) else decoder.mlp
        base = getattr(parent, module, None)
        if not isinstance(base, nn.Linear):
            raise UnknownTargetModuleError(f"layer {layer} has no linear module {module!r}")
        wrapped = LoraLinear(base, self._batch)
        setattr(parent, module, wrapped)
        self._lora_layers[(layer, module)] = wrapped
        return wrapped

    def remove_adapter(self, name: str) -> None:
        config = self.configs.pop(name)
        if isinstance(config, LoraConfig):
            for linear in self._lora_layers.values():
                if name in linear.adapters:  # nn.ModuleDict.pop takes no default
                    del linear.adapters[name]
        else:
            del self.reft[name]

    def set_adapter_weights(self, name: str, adapter: Adapter) -> None:
        """Copy ``adapter``'s weights into the adapter called ``name`` (same shapes)."""
        with torch.no_grad():
            if adapter.kind == "lora":
                for (layer, module), (a, b) in adapter.lora_weights().items():
                    w = self._lora_layers[(layer, module)].adapters[name]
                    w.lora_A.copy_(a)
                    w.lora_B.copy_(b)
            else:
                for layer_key, edit in self.reft[name].items():
                    t = lambda n, layer_key=layer_key: adapter.tensors[reft_key(int(layer_key), n)]  # noqa: E731
                    edit.source.weight.copy_(t("source.weight"))
                    edit.source.bias.copy_(t("source.bias"))
                    if edit.kind == "loreft":
                        edit.rotate_basis.copy_(t("rotate"))
                    else:
                        edit.proj.copy_(t("proj"))

    def get_adapter(self, name: str) -> Adapter:
        """The adapter ``name`` as a runtime-independent ``Adapter`` (detached CPU copies)."""
        config = self.configs[name]
        tensors = {}
        if isinstance(config, LoraConfig):
            for (layer, module), linear in self._lora_layers.items():
                if name in linear.adapters:
                    w = linear.adapters[name]
                    tensors[lora_key(layer, module, "A")] = w.lora_A.detach().cpu().clone()
                    tensors[lora_key(layer, module, "B")] = w.lora_B.detach().cpu().clone()
        else:
            for layer_key, edit in self.reft[name].items():
                layer = int(layer_key)
                tensors[reft_key(layer, "source.weight")] = edit.source.weight.detach().cpu().clone()
                tensors[reft_key(layer, "source.bias")] = edit.source.bias.detach().cpu().clone()
                if edit.kind == "loreft":
                    tensors[reft_key(layer, "rotate")] = edit.rotate().detach().cpu().clone()
                else:
                    tensors[reft_key(layer, "proj")] = edit.proj.detach().cpu().clone()
        name_or_path = getattr(self.config, "_name_or_path", None)
        return Adapter(config, tensors, fingerprint(self.config), meta={"base_model_name_or_path": name_or_path})

    def save_adapter(self, name: str, path: str) -> None:
        save_adapter(self.get_adapter(name), path)

    def load_adapter(self, path: str, name: str, policy: str | None = None) -> Adapter:
        """Load an adapter directory (preft or PEFT layout) as ``name``; checks it fits this model."""
        adapter = load_adapter(path, policy=policy, model_config=self.config)
        self.add_adapter(name, adapter)
        return adapter

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Trainable parameters of one adapter (or of all)."""
        names = [name] if name else list(self.configs)
        params = []
        for n in names:
            if isinstance(self.configs[n], LoraConfig):
                params += [p for linear in self._lora_layers.values() if n in linear.adapters for p in linear.adapters[n].parameters()]
            else:
                params += list(self.reft[n].parameters())
        return params

    # ---- forward --------------------------------------------------------------------------

    def policy_mask(self, row_adapter: list[str | None], new_attention_mask: Tensor, past_length: int) -> Tensor:
        """The adapter mask the policy implies for the new tokens (DESIGN §1).

        With an empty cache (``past_length == 0``) every real token is a prompt token and is
        adapted. With a cache, only rows whose adapter has policy ``all`` are adapted.
        """
        new = new_attention_mask.float()
        if past_length == 0:
            return new
        all_rows = torch.tensor(
            [a is not None and self.configs[a].policy == "all" for a in row_adapter], dtype=new.dtype, device=new.device
        )
        return new * all_rows[:, None]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        adapter_mask: Tensor | None = None,
        adapter_names: str | list[str | None] | None = None,
        past_key_values: Any = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model with adapters.

        ``adapter_names``: one name for every row, a list with one entry per row (``None`` for
        the base model), or None (no adapter). ``adapter_mask [B, T_new]``: 1 where the row's
        adapter acts; when omitted, the policy rule of ``policy_mask`` applies.
        ``attention_mask`` covers past and new tokens (transformers' convention).
        ``past_key_values`` and ``cache`` are the same KV cache (transformers >= 5.24 renamed it).
        """
        if cache is not None and past_key_values is not None:
            raise PreftError("pass the KV cache as past_key_values or cache, not both")
        past_key_values = cache if cache is not None else past_key_values
        bsz, new_len = input_ids.shape
        row_adapter = self._row_adapters(adapter_names, bsz)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(bsz, past_length + new_len, dtype=torch.long, device=input_ids.device)
        if adapter_mask is None:
            adapter_mask = self.policy_mask(row_adapter, attention_mask[:, -new_len:], past_length)
        elif adapter_mask.shape != (bsz, new_len):
            raise PreftError(f"adapter_mask has shape {tuple(adapter_mask.shape)}, expected {(bsz, new_len)}")
        if position_ids is None:
            # Left padding: positions count real tokens only, as in an unpadded forward.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_len:]
        self._batch.current = BatchAdapters(row_adapter, adapter_mask.float() * attention_mask[:, -new_len:].float())
        if past_key_values is not None:
            kwargs[cache_argument(self.model)] = past_key_values
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def _row_adapters(self, adapter_names: str | list[str | None] | None, bsz: int) -> list[str | None]:
        if adapter_names is None or isinstance(adapter_names, str):
            rows = [adapter_names] * bsz
        else:
            rows = list(adapter_names)
            if len(rows) != bsz:
                raise PreftError(f"adapter_names has {len(rows)} entries for a batch of {bsz} rows")
        for name in rows:
            if name is not None and name not in self.configs:
                raise PreftError(f"unknown adapter {name!r}; known: {sorted(self.configs)}")
        return rows

    def _reft_hook(self, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            batch = self._batch.current
            if batch is None or not len(self.reft):
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            names = tuple(n for n, edits in self.reft.items() if n in batch.names and str(layer) in edits)
            positions = tuple(parse_positions(self.configs[n].positions) for n in names)
            token_slot = batch.token_slots(names, positions) if names else None
            if token_slot is None:
                return output
            edits = [self.reft[n][str(layer)] for n in names]
            factors = [edit.factors() for edit in edits]
            flat = hidden.reshape(-1, hidden.shape[-1]).to(factors[0][0].dtype)
            delta = grouped_delta(flat, token_slot, factors, [1.0] * len(edits), [edit.dropout for edit in edits])
            hidden = hidden + delta.view(hidden.shape).to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook
