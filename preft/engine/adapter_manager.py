"""Adapters from disk to host memory to device slots, and the per-step view the model applies.

- Registry: every added adapter (validated against the base model at ``add`` time).
- Host LRU: up to ``max_cpu_adapters`` adapters loaded from disk are kept in host memory; an
  evicted one is read from disk again when needed. Adapters given as objects stay pinned.
- Device slots: ``max_adapter_slots`` rows of stacked tensors, per ``(layer, module)`` for LoRA
  and per layer for ReFT: ``down [S, R, in]``, ``up [S, out, R]``, ``bias [S, R]``, ``ranks [S]``,
  ``scaling [S]``, fed to ``grouped_low_rank``. A slot is reference-counted by the sequences
  that use it; an idle slot keeps its adapter until another adapter needs the room (LRU).
- Layout version: ``layout_version`` counts every (re)allocation of stack tensors (a new stack,
  a stack widened for a larger rank). CUDA graphs that captured the stacks' addresses compare it
  before replaying (``preft.engine.cuda_graphs``); writes into existing stacks do not change it.

``AdapterBatch`` is what the model sees during one step: which slot each token uses.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from preft.adapters import Adapter, LoraConfig, linear_shapes, load_adapter
from preft.engine.lowrank import grouped_low_rank, segment_plan
from preft.engine.parallel import shard_lora, shard_shapes
from preft.engine.sequence import AdapterRef
from preft.errors import PreftError
from preft.hf.generate import device_tensor


class UnknownAdapterError(PreftError):
    """A request or call names an adapter that is not registered."""


class AdapterChangedError(PreftError):
    """An adapter evicted from the host cache cannot be re-read as it was added (files changed or deleted)."""


class AdapterInUseError(PreftError):
    """An adapter cannot be removed while requests use it."""


@dataclass
class AdapterInfo:
    name: str
    kind: str
    policy: str
    rank: int
    path: str | None


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter ready to register: validated, on the CPU in the engine's dtype, hashed (``AdapterManager.prepare``)."""

    adapter: Adapter
    path: str | None  # the folder it was read from (None: held in memory only)
    content_hash: str


@dataclass
class _Entry:
    info: AdapterInfo
    ref: AdapterRef
    pinned: Adapter | None  # adapters registered as objects cannot be re-read from disk


def adapter_bytes(adapter: Adapter) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.tensors.values())


class SlotStack:
    """Stacked low-rank factors of every slot for one insertion point (a LoRA module or a ReFT layer)."""

    def __init__(
        self,
        num_slots: int,
        fan_in: int,
        fan_out: int,
        rank: int,
        with_bias: bool,
        device: torch.device,
        dtype: torch.dtype,
        on_realloc: Callable[[], None] | None = None,
    ):
        self.on_realloc = on_realloc  # told whenever the tensors below are replaced (their addresses change)
        self.down = torch.zeros(num_slots, rank, fan_in, device=device, dtype=dtype)
        self.up = torch.zeros(num_slots, fan_out, rank, device=device, dtype=dtype)
        self.bias = torch.zeros(num_slots, rank, device=device, dtype=dtype) if with_bias else None
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.scaling = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.host_ranks = [0] * num_slots  # host copy: lets a step skip stacks its slots do not use, without a sync

    @property
    def max_rank(self) -> int:
        return self.down.shape[1]

    def grow(self, rank: int) -> None:
        """Widen to ``rank`` (zero padded); slots keep their factors."""
        pad = rank - self.max_rank
        self.down = torch.cat([self.down, self.down.new_zeros(self.down.shape[0], pad, self.down.shape[2])], dim=1)
        self.up = torch.cat([self.up, self.up.new_zeros(self.up.shape[0], self.up.shape[1], pad)], dim=2)
        if self.bias is not None:
            self.bias = torch.cat([self.bias, self.bias.new_zeros(self.bias.shape[0], pad)], dim=1)
        if self.on_realloc is not None:
            self.on_realloc()

    def clear(self, slot: int) -> None:
        self.down[slot].zero_()
        self.up[slot].zero_()
        if self.bias is not None:
            self.bias[slot].zero_()
        self.ranks[slot] = 0
        self.host_ranks[slot] = 0

    def set(self, slot: int, down: Tensor, up: Tensor, bias: Tensor | None, scaling: float) -> None:
        r = down.shape[0]
        if r > self.max_rank:
            self.grow(r)
        self.clear(slot)
        self.down[slot, :r] = down
        self.up[slot, :, :r] = up
        if bias is not None:
            self.bias[slot, :r] = bias
        self.ranks[slot] = r
        self.scaling[slot] = scaling
        self.host_ranks[slot] = r


class AdapterManager:
    def __init__(
        self,
        model_config,
        device: torch.device,
        dtype: torch.dtype,
        max_adapter_slots: int = 8,
        max_cpu_adapters: int = 64,
        max_cpu_adapter_bytes: int = 4 << 30,
        tensor_parallel: tuple[int, int] = (0, 1),
        max_rank: int | None = None,
    ):
        """``tensor_parallel``: ``(rank, size)``; the slot stacks then hold this rank's shard of each LoRA
        (``preft.engine.parallel.shard_lora``). ``max_rank``: adapters of a higher rank are refused (None: any)."""
        if max_adapter_slots < 1:
            raise PreftError(f"max_adapter_slots must be >= 1, got {max_adapter_slots}")
        if max_rank is not None and max_rank < 1:
            raise PreftError(f"max_lora_rank must be >= 1, got {max_rank}")
        self.max_rank = max_rank
        self.model_config = model_config
        self.device, self.dtype = device, dtype
        self.num_slots = max_adapter_slots
        self.max_cpu_adapters = max_cpu_adapters
        self.max_cpu_adapter_bytes = max_cpu_adapter_bytes
        self.host_bytes = 0  # bytes of the adapters in ``host`` (pinned adapters are not counted: they cannot leave)
        self.entries: dict[str, _Entry] = {}
        self.users: dict[str, set[str]] = {}  # adapter name -> ids of the requests that use it
        self.pending_removal: set[str] = set()  # removed while in use: gone when its last request ends
        self.host: OrderedDict[str, Adapter] = OrderedDict()
        self.slot_owner: list[str | None] = [None] * max_adapter_slots
        self.slot_refs = [0] * max_adapter_slots
        self.slot_of: dict[str, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # loaded slots with no user, least recently used first
        self.lora_stacks: dict[tuple[int, str], SlotStack] = {}
        self.reft_stacks: dict[int, SlotStack] = {}
        self.tp_rank, self.tp_size = tensor_parallel
        self.shapes = shard_shapes(linear_shapes(model_config), self.tp_size)
        self.slot_events: list[tuple] | None = None  # tensor parallel, rank 0: slot changes the workers have yet to mirror
        self.cpu_hits = self.cpu_misses = 0
        self.layout_version = 0  # bumped whenever a stack is created or reallocated (see module doc)

    def _layout_changed(self) -> None:
        self.layout_version += 1

    # ---- registry ----------------------------------------------------------------------------

    def prepare(
        self, source: str | os.PathLike | Adapter, policy: str | None = None, path: str | os.PathLike | None = None
    ) -> PreparedAdapter:
        """Read (from a folder), validate against the base model, convert to the engine's dtype and hash an adapter.

        Touches no state of the manager, so it may run on any thread: a server prepares adapters off the
        engine thread and ``add`` then only registers them."""
        if isinstance(source, Adapter):
            adapter, path = source.with_policy(policy), None if path is None else str(path)
            adapter.validate(self.model_config)
        else:
            path = str(source)
            adapter = load_adapter(path, policy=policy, model_config=self.model_config)
        adapter = adapter.to("cpu", self.dtype)
        return PreparedAdapter(adapter, path, adapter.content_hash())

    def add(
        self,
        name: str,
        source: str | os.PathLike | Adapter | PreparedAdapter,
        policy: str | None = None,
        path: str | os.PathLike | None = None,
    ) -> AdapterInfo:
        """Register ``name`` from a directory, an ``Adapter`` or a ``PreparedAdapter``; validated against the base model.

        An ``Adapter`` stays pinned in host memory, unless ``path`` names the folder it was read from: then
        it is cached like one read here, and re-read (its content hash checked) after an eviction."""
        if name in self.entries:
            raise PreftError(f"adapter {name!r} is already registered; remove it first or pick another name")
        prepared = source if isinstance(source, PreparedAdapter) else self.prepare(source, policy, path)
        adapter, path = prepared.adapter, prepared.path
        if self.max_rank is not None and adapter.rank > self.max_rank:
            raise PreftError(
                f"adapter {name!r} has rank {adapter.rank} > --max-lora-rank {self.max_rank}; raise --max-lora-rank (max_lora_rank) "
                "to serve it (the KV-cache profile reserves adapter slots of that rank)"
            )
        info = AdapterInfo(name, adapter.kind, adapter.policy, adapter.rank, path)
        ref = AdapterRef(name, adapter.kind, adapter.policy, prepared.content_hash, adapter.positions())
        self.entries[name] = _Entry(info, ref, adapter if path is None else None)
        if path is not None:
            self._host_put(name, adapter)
        return info

    # ---- lifecycle: requests use an adapter; one in use is removed when its last request ends --------

    def use(self, name: str, request_id: str) -> AdapterRef:
        """Record that ``request_id`` uses ``name`` (until ``done``); an adapter being removed takes no new requests."""
        if name in self.pending_removal:
            raise PreftError(f"adapter {name!r} is being removed; it takes no new requests")
        ref = self.get(name).ref
        self.users.setdefault(name, set()).add(request_id)
        return ref

    def done(self, name: str, request_id: str) -> None:
        """``request_id`` ended; if it was the last user of an adapter waiting for removal, remove that adapter now."""
        users = self.users.get(name)
        if users is not None:
            users.discard(request_id)
            if not users:
                del self.users[name]
        if name in self.pending_removal and name not in self.users:
            self.pending_removal.discard(name)
            self._unregister(name)

    def remove(self, name: str, wait: bool = False) -> None:
        """Unregister ``name``. In use: raise ``AdapterInUseError`` naming the requests, or with ``wait=True``
        refuse new requests for it and remove it when its last request ends (``done``)."""
        self.get(name)
        users = sorted(self.users.get(name, ()))
        if not users:
            self.pending_removal.discard(name)
            self._unregister(name)
        elif wait:
            self.pending_removal.add(name)
        else:
            raise AdapterInUseError(f"adapter {name!r} is in use by request(s) {users}; abort them or remove with wait=True")

    def _unregister(self, name: str) -> None:
        """Drop ``name`` from the registry, the host cache and its device slot (no request may use it)."""
        self.get(name)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            assert self.slot_refs[slot] == 0, f"adapter {name!r} removed while slot {slot} is in use"
            self.idle.pop(slot, None)
            self._clear_slot(slot)
        self._host_drop(name)
        del self.entries[name]

    def get(self, name: str) -> _Entry:
        if name not in self.entries:
            known = sorted(self.entries)
            shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
            raise UnknownAdapterError(f"unknown adapter {name!r}; registered: [{shown}] (add it with add_adapter first)")
        return self.entries[name]

    def list(self) -> list[AdapterInfo]:
        """Registered adapters that take requests (not those waiting for removal)."""
        return [e.info for name, e in self.entries.items() if name not in self.pending_removal]

    def _host_put(self, name: str, adapter: Adapter) -> None:
        """Cache ``adapter``; the least recently used leave while the cache holds more than its count or bytes
        (the newest always stays: it is about to be used)."""
        self._host_drop(name)
        self.host[name] = adapter
        self.host_bytes += adapter_bytes(adapter)
        while len(self.host) > 1 and (len(self.host) > self.max_cpu_adapters or self.host_bytes > self.max_cpu_adapter_bytes):
            self._host_drop(next(iter(self.host)))

    def _host_drop(self, name: str) -> None:
        adapter = self.host.pop(name, None)
        if adapter is not None:
            self.host_bytes -= adapter_bytes(adapter)

    def _host_get(self, name: str) -> Adapter:
        entry = self.entries[name]
        if entry.pinned is not None:
            self.cpu_hits += 1
            return entry.pinned
        if name in self.host:
            self.cpu_hits += 1
            self.host.move_to_end(name)
            return self.host[name]
        self.cpu_misses += 1
        adapter = self._read_back(entry)
        self._host_put(name, adapter)
        return adapter

    def _read_back(self, entry: _Entry) -> Adapter:
        """An evicted adapter read again from its folder; ``AdapterChangedError`` unless it is what was added."""
        name = entry.info.name
        try:
            adapter = load_adapter(entry.info.path, policy=entry.info.policy, model_config=self.model_config).to("cpu", self.dtype)
        except (PreftError, OSError) as e:
            raise AdapterChangedError(f"adapter {name!r} can no longer be read from disk ({type(e).__name__}); add it again") from e
        if adapter.content_hash() != entry.ref.content_hash:
            raise AdapterChangedError(f"adapter {name!r} changed on disk since it was added; add it again")
        return adapter

    def read_evicted(self, name: str) -> Adapter | None:
        """``name`` read back from disk if it has left host memory, else None. Changes no state, so a server
        calls it off the engine thread before a request and hands the result to ``restore``: the engine
        thread then never waits on a disk. Raises ``AdapterChangedError`` as a slot load would."""
        entry = self.entries.get(name)
        if entry is None or entry.pinned is not None or name in self.host:
            return None
        return self._read_back(entry)

    def restore(self, name: str, adapter: Adapter) -> None:
        """Put an adapter from ``read_evicted`` back in host memory (unless it was removed or came back meanwhile)."""
        if name in self.entries and name not in self.host:
            self._host_put(name, adapter)

    # ---- device slots ------------------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        return sum(1 for refs in self.slot_refs if refs > 0)

    def acquire(self, name: str) -> int | None:
        """A device slot holding ``name`` with one more user, or None when every slot is busy."""
        slot = self.slot_of.get(name)
        if slot is None:
            empty = [s for s, owner in enumerate(self.slot_owner) if owner is None]
            if empty:
                slot = empty[0]
            elif self.idle:
                slot, _ = self.idle.popitem(last=False)
                del self.slot_of[self.slot_owner[slot]]
                self._clear_slot(slot)
            else:
                return None
            try:
                self._load_slot(slot, name)
            except Exception:
                self._clear_slot(slot)  # a half-written slot must not leak factors into its next adapter
                raise
        self.idle.pop(slot, None)
        self.slot_refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.slot_refs[slot] -= 1
        assert self.slot_refs[slot] >= 0, f"adapter slot {slot} released twice"
        if self.slot_refs[slot] == 0:
            self.idle[slot] = None

    def _clear_slot(self, slot: int) -> None:
        self.clear_stacks(slot)
        self.slot_owner[slot] = None
        if self.slot_events is not None:
            self.slot_events.append(("clear", slot))

    def clear_stacks(self, slot: int) -> None:
        """Zero ``slot``'s factors in every stack."""
        for stack in [*self.lora_stacks.values(), *self.reft_stacks.values()]:
            if stack.host_ranks[slot]:
                stack.clear(slot)

    def _load_slot(self, slot: int, name: str) -> None:
        adapter = self._host_get(name)
        self.write_slot(slot, adapter)
        self.slot_owner[slot] = name
        self.slot_of[name] = slot
        if self.slot_events is not None:
            self.slot_events.append(("load", slot, adapter))

    def write_slot(self, slot: int, adapter: Adapter) -> None:
        """Write ``adapter``'s factors (this rank's shard of a LoRA) into ``slot`` of the stacks, creating stacks as needed."""
        with torch.no_grad():
            if isinstance(adapter.config, LoraConfig):
                for (layer, module), (a, b) in adapter.lora_weights().items():
                    a, b = shard_lora(module, a, b, self.tp_rank, self.tp_size)
                    stack = self.lora_stacks.get((layer, module))
                    if stack is None:
                        fan_in, fan_out = self.shapes[module]
                        stack = self.lora_stacks[(layer, module)] = SlotStack(
                            self.num_slots, fan_in, fan_out, a.shape[0], False, self.device, self.dtype, self._layout_changed
                        )
                        self._layout_changed()
                    stack.set(slot, a.to(self.device), b.to(self.device), None, adapter.config.scaling)
            else:
                hidden = self.model_config.hidden_size
                for layer, (down, bias, up) in adapter.reft_factors().items():
                    stack = self.reft_stacks.get(layer)
                    if stack is None:
                        stack = self.reft_stacks[layer] = SlotStack(
                            self.num_slots, hidden, hidden, down.shape[0], True, self.device, self.dtype, self._layout_changed
                        )
                        self._layout_changed()
                    stack.set(slot, down.to(self.device), up.to(self.device), bias.to(self.device), 1.0)

    def batch(
        self, lora_slot: Tensor | None, lora_active: set[int], reft_slot: Tensor | None, reft_active: set[int]
    ) -> AdapterBatch | None:
        """The step's adapter view; None when no token is adapted (then the model runs no adapter code)."""
        if lora_slot is None and reft_slot is None:
            return None
        return AdapterBatch(self, lora_slot, lora_active, reft_slot, reft_active)


class AdapterBatch:
    """Per-token adapter slots of one flattened step; the model calls ``lora`` and ``reft``."""

    def __init__(
        self, manager: AdapterManager, lora_slot: Tensor | None, lora_active: set[int], reft_slot: Tensor | None, reft_active: set[int]
    ):
        self.manager = manager
        self.lora_slot, self.lora_active = lora_slot, lora_active  # [N] slot per token, -1: no LoRA
        self.reft_slot, self.reft_active = reft_slot, reft_active  # [N] slot per token, -1: no ReFT edit
        self._masked: dict[int, Tensor | None] = {}
        self._plans: dict[int, object | None] = {}  # one token grouping per distinct token_slot, reused by every layer

    def _plan(self, token_slot: Tensor) -> object | None:
        key = id(token_slot)
        if key not in self._plans:
            self._plans[key] = segment_plan(token_slot, self.manager.num_slots)
        return self._plans[key]

    def _token_slot(self, stack: SlotStack, token_slot: Tensor, active_slots: set[int]) -> Tensor | None:
        """``token_slot`` with slots that have no factors at this insertion point set to -1 (None: nothing to do)."""
        key = id(stack)
        if key not in self._masked:
            with_rank = {s for s in active_slots if stack.host_ranks[s] > 0}
            if not with_rank:
                self._masked[key] = None
            elif with_rank == active_slots:
                self._masked[key] = token_slot
            else:
                keep = device_tensor([stack.host_ranks[s] > 0 for s in range(len(stack.host_ranks))] + [False], None, token_slot.device)
                self._masked[key] = torch.where(keep[token_slot], token_slot, -1)  # index -1 reads the trailing False
        return self._masked[key]

    def lora(self, layer: int, module: str, x: Tensor, out: Tensor) -> Tensor:
        """``out`` plus each token's LoRA delta for ``module`` of decoder layer ``layer``."""
        stack = self.manager.lora_stacks.get((layer, module))
        if stack is None or self.lora_slot is None:
            return out
        token_slot = self._token_slot(stack, self.lora_slot, self.lora_active)
        if token_slot is None:
            return out
        return grouped_low_rank(x, token_slot, stack.down, stack.up, None, stack.ranks, stack.scaling, out=out, plan=self._plan(token_slot))

    def reft(self, layer: int, hidden: Tensor) -> Tensor:
        """``hidden`` (the output of decoder layer ``layer``) plus each selected token's ReFT edit."""
        stack = self.manager.reft_stacks.get(layer)
        if stack is None or self.reft_slot is None:
            return hidden
        token_slot = self._token_slot(stack, self.reft_slot, self.reft_active)
        if token_slot is None:
            return hidden
        return grouped_low_rank(
            hidden, token_slot, stack.down, stack.up, stack.bias, stack.ranks, stack.scaling, out=hidden, plan=self._plan(token_slot)
        )
