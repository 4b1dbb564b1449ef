"""The OpenLLaMA (Llama architecture) forward pass.

Module and parameter names equal the Hugging Face checkpoint keys
(``model.layers.0.self_attn.q_proj.weight``), so a state dict moves between the two unchanged.
Reads top to bottom: norm, rotary embedding, attention, MLP, decoder layer, the model, the LM head.

Shapes: B batch, T new tokens, S keys (cache + new), C hidden, H heads, D head_dim, V vocab.
Per-head tensors are kept as (B, T, H, D), the linear output viewed without a copy; the
attention function transposes only where SDPA wants (B, H, T, D).
"""

from __future__ import annotations


import torch
from torch import nn

from bezoar_kernels.attention import attention, sdpa_heads
from bezoar_kernels.decode_attention import decode_attention, enabled as decode_attention_enabled
from bezoar_kernels.rmsnorm import rms_norm, rms_norm_add, rms_norm_keep
from bezoar_kernels.rope import apply_rope, rope_cos_sin
from bezoar_kernels.swiglu import swiglu

from .checkpointing import checkpoint_layer, resolve_mode, saved_call
from .config import LlamaConfig
from .lora import fused_norm_projections, fused_qkv, fused_swiglu_projection


# ---- attention with a mask (padding, KV cache) ------------------------------------------------------


def sdpa_attention(q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """q (B, T, Hq, D), k/v (B, S, Hk, D) -> (B, T, Hq, D) through SDPA; mask (B, 1, T, S) bool."""
    return sdpa_heads(q, k, v, mask, is_causal=causal and mask is None)


def build_attention_mask(
    query_pos: torch.Tensor,
    key_valid: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    num_keys: int,
) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: key j is visible to query i when j <= i (in the row's slot order),
    the key is a real token, and both are in the same document. Each query always sees itself, so a
    padding query has one key and no row of the softmax is empty.

    ``query_pos`` (T,) holds each new token's slot index among the S keys.
    """
    key_idx = torch.arange(num_keys, device=query_pos.device)
    allowed = key_idx[None, :] <= query_pos[:, None]  # (T, S)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    diagonal = key_idx[None, :] == query_pos[:, None]
    return allowed | diagonal[None, None]


# ---- modules -----------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        c, d = config.hidden_size, config.head_dim
        kw = dict(bias=False, dtype=dtype, device=device)
        self.q_proj = nn.Linear(c, self.n_heads * d, **kw)
        self.k_proj = nn.Linear(c, self.n_kv_heads * d, **kw)
        self.v_proj = nn.Linear(c, self.n_kv_heads * d, **kw)
        self.o_proj = nn.Linear(self.n_heads * d, c, **kw)

    def forward(self, x, cos, sin, ctx: "ForwardContext", qkv=None):
        """``qkv``: the three projections of x already made (with the norm in front of them,
        ``DecoderLayer``); x is then not read."""
        # saved_call marks the calls whose outputs "cheap" checkpointing keeps (bezoar.model.checkpointing)
        if qkv is None:
            # q, k, v in one call (one read of x) when the three are LoRA or NF4 layers of one kind
            qkv = saved_call(fused_qkv, self.q_proj, self.k_proj, self.v_proj, x)
            if qkv is None:
                qkv = (saved_call(self.q_proj, x), saved_call(self.k_proj, x), saved_call(self.v_proj, x))
        q, k, v = qkv
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, k, cos, sin)
        if ctx.cache is None and ctx.mask is None:
            out = saved_call(attention, q, k, v, ctx.doc_ids)  # training and scoring: the kernel path
        else:
            if ctx.cache is not None:
                k, v = ctx.cache.update(self.layer_idx, k, v)  # (B, S, Hk, D)
            if T == 1 and decode_attention_enabled(q):  # one new token per row: BEZOAR_DECODE_ATTENTION=triton
                out = decode_attention(q, k, v, ctx.mask)
            else:
                out = saved_call(sdpa_attention, q, k, v, ctx.mask, ctx.causal)
        return saved_call(self.o_proj, out.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, **kw)

    def forward(self, x, gate_up=None):
        """``gate_up``: the gate and up projections of x already made (``DecoderLayer``); x is then not read."""
        gate, up = gate_up if gate_up is not None else (saved_call(self.gate_proj, x), saved_call(self.up_proj, x))
        # training with LoRA dropout on down_proj: the SwiGLU and the projection as one computation
        y = fused_swiglu_projection(self.down_proj, gate, up)
        if y is not None:
            return y
        return saved_call(self.down_proj, swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, dtype=dtype, device=device)
        self.mlp = MLP(config, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, x, residual, cos, sin, ctx):
        """Takes the previous layer's output ``x`` and the residual stream before it; returns the same
        pair for the next layer, so each residual add is fused into the norm that follows it."""
        attn, mlp = self.self_attn, self.mlp
        # training with LoRA dropout: each norm and the projections that read it run as one computation
        # (the masked LoRA passes ride in the norm's; bezoar_kernels.norm_lora), where they allow it
        fused = fused_norm_projections(self.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj), x, residual,
                                       seeds_together=True)
        if fused is not None:
            qkv, residual = fused
            a = attn(None, cos, sin, ctx, qkv=qkv)
        else:
            if residual is None:  # the first layer, or the sum was taken in front (full checkpointing)
                h, residual = rms_norm_keep(x, self.input_layernorm.weight, self.input_layernorm.eps)
            else:
                h, residual = rms_norm_add(x, residual, self.input_layernorm.weight, self.input_layernorm.eps)
            a = attn(h, cos, sin, ctx)
        fused = fused_norm_projections(self.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), a, residual,
                                       seeds_together=False)
        if fused is not None:
            gate_up, residual = fused
            return mlp(None, gate_up), residual
        h, residual = rms_norm_add(a, residual, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
        return mlp(h), residual


class ForwardContext:
    """What every layer of one forward call shares: the mask and the KV cache."""

    __slots__ = ("mask", "cache", "causal", "doc_ids")

    def __init__(self, mask, cache, causal, doc_ids=None):
        self.mask = mask  # (B, 1, T, S) bool, or None
        self.cache = cache
        self.causal = causal  # with mask None: causal (prefill) or every key visible (one-token decode)
        self.doc_ids = doc_ids  # (B, T) for the kernel path (no mask, no cache)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, dtype=None, device=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype=dtype, device=device)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)


class LlamaForCausalLM(nn.Module):
    """``model(input_ids, position_ids=None, attention_mask=None, doc_ids=None, cache=None)`` -> logits (B, T, V).

    - ``position_ids`` (B, T): rotary positions; default 0.. for each row, or derived from
      ``attention_mask`` (cumsum - 1) so a left-padded row sees the positions of its unpadded self.
    - ``attention_mask`` (B, S) with 1 for real tokens and 0 for padding, over cached + new tokens.
    - ``doc_ids`` (B, T): packed rows; a token attends only within its document.
    - ``cache``: a ``KVCache`` (bezoar.model.decode) that is read and extended.
    """

    def __init__(self, config: LlamaConfig, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype=dtype, device=device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = "off"

    @property
    def gradient_checkpointing(self) -> str:
        """Activation checkpointing per decoder layer while training: ``"off"``, ``"full"`` (recompute
        each layer) or ``"cheap"`` (keep the linear and attention outputs, recompute norms, RoPE and
        SwiGLU); see bezoar.model.checkpointing. Setting True / False means "full" / "off"."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value) -> None:
        self._gradient_checkpointing = resolve_mode(value)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, doc_ids=None, cache=None):
        """The final-normed hidden states (B, T, C), before the LM head."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} "
                             "(it covers cached and new tokens)")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, S, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)  # (B, T, D/2) fp32

        key_valid = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if cache is None and key_valid is None:
            # Training and scoring: causal within documents, through the attention kernel.
            ctx = ForwardContext(None, None, causal=True, doc_ids=doc_ids)
        elif key_valid is None and doc_ids is None and (past == 0 or T == 1):
            # A prefill into the cache, or one new token that may see every cached key.
            ctx = ForwardContext(None, cache, causal=past == 0)
        else:
            query_pos = torch.arange(past, S, device=input_ids.device)
            ctx = ForwardContext(build_attention_mask(query_pos, key_valid, doc_ids, S), cache, causal=False)
        mode = self.gradient_checkpointing if self.training and torch.is_grad_enabled() else "off"
        h = self._layers(self.model.embed_tokens(input_ids), cos, sin, ctx, mode)
        if cache is not None:
            cache.advance(T)
        return h

    def _layers(self, x, cos, sin, ctx, mode: str = "off"):
        """The decoder layers and the final norm over embeddings ``x``."""
        residual = None
        for layer in self.model.layers:
            if mode == "full" and residual is not None:
                # A checkpointed layer keeps its inputs until the backward: one tensor, the sum its first
                # norm takes, instead of the pair (its norm then has no residual to add). That halves what
                # full checkpointing holds (26 x 8K tokens x 3200 x 2 bytes = 1.4 GB at 3B) for one add.
                # (cheap gains nothing from it: x is the previous layer's down_proj output, which that
                # layer's frame keeps anyway.)
                x, residual = x + residual, None
            x, residual = checkpoint_layer(layer, mode, x, residual, cos, sin, ctx)
        h, _ = rms_norm_add(x, residual, self.model.norm.weight, self.model.norm.eps)
        return h

    def decode_step(self, input_ids, position_ids, cache, inv_freq=None):
        """Logits (B, V) of one new token per row written into a ``StaticKVCache`` (bezoar.model.decode).

        Each row's token goes to its device-side ``slot`` in the cache and attends over the cache's first
        ``num_keys`` slots where ``key_valid`` is set. Every shape is fixed by the cache and nothing is
        read back to the host, so the call can be captured in a CUDA graph; pass ``inv_freq``
        (``rope_inv_freq`` on the model's device) to keep host-to-device copies out of it too.
        ``slot`` is not advanced here: the caller owns the step's bookkeeping.
        """
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inv_freq=inv_freq)
        cache.mark_step()  # each new token sees itself
        mask = cache.key_valid[:, None, None, :cache.num_keys]  # (B, 1, 1, S)
        ctx = ForwardContext(mask, cache, causal=False)
        h = self._layers(self.model.embed_tokens(input_ids), cos, sin, ctx)
        return self.lm_head(h[:, -1])

    def forward(self, input_ids, position_ids=None, attention_mask=None, doc_ids=None, cache=None,
                return_hidden: bool = False):
        """Logits (B, T, V); with ``return_hidden`` the final hidden states (B, T, C) instead, for losses
        that fuse the LM head with the cross-entropy."""
        h = self.hidden_states(input_ids, position_ids, attention_mask, doc_ids, cache)
        return h if return_hidden else self.lm_head(h)
