"""Dequantized NF4 weights for the large-M ``dequant`` path, kept in a few slots and dequantized ahead.

Without this module the ``dequant`` path (``nf4_matmul.nf4_dequant_forward`` / ``_backward``) runs the
Triton dequantize into one shared buffer and then cuBLAS, one after the other on the same stream: at
M = 4096 the dequantize is most of the gap between NF4 and cuBLAS on a bf16 weight (about 9.5 us of the
3200x3200 forward on an H100, at the copy bandwidth). A training step calls the same linears in the same
order every time, so the next weight is known before the current matmul starts. With the cache on:

* ``SLOTS`` buffers each hold one dequantized ``Block`` (one weight, or several stacked by rows), remembered
  by its NF4Weights (weakly: a weight that is gone is never matched), its row stride and what the values
  depend on: each weight's tensors' data pointers and version counters, its offset, blocksize and shape. A call whose weight is still in a slot skips the
  dequantize: with activation checkpointing a block's last linear runs its recomputed forward and then
  its backward back to back, and without checkpointing the last block's linears meet their backward in
  the same way. A write that bypasses the version counter (through ``.data``, or by a kernel writing
  raw memory) is not seen: call ``clear()`` after one. Weights made under ``torch.inference_mode`` have
  no version counter and never go through the cache.
* ``begin_step()`` marks the start of a training step. Each step's order of weights is recorded; in the
  next step, with the call on weight w at position i, the weight that came after w in the previous step
  is dequantized on a side stream into the least recently used other slot. The side stream first waits
  for an event recorded on the compute stream just before the current matmul, so everything queued
  before it (the earlier matmuls that read that slot, the writes of the weight's tensors, a buffer just
  allocated) is done; the current matmul runs alongside it, and the call that needs the weight waits
  for the dequantize alone. Where the order differs (the last micro-batch of an epoch, an eval pass)
  the position is found again by the weight; a guess that is never used costs one dequantize of
  bandwidth and nothing else.

Where the side stream's dequantize runs: while the current matmul holds the SMs it can only fill those
that the matmul leaves idle (its last wave, the gaps between its kernels), so how much of its time the
overlap hides is a measurement (``bench/nf4.py --cache``), not a given. What is certain is the hits.

Scope: the NF4 matmuls without an adapter, and the LoRA layers' base weights on the ``dequant``, ``cublas``
and ``concat`` paths (``bezoar_kernels.lora``, and the fused norm and SwiGLU + LoRA calls, which use
``concat``): a slot holds a ``Block``, q/k/v's three weights stacked, and for ``concat`` the LoRA
columns' room beside W (written by the caller on every call; W's columns are what is kept). The
``merged`` path (W + s B A, which changes every optimizer step), ``fused`` and ``tma`` keep their own
ways.

Off by default: ``BEZOAR_NF4_DEQUANT_CACHE=1`` (or the device's tuning entry ``nf4.dequant_cache``) turns
it on. It keeps ``SLOTS`` buffers of the largest block per (device, dtype) in place of the two shared
buffers the NF4 and LoRA dequant paths keep otherwise (one each): for OpenLLaMA 3B in bf16 the largest
block is q/k/v stacked with the LoRA columns, 9600 x 3248 values (62 MB at r = 16), against 55 MB for
8640x3200, so about +8 MB, or about +125 MB where something else in the process still allocates the
shared buffers (the ``merged`` or ``tma`` paths, graph capture, an earlier run with the cache off). It is bypassed while a CUDA graph is
being captured (a graph cannot hold work left pending on another stream): captured calls use the shared
buffer as before. One cache serves one compute stream at a time: a call from another stream first
makes that stream wait for the previous one and for the side stream. Results are the same bit for bit
with the cache on or off: the same kernel writes the same values into a buffer of the same layout, and
the same cuBLAS or Triton kernels read them.
"""

from __future__ import annotations

import bisect
import contextlib
import weakref

import torch

from bezoar_kernels import dispatch, tuning
from bezoar_kernels.nf4 import NF4Weight, dequantize_nf4_triton

ENV = "BEZOAR_NF4_DEQUANT_CACHE"
SLOTS = 2
# A step's recorded order is dropped (no schedule) past this many calls: begin_step is then not being
# called once per step, and the record would only grow.
MAX_TRACE = 1 << 16
_LOOKAHEAD = 4  # how far past the current position to look for the next different weight
# Priority of the side stream made by caches created from now on (torch's: 0 is the default and the
# lowest, negative is higher). At 0 the block scheduler treats the dequantize ahead as the matmul's
# equal; bench/nf4.py --cache times -1 beside it.
SIDE_PRIORITY = 0


def enabled(device) -> bool:
    """Whether the dequant path goes through the cache on ``device``: the environment variable, else the
    device's tuning entry, else off."""
    forced = dispatch.env_switch(ENV)
    if forced is not None:
        return forced
    return bool(tuning.setting("nf4.dequant_cache", device))


def _identity(weight: NF4Weight) -> tuple:
    """What a slot's content depends on besides the NF4Weight object."""
    return (weight.shape, weight.blocksize, weight.offset,
            tuple((t.data_ptr(), t._version) for t in weight.tensors()))


class Block:
    """What a slot holds: NF4 weights of one K stacked by rows (weight j in the rows after those of the
    weights before it), each in the first K columns of rows ``cols`` values apart (``cols`` > K leaves
    room beside W for the caller's own columns, as the LoRA concat path's [W | s B] needs). A single
    weight with cols = K is the plain (N, K) matrix."""

    __slots__ = ("weights", "cols", "k", "rows")

    def __init__(self, weights, cols: int | None = None):
        self.weights = tuple(weights)
        shapes = [tuple(w.shape) for w in self.weights]
        if not shapes or any(len(sh) != 2 or sh[1] != shapes[0][1] for sh in shapes) or (
                cols is not None and int(cols) < shapes[0][1]):
            raise ValueError(f"dequant cache: a block needs 2-D weights of one K and cols >= K, got {shapes} "
                             f"in {cols} columns")
        self.k = shapes[0][1]
        self.cols = self.k if cols is None else int(cols)
        self.rows = sum(sh[0] for sh in shapes)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def identity(self) -> tuple:
        return self.cols, tuple(_identity(w) for w in self.weights)

    def key(self) -> tuple:
        return self.cols, tuple(id(w) for w in self.weights)

    def write(self, dtype: torch.dtype, view: torch.Tensor) -> None:
        """Dequantize every weight into its rows of ``view`` (rows, cols): exactly the calls the shared
        buffers' writers make, so the values are the same bit for bit."""
        start = 0
        for w in self.weights:
            n = w.shape[0]
            dequantize_nf4_triton(w, dtype, out=view[start: start + n, : self.k])
            start += n

    def usable(self) -> bool:
        return all(usable_weight(w) for w in self.weights)


class _Ref:
    """A block remembered weakly (the schedule's entries, a slot's content): it never keeps a model alive,
    and a block whose weights are gone matches nothing."""

    __slots__ = ("refs", "cols")

    def __init__(self, block: Block):
        self.refs = tuple(weakref.ref(w) for w in block.weights)
        self.cols = block.cols

    def matches(self, block: Block) -> bool:
        return (self.cols == block.cols and len(self.refs) == len(block.weights)
                and all(r() is w for r, w in zip(self.refs, block.weights)))

    def block(self) -> Block | None:
        weights = [r() for r in self.refs]
        return None if any(w is None for w in weights) else Block(weights, self.cols)

    def key(self) -> tuple | None:
        weights = [r() for r in self.refs]
        return None if any(w is None for w in weights) else (self.cols, tuple(id(w) for w in weights))


class _Slot:
    __slots__ = ("buf", "ref", "identity", "ready", "on_side", "used", "from_prefetch")

    def __init__(self, cuda: bool):
        self.buf: torch.Tensor | None = None
        self.ref: _Ref | None = None  # the block held, or None
        self.identity: tuple | None = None
        self.ready = torch.cuda.Event() if cuda else None  # recorded after the side stream's dequantize
        self.on_side = False  # the content was (or is being) written on the side stream
        self.used = -1  # clock of the last acquire, for least-recently-used eviction
        self.from_prefetch = False  # written by a prefetch and not yet read

    def holds(self, block: Block, identity: tuple) -> bool:
        return self.ref is not None and self.ref.matches(block) and self.identity == identity


class DequantCache:
    """The slots and the learned schedule for one (device, dtype). ``held`` is the whole protocol:
    ``acquire`` (the block's dequantized view, for reads queued on the compute stream), ``plan`` (the
    block expected next and the slot it goes into, buffer grown), ``fence`` (recorded on the compute
    stream before the reads), then ``prefetch`` (on the side stream, behind the fence)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, slots: int = SLOTS):
        if slots < 2:
            raise ValueError(f"dequant cache: needs at least 2 slots (one in use, one being filled), got {slots}")
        self.device, self.dtype = torch.device(device), dtype
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device, priority=SIDE_PRIORITY) if cuda else None
        self.fence = torch.cuda.Event() if cuda else None
        self.compute = None  # the compute stream the cache serves now (CUDA)
        self.slots = [_Slot(cuda) for _ in range(slots)]
        self.clock = 0
        self.stepping = False  # begin_step has been called: orders are recorded
        self.previous: list[_Ref] = []  # the last whole step's order of blocks
        self.where: dict[tuple, list[int]] = {}  # key of a block in ``previous`` -> its positions there
        self.trace: list[_Ref] = []  # this step's so far
        self.pos = 0  # where in ``previous`` the calls of this step have got to
        self.stats = {"hits": 0, "misses": 0, "prefetched": 0, "prefetch_hits": 0, "unused_prefetches": 0}

    # ---- streams ---------------------------------------------------------------------------------

    def bind(self) -> None:
        """Serve the current stream; where it is not the one served so far, it first waits for that one and
        for the side stream, so the slots' earlier writes and reads are behind it."""
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        if self.compute is not None and current != self.compute:
            current.wait_stream(self.compute)
            current.wait_stream(self.stream)
        self.compute = current

    # ---- schedule --------------------------------------------------------------------------------

    def begin_step(self) -> None:
        if self.trace:
            self.previous = self.trace
            self.where = {}
            for i, ref in enumerate(self.previous):
                key = ref.key()
                if key is not None:
                    self.where.setdefault(key, []).append(i)
        self.trace, self.pos, self.stepping = [], 0, True
        if self.stream is not None:
            # whatever the compute stream did before the step (weights loaded, a model changed) is
            # visible to the side stream's first dequantize of the step
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _advance(self, block: Block) -> None:
        """Record the call and move the position in the previous step's order past this block."""
        if not self.stepping:
            return
        if len(self.trace) >= MAX_TRACE:
            self.stepping, self.trace, self.previous, self.where = False, [], [], {}
            return
        self.trace.append(_Ref(block))
        prev = self.previous
        if self.pos < len(prev) and prev[self.pos].matches(block):
            self.pos += 1
            return
        # found again by the block: its next position from here on, else its first
        places = [i for i in self.where.get(block.key(), ()) if prev[i].matches(block)]
        if places:
            at = bisect.bisect_left(places, self.pos)
            self.pos = (places[at] if at < len(places) else places[0]) + 1

    def expected_next(self, block: Block) -> Block | None:
        """The first block other than ``block`` that the previous step called next, or None. Past the
        end of the previous step's order it goes on from its start: the next step's first call."""
        prev = self.previous
        for j in range(min(_LOOKAHEAD, len(prev))):
            ref = prev[(self.pos + j) % len(prev)]
            if not ref.matches(block):
                return ref.block()
        return None

    # ---- slots -----------------------------------------------------------------------------------

    def _find(self, block: Block, identity: tuple) -> _Slot | None:
        return next((s for s in self.slots if s.holds(block, identity)), None)

    def _view(self, slot: _Slot, block: Block) -> torch.Tensor:
        """The slot's buffer as the block's (rows, cols), grown on the compute stream where too small. The
        side stream is recorded as a user, so a buffer given up is not handed out again while a
        dequantize into it may still run there; a new buffer's first write on the side stream waits for
        the fence, recorded after this allocation, so it cannot race the compute stream's last use of
        that memory."""
        if slot.buf is None or slot.buf.numel() < block.numel:
            slot.buf = None
            with torch.inference_mode(False):  # a buffer first made under inference mode stays writable outside
                slot.buf = torch.empty(block.numel, dtype=self.dtype, device=self.device)
            if self.stream is not None:
                slot.buf.record_stream(self.stream)
        return slot.buf[: block.numel].view(block.rows, block.cols)

    def _victim(self, keep: _Slot | None) -> _Slot:
        slot = min((s for s in self.slots if s is not keep), key=lambda s: s.used)
        if slot.from_prefetch:
            self.stats["unused_prefetches"] += 1
            slot.from_prefetch = False
        return slot

    def acquire(self, block: Block) -> tuple[_Slot, torch.Tensor]:
        """(slot, the block dequantized as (rows, cols) in the cache's dtype), ready for reads queued on the
        compute stream. Columns past K hold whatever was there: the caller writes them before reading."""
        identity = block.identity()
        self._advance(block)
        slot = self._find(block, identity)
        if slot is not None:
            self.stats["hits"] += 1
            if slot.from_prefetch:
                self.stats["prefetch_hits"] += 1
                slot.from_prefetch = False
            if slot.on_side:
                self.compute.wait_event(slot.ready)
            view = slot.buf[: block.numel].view(block.rows, block.cols)
        else:
            self.stats["misses"] += 1
            slot = self._victim(None)
            if slot.on_side:  # a dequantize of another block may still be writing it
                self.compute.wait_event(slot.ready)
            slot.ref = None  # nothing valid while it is rewritten
            view = self._view(slot, block)
            block.write(self.dtype, view)
            slot.ref, slot.identity, slot.on_side = _Ref(block), identity, False
        self.clock += 1
        slot.used = self.clock
        return slot, view

    def plan(self, block: Block, current: _Slot) -> tuple | None:
        """(block expected next, its identity, the slot it goes into, its view) where it is not in a slot
        yet, else None. The slot is the least recently used one other than ``current``, emptied now; its
        buffer is grown here, before the fence."""
        nxt = self.expected_next(block)
        if nxt is None or nxt.weights[0].device != self.device or not nxt.usable():
            return None
        identity = nxt.identity()
        if self._find(nxt, identity) is not None:
            return None
        target = self._victim(current)
        target.ref = None
        return nxt, identity, target, self._view(target, nxt)

    def record_fence(self) -> None:
        if self.fence is not None:
            self.fence.record(self.compute)

    def prefetch(self, planned: tuple) -> None:
        """Dequantize the planned block into its slot: on the side stream behind the fence (CUDA), inline
        elsewhere."""
        nxt, identity, target, view = planned
        if self.stream is not None:
            self.stream.wait_event(self.fence)
            for w in nxt.weights:  # a weight freed meanwhile keeps its memory until this read is done
                for t in w.tensors():
                    t.record_stream(self.stream)
            with torch.cuda.stream(self.stream):
                nxt.write(self.dtype, view)
            target.ready.record(self.stream)
            target.on_side = True
        else:
            nxt.write(self.dtype, view)
        target.ref, target.identity, target.from_prefetch = _Ref(nxt), identity, True
        self.clock += 1
        target.used = self.clock
        self.stats["prefetched"] += 1

    def clear(self) -> None:
        """Drop the buffers and the schedule."""
        if self.stream is not None and self.compute is not None:
            self.compute.wait_stream(self.stream)
        for slot in self.slots:
            slot.buf, slot.ref, slot.identity, slot.on_side, slot.from_prefetch = None, None, None, False, False
        self.previous, self.where, self.trace, self.pos = [], {}, [], 0


_caches: dict[tuple[torch.device, torch.dtype], DequantCache] = {}
_stepping = False  # begin_step was called: caches made from now on record orders too


def cache_for(device: torch.device, dtype: torch.dtype) -> DequantCache:
    key = (torch.device(device), dtype)
    cache = _caches.get(key)
    if cache is None:
        cache = _caches[key] = DequantCache(*key)
        if _stepping:
            cache.stepping = True
    return cache


def begin_step() -> None:
    """Mark the start of a training step (forward + backward of every micro-batch of one optimizer
    step, or one micro-batch: either, as long as it is done the same way each time). Cheap where the
    cache is off: nothing is recorded until a cached call happens."""
    global _stepping
    _stepping = True
    for cache in _caches.values():
        cache.begin_step()


_retired: dict[str, int] = {}  # the counters of caches that clear() dropped


def clear() -> None:
    """Free every cache's buffers and forget the schedules (the trainer does at the end of ``fit``, so
    the memory is back for what comes next); the counters of ``stats`` are kept."""
    global _stepping
    for cache in _caches.values():
        cache.clear()
        for k, v in cache.stats.items():
            _retired[k] = _retired.get(k, 0) + v
    _caches.clear()
    _stepping = False


def reset_stats() -> None:
    _retired.clear()
    for cache in _caches.values():
        cache.stats = dict.fromkeys(cache.stats, 0)


def stats() -> dict:
    """Counters summed over the caches since ``reset_stats``: hits (the weight was in a slot), misses
    (dequantized inline), prefetched (dequantized ahead), prefetch_hits, unused_prefetches (evicted
    before use). Empty where no call has gone through a cache."""
    out: dict[str, int] = dict(_retired)
    for cache in _caches.values():
        for k, v in cache.stats.items():
            out[k] = out.get(k, 0) + v
    return out


def usable_weight(weight: NF4Weight) -> bool:
    """Whether the cache can tell this weight's versions apart: not for inference-mode tensors, which
    have no version counter."""
    return not any(t.is_inference() for t in weight.tensors())


def usable(weights, dtype: torch.dtype) -> bool:
    """Whether a dequant-path call on ``weights`` (one NF4Weight or several of one device) in ``dtype``
    goes through the cache now."""
    weights = (weights,) if isinstance(weights, NF4Weight) else tuple(weights)
    if not weights or not all(isinstance(w, NF4Weight) for w in weights):
        return False
    device = weights[0].device
    if not enabled(device):  # off (the default): nothing else is asked
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return all(usable_weight(w) for w in weights)


@contextlib.contextmanager
def held(weights, dtype: torch.dtype, cols: int | None = None):
    """The weights dequantized as a ``Block`` (rows, cols) in ``dtype`` from the cache, for reads queued
    on the current stream inside the ``with``: the one use of it. The block expected next is dequantized
    ahead once the reads are queued (on CUDA, on the side stream, beside them)."""
    block = Block((weights,) if isinstance(weights, NF4Weight) else weights, cols)
    cache = cache_for(block.weights[0].device, dtype)
    cache.bind()
    slot, view = cache.acquire(block)
    planned = cache.plan(block, slot)
    if planned is not None:
        cache.record_fence()  # before the reads: the dequantize ahead may run beside them, not before
    yield view
    if planned is not None:
        cache.prefetch(planned)


def _product(a: torch.Tensor, w: torch.Tensor, transpose: bool) -> torch.Tensor:
    return torch.matmul(a, w.t() if transpose else w)


def matmul(a: torch.Tensor, weight: NF4Weight, transpose: bool) -> torch.Tensor:
    """``a @ W.T`` (transpose) or ``a @ W`` through the cache, W dequantized in a's dtype."""
    with held(weight, a.dtype) as w:
        return _product(a, w, transpose)
