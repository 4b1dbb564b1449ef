"""Activation checkpointing per decoder layer: ``off``, ``full`` or ``cheap``.

A decoder layer's backward needs the tensors its forward saved. Three ways to pay for them:

* ``off``: keep every saved tensor (fastest; memory grows with tokens x layers x ~15 hidden widths).
* ``full``: keep only the layer's inputs and run the whole layer forward again in the backward
  (``torch.utils.checkpoint``, non-reentrant): the smallest memory, one extra forward (about +50%
  of the step's matmul FLOPs for a frozen base, whose backward is the input gradient alone).
* ``cheap``: keep the layer's inputs plus the *outputs* of its expensive calls - the linear layers
  (NF4 base, LoRA, or dense) and the attention core - and in the backward recompute only what lies
  between them: RMSNorm, RoPE, SwiGLU, views. No matmul and no attention runs twice.

How ``cheap`` works (our own, not torch's selective-checkpoint policy, which decides per aten op and
cannot see Triton kernels: a Triton attention or fused NF4+LoRA kernel would be re-run). The model
marks its expensive calls with :func:`saved_call`. During the layer's forward a frame is active:

* tensors saved by the cheap code between the calls are dropped; each becomes a slot number;
* inside an expensive call, its saved tensors get their own hooks: a tensor that is (a view of)
  one of the call's tensor arguments is dropped and remembered as "argument i, this view"; any
  other saved tensor (its output, a log-sum-exp, LoRA's rank-r intermediate) is kept;
* the call's outputs are kept in the frame.

The first time the backward asks for a dropped tensor, the layer forward runs again with the same
autocast, kernel backend and RNG state. Each expensive call now returns its kept outputs without
computing anything, leaves the RNG where the forward's call left it (the LoRA calls draw dropout
seeds), and records the arguments it was given, which the dropped argument views are cut from;
the cheap code recomputes its tensors, which fill the slots in the order the forward saved them.
Because the expensive calls save nothing into the slot sequence, forward and recompute count the
same slots.

Memory per layer and token (C hidden, F intermediate; in the GPU path, where an NF4 linear saves
nothing and attention keeps its output and log-sum-exp): ``full`` keeps 2C (the layer inputs).
``cheap`` keeps about 7C + 2F (inputs, q, k, v, attention output, o_proj output, gate, up). ``off``
keeps what each op's backward asks for: with LoRA on every linear about 8C + 3F (the adapters save
their inputs: norm outputs, attention output, SwiGLU output), so ``cheap`` saves about C + F; with
LoRA on q/k/v only about 7C + 2F, the same as ``cheap``. Measured on a one-layer model with
F = 2.5C through the Triton path (tests/model/test_checkpointing.py), in hidden widths per token:
all linears off 20.1, cheap 15.6, full 2.6; q/k/v only off 15.3, cheap 14.3, full 2.6. So ``cheap``
buys a little memory for little time when every linear is adapted; ``full`` is the mode that makes
long steps fit.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from bezoar_kernels import dispatch

MODES = ("off", "full", "cheap")

_local = threading.local()


def resolve_mode(value: Any, source: str = "gradient_checkpointing") -> str:
    """``"off" | "full" | "cheap"``; ``True`` / ``False`` are accepted as ``"full"`` / ``"off"``."""
    if isinstance(value, bool):
        return "full" if value else "off"
    if value in MODES:
        return value
    raise ValueError(f"{source} is {value!r}: expected one of {', '.join(repr(m) for m in MODES)} "
                     "(or true / false for 'full' / 'off')")


def saved_call(fn: Callable, *args):
    """``fn(*args)``, marked as an expensive call whose outputs ``cheap`` checkpointing keeps.

    Outside a ``cheap`` layer forward this is a plain call.
    """
    frame = getattr(_local, "frame", None)
    if frame is None:
        return fn(*args)
    return frame.call(fn, args)


def in_cheap_frame() -> bool:
    """Whether a ``cheap`` layer forward (or its recompute) is running on this thread."""
    return getattr(_local, "frame", None) is not None


def checkpoint_layer(layer: Callable, mode: str, *args):
    """``layer(*args)`` with activation checkpointing ``mode`` (see the module docstring)."""
    if mode == "off":
        return layer(*args)
    kernels = dispatch.current_backend()  # thread-local: the backward may run on another thread

    def run(*a):
        with dispatch.backend(kernels):
            return layer(*a)

    if mode == "full":
        return checkpoint(run, *args, use_reentrant=False)
    if mode == "cheap":
        return _CheapFrame(run, args).forward()
    raise ValueError(resolve_mode(mode))


# ---- the cheap frame ----------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """The recomputation did not retrace the forward (control flow or shapes changed between them)."""


class _Slot:
    """A saved tensor of the cheap code: recomputed, found by its position in the save order."""

    __slots__ = ("frame", "index")

    def __init__(self, frame, index):
        self.frame, self.index = frame, index


class _ArgView:
    """A saved tensor that is a view of an expensive call's argument: cut again from the recomputed one."""

    __slots__ = ("frame", "call", "arg", "size", "stride", "offset")

    def __init__(self, frame, call, arg, size, stride, offset):
        self.frame, self.call, self.arg = frame, call, arg
        self.size, self.stride, self.offset = size, stride, offset


class _Kept:
    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr()) if storage.nbytes() else None


class _Frozen:
    """A tensor's values without its autograd history, and whether it required grad.

    The frame keeps tensors only this way: a frame is referenced by the hooks of the graph's saved
    tensors, so a frame holding a tensor with a ``grad_fn`` would close a reference cycle through the
    C++ graph that Python's collector cannot see, and a graph never run backward would leak."""

    __slots__ = ("tensor", "requires_grad")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()
        self.requires_grad = tensor.requires_grad

    def thaw(self) -> torch.Tensor:
        return self.tensor.detach().requires_grad_(self.requires_grad)


def _freeze(value):
    """Tensors (also inside tuples and lists) as ``_Frozen``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return _Frozen(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_freeze(v) for v in value)
    return value


def _thaw(value):
    """Fresh leaf tensors (same storage, same requires_grad) for what ``_freeze`` kept."""
    if isinstance(value, _Frozen):
        return value.thaw()
    if isinstance(value, (tuple, list)):
        return type(value)(_thaw(v) for v in value)
    return value


class _CheapFrame:
    def __init__(self, fn: Callable, args: tuple):
        self.fn = fn
        self.args = args  # the layer inputs; frozen once the forward has run
        self.outputs: list = []  # per expensive call, its outputs (frozen)
        self.call_args: list[dict[int, torch.Tensor]] = []  # per call, the recomputed arguments needed
        self.needed_args: list[dict[int, tuple]] = []  # per call: argument -> its (shape, stride) in the forward
        self.slots: dict[int, torch.Tensor] = {}  # recomputed tensors not yet handed to the backward
        self.num_slots = 0
        self.num_calls = 0
        self.recomputing = False
        self.device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        self.autocast = {dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                         for dev in {"cpu", self.device.type}}
        self.rng = self._rng_state()  # at the start of the layer
        self.rng_after: list = []  # after each expensive call (which may draw, e.g. dropout seeds)

    def _rng_state(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    def _set_rng_state(self, state) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    # -- forward --

    def forward(self):
        previous = getattr(_local, "frame", None)
        _local.frame = self
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack_cheap, self._unpack):
                return self.fn(*self.args)
        finally:
            _local.frame = previous
            self.args = _freeze(self.args)  # kept: the previous layer's outputs, alive anyway

    def _pack_cheap(self, tensor):
        if self.recomputing:
            index = self.num_slots
            self.num_slots += 1
            if index in self.slots:  # None placeholder: this position is wanted
                self.slots[index] = tensor.detach()  # no history: the recomputed graph must die now
            return index
        index = self.num_slots
        self.num_slots += 1
        self.slots[index] = None
        return _Slot(self, index)

    def call(self, fn: Callable, args: tuple):
        index = self.num_calls
        self.num_calls += 1
        if self.recomputing:
            if index >= len(self.outputs):
                raise CheckpointError("cheap checkpointing: the recomputation made more expensive calls than "
                                      "the forward did")
            for i, geometry in self.needed_args[index].items():
                if (tuple(args[i].shape), tuple(args[i].stride())) != geometry:
                    raise CheckpointError(
                        f"cheap checkpointing: argument {i} of expensive call {index} has shape/stride "
                        f"{(tuple(args[i].shape), tuple(args[i].stride()))} in the recomputation, "
                        f"{geometry} in the forward")
                self.call_args[index][i] = args[i].detach()
            self._set_rng_state(self.rng_after[index])  # as if the call had drawn its random numbers again
            return _thaw(self.outputs[index])
        # storage -> (argument index, dtype, storage offset). The pack hook must not hold the arguments
        # themselves: autograd keeps every hook alive with the tensors it packed.
        keys = {}
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                key = _storage_key(a)
                if key is not None and key not in keys:
                    keys[key] = (i, a.dtype, a.storage_offset(), tuple(a.shape), tuple(a.stride()))
        self.needed_args.append({})
        self.call_args.append({})
        needed = self.needed_args[index]

        def pack(tensor):
            key = _storage_key(tensor)
            found = keys.get(key) if key is not None else None
            if found is not None and tensor.dtype == found[1]:
                i, _, offset, shape, stride = found
                needed[i] = (shape, stride)
                return _ArgView(self, index, i, tuple(tensor.shape), tuple(tensor.stride()),
                                tensor.storage_offset() - offset)
            return _Kept(tensor.detach())

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            out = fn(*args)
        self.outputs.append(_freeze(out))
        self.rng_after.append(self._rng_state())
        return out

    # -- backward --

    def _unpack(self, handle):
        if isinstance(handle, _Kept):
            return handle.tensor
        if isinstance(handle, _Slot):
            tensor = self.slots.get(handle.index)
            if tensor is None:
                self._recompute()
                tensor = self.slots.get(handle.index)
            self.slots[handle.index] = None  # handed over: the frame no longer holds it
            return tensor
        # _ArgView
        held = self.call_args[handle.call]
        if handle.arg not in held:
            self._recompute()
            held = self.call_args[handle.call]
        arg = held[handle.arg]
        return arg.as_strided(handle.size, handle.stride, arg.storage_offset() + handle.offset)

    def _recompute(self):
        self.recomputing = True
        self.num_slots = 0
        self.num_calls = 0
        for i in list(self.slots):
            self.slots[i] = None
        for i in range(len(self.call_args)):
            self.call_args[i] = {}
        wanted = len(self.slots)
        previous = getattr(_local, "frame", None)
        _local.frame = self
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                self._set_rng_state(self.rng)
                with torch.autograd.graph.saved_tensors_hooks(self._pack_cheap, lambda index: None):
                    with _autocast(self.autocast):
                        self.fn(*_thaw(self.args))
        finally:
            _local.frame = previous
            self.recomputing = False
        if self.num_slots != wanted or self.num_calls != len(self.outputs):
            raise CheckpointError(
                f"cheap checkpointing: the recomputation saved {self.num_slots} tensors in "
                f"{self.num_calls} expensive calls, the forward {wanted} in {len(self.outputs)}: the layer "
                "must run the same way twice (same control flow, kernel backend and shapes)")


class _autocast:
    """Re-enter the autocast state (per device type) the forward ran under."""

    def __init__(self, state: dict):
        self.contexts = [torch.autocast(dev, dtype=dtype, enabled=enabled) for dev, (enabled, dtype) in state.items()]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)
        return False
