"""A lean decoder step over a Hugging Face Llama / Qwen2 / Qwen3 model's own parameters, with a static KV cache.

The embedded engine's fast path. It computes what the HF modules compute, in the same op order (RMSNorm
in fp32, RoPE as `q * cos + rotate_half(q) * sin`, SwiGLU, `scaled_dot_product_attention` with the
model's scaling), but without the per-step work that `model(...)` and `generate` do around the
arithmetic: no cache objects that grow by `torch.cat` (every step copied every layer's whole cache),
no mask construction per layer, no module-call machinery, no full-width attention mask per step.

The weights are the HF model's own `Parameter`s (referenced, never copied), so `update_weights` on the
model is seen at once and no memory is duplicated.

Cache layout: per layer K and V of shape [slots, kv_heads, max_len, head_dim], zero-initialized (stale
entries must stay finite: they meet a masked score, and NaN * 0 is NaN). A sequence in slot s keeps its
token t at column t (prompts are right-aligned nowhere: no left padding), so its positions are simply
0..len-1, as `transformers` assigns them to a left-padded row through its position ids.

Decode attention packs the query heads of one KV head into the query-length axis
([B, kv_heads, n_rep, head_dim] against [B, kv_heads, T, head_dim]), which avoids repeating K/V n_rep
times; `transformers` does the same for single-token queries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def unsupported_reason(model) -> str | None:
    """Why `StaticCacheDecoder` cannot run this model (None when it can); the engine then falls back to
    calling the HF model itself."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} (supported: {SUPPORTED_MODEL_TYPES})"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))}"
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "no rotary embedding module with inv_freq"
    if getattr(rotary, "rope_type", "default") not in ("default", "llama3", "linear"):
        # dynamic / longrope variants change inv_freq with the sequence length
        return f"rope type {rotary.rope_type!r}"
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r}"
    return None


@dataclass
class KVCache:
    """Per layer K and V, each [slots, kv_heads, max_len, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def move(self, src: list[int], dst: list[int], upto: int) -> None:
        """Copies slots `src` to slots `dst` (columns [0, upto)); used to keep active slots a dense prefix."""
        if not src:
            return
        device = self.k[0].device
        s = torch.tensor(src, device=device)
        d = torch.tensor(dst, device=device)
        for t in (*self.k, *self.v):
            t[d, :, :upto] = t[s, :, :upto]


class _Layer:
    """Direct references to one decoder layer's parameters (the HF model's own tensors)."""

    def __init__(self, layer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1 = layer.input_layernorm.weight
        self.ln1_eps = layer.input_layernorm.variance_epsilon
        self.ln2 = layer.post_attention_layernorm.weight
        self.ln2_eps = layer.post_attention_layernorm.variance_epsilon
        self.q_w, self.q_b = attn.q_proj.weight, attn.q_proj.bias
        self.k_w, self.k_b = attn.k_proj.weight, attn.k_proj.bias
        self.v_w, self.v_b = attn.v_proj.weight, attn.v_proj.bias
        self.o_w, self.o_b = attn.o_proj.weight, attn.o_proj.bias
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = None if q_norm is None else (q_norm.weight, q_norm.variance_epsilon)
        self.k_norm = None if k_norm is None else (k_norm.weight, k_norm.variance_epsilon)
        self.gate_w, self.gate_b = mlp.gate_proj.weight, mlp.gate_proj.bias
        self.up_w, self.up_b = mlp.up_proj.weight, mlp.up_proj.bias
        self.down_w, self.down_b = mlp.down_proj.weight, mlp.down_proj.bias
        self.inter = self.gate_w.shape[0]
        # The feature-major decode step's projections: (weights, biases) written into one output each.
        self.qkv = ((self.q_w, self.k_w, self.v_w), (self.q_b, self.k_b, self.v_b))
        self.o = ((self.o_w,), (self.o_b,))
        self.gate_up = ((self.gate_w, self.up_w), (self.gate_b, self.up_b))
        self.down = ((self.down_w,), (self.down_b,))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen3RMSNorm, op for op."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm_cols(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` over dim -2 of a feature-major [..., features, n] tensor (the same ops per column)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-2, keepdim=True) + eps)
    return weight[:, None] * h.to(dtype)


_ROW_BLOCK = 1024
"""Weight rows per matmul in the CPU decode step: blocks of 256-1024 rows against a few columns ran
1.3-1.6x faster than one [N, K] @ [K, n] on this AVX2 CPU at n = 16-32 (the LM head most)."""


def _project(spec, x: torch.Tensor) -> torch.Tensor:
    """Feature-major projection: `spec` = (weights [N_i, K], biases [N_i] or None); x [K, n] -> the
    stacked outputs [sum N_i, n], each block `W[rows] @ x` written into its slice of one buffer."""
    weights, biases = spec
    n = x.shape[1]
    out = x.new_empty(sum(w.shape[0] for w in weights), n)
    row = 0
    for w, b in zip(weights, biases):
        rows = w.shape[0]
        block = _ROW_BLOCK if x.device.type == "cpu" else rows
        for s in range(0, rows, block):
            e = min(s + block, rows)
            torch.mm(w[s:e], x, out=out[row + s : row + e])
        if b is not None:
            out[row : row + rows] += b[:, None]
        row += rows
    return out


def _rope_cols(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`_rope` on a feature-major [heads, d, n] tensor; cos / sin [1, d, n]."""
    half = x.shape[-2] // 2
    rotated = torch.cat((-x[:, half:], x[:, :half]), dim=-2)
    return (x * cos) + (rotated * sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos) + (_rotate_half(x) * sin)


class StaticCacheDecoder:
    """Prefill and single-token decode steps over a static KV cache. Stateless apart from the RoPE table:
    the caller (the engine's scheduler) owns the cache and the per-slot lengths."""

    def __init__(self, model) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"StaticCacheDecoder: unsupported model: {reason}")
        cfg = model.config
        inner = model.model
        self.model = model
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.embed = inner.embed_tokens.weight
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = model.get_output_embeddings().weight
        self.lm_head_bias = model.get_output_embeddings().bias
        self.head = ((self.lm_head,), (self.lm_head_bias,))
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.n_rep = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim ** -0.5
        self._rotary = inner.rotary_emb
        self._cos = self._sin = None

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        shape = (slots, self.num_kv_heads, max_len, self.head_dim)
        n = len(self.layers)
        mk = lambda: torch.zeros(shape, device=self.device, dtype=self.dtype)  # noqa: E731
        return KVCache([mk() for _ in range(n)], [mk() for _ in range(n)])

    def _rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin for positions [0, length), computed as the HF rotary module does (fp32, then cast)."""
        if self._cos is None or self._cos.shape[0] < length:
            inv_freq = self._rotary.inv_freq.to(device=self.device, dtype=torch.float32)
            pos = torch.arange(max(length, 256), device=self.device, dtype=torch.float32)
            freqs = pos[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            scale = getattr(self._rotary, "attention_scaling", 1.0)
            self._cos = (emb.cos() * scale).to(self.dtype)
            self._sin = (emb.sin() * scale).to(self.dtype)
        return self._cos, self._sin

    def _qkv(self, lyr: _Layer, h: torch.Tensor, cos, sin):
        """h: [..., hidden] -> q [..., heads, d], k / v [..., kv_heads, d], RoPE (and q/k norms) applied."""
        lead = h.shape[:-1]
        q = F.linear(h, lyr.q_w, lyr.q_b).view(*lead, self.num_heads, self.head_dim)
        k = F.linear(h, lyr.k_w, lyr.k_b).view(*lead, self.num_kv_heads, self.head_dim)
        v = F.linear(h, lyr.v_w, lyr.v_b).view(*lead, self.num_kv_heads, self.head_dim)
        if lyr.q_norm is not None:
            q = rms_norm(q, *lyr.q_norm)
            k = rms_norm(k, *lyr.k_norm)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _mlp(self, lyr: _Layer, h: torch.Tensor) -> torch.Tensor:
        gate = F.silu(F.linear(h, lyr.gate_w, lyr.gate_b))
        return F.linear(gate * F.linear(h, lyr.up_w, lyr.up_b), lyr.down_w, lyr.down_b)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, *self.final_norm), self.lm_head, self.lm_head_bias)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, slot0: int, prompts: list[list[int]]) -> torch.Tensor:
        """Runs `prompts` through the model, writes their K/V to slots [slot0, slot0 + k), columns
        [0, len), and returns the logits of each prompt's last token [k, vocab].

        Packed: the linear layers see only real tokens (all prompts concatenated, no padding rows);
        attention alone works on a right-padded [k, longest, heads, d] copy with a causal mask, where
        padding sits after every real token and so never reaches one."""
        k_rows, width = len(prompts), max(len(p) for p in prompts)
        dev = self.device
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        ids = torch.tensor([t for p in prompts for t in p], device=dev)
        rows = torch.repeat_interleave(torch.arange(k_rows, device=dev), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        cols = torch.arange(ids.shape[0], device=dev) - starts[rows]  # position of each token in its prompt
        flat = rows * width + cols  # where each token sits in the padded [k * width] layout
        cos, sin = self._rope_table(width)
        cos, sin = cos[cols, None, :], sin[cols, None, :]  # [T, 1, d]
        h = F.embedding(ids, self.embed)  # [T, hidden]

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, heads, d] -> [k, heads, width, d]
            out = x.new_zeros(k_rows * width, *x.shape[1:])
            out[flat] = x
            return out.view(k_rows, width, *x.shape[1:]).transpose(1, 2)

        for li, lyr in enumerate(self.layers):
            q, k, v = self._qkv(lyr, rms_norm(h, lyr.ln1, lyr.ln1_eps), cos, sin)
            q, k, v = padded(q), padded(k), padded(v)
            cache.k[li][slot0 : slot0 + k_rows, :, :width] = k
            cache.v[li][slot0 : slot0 + k_rows, :, :width] = v
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                                  enable_gqa=self.n_rep > 1)
            attn = attn.transpose(1, 2).reshape(k_rows * width, -1)[flat]  # [T, heads * d]
            h = h + F.linear(attn, lyr.o_w, lyr.o_b)
            h = h + self._mlp(lyr, rms_norm(h, lyr.ln2, lyr.ln2_eps))
        return self._logits(h[starts + lengths - 1])

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        """One new token per slot for slots [0, n): `tokens` [n] at `positions` [n] (= tokens already cached
        in that slot). Writes its K/V at column `positions[b]` and attends over columns [0, width) where
        `width > max(positions)`; returns logits [n, vocab].

        Feature-major: the hidden state is [hidden, n] and every projection is `W @ x` (weight rows times
        the n columns) in blocks of `_ROW_BLOCK` weight rows, each written into its slice of one output
        buffer (so q, k and v come out of one [q + k + v, n] buffer without fusing the parameters). With few
        columns this reads the weights at a better rate than `x @ W.T` on CPU (measured in the README's
        "Rollout throughput"); each output element is the same K-term dot product."""
        n = tokens.shape[0]
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = self._rope_table(width)
        cos, sin = cos[positions].t()[None], sin[positions].t()[None]  # [1, d, n]
        rows = torch.arange(n, device=tokens.device)
        # [n, 1, 1, width]: column t hidden from slot b iff t > positions[b]
        hide = (torch.arange(width, device=tokens.device)[None, :] > positions[:, None]).view(n, 1, 1, width)
        h = F.embedding(tokens, self.embed).t().contiguous()  # [hidden, n]
        for li, lyr in enumerate(self.layers):
            x = rms_norm_cols(h, lyr.ln1, lyr.ln1_eps)
            qkv = _project(lyr.qkv, x)  # [(heads + 2 kv_heads) * d, n]
            q = qkv[: nh * d].view(nh, d, n)
            k = qkv[nh * d : (nh + nkv) * d].view(nkv, d, n)
            v = qkv[(nh + nkv) * d :].view(nkv, d, n)
            if lyr.q_norm is not None:
                q = rms_norm_cols(q, *lyr.q_norm)
                k = rms_norm_cols(k, *lyr.k_norm)
            q, k = _rope_cols(q, cos, sin), _rope_cols(k, cos, sin)
            kc, vc = cache.k[li], cache.v[li]
            kc[rows, :, positions] = k.permute(2, 0, 1)
            vc[rows, :, positions] = v.permute(2, 0, 1)
            q = q.permute(2, 0, 1).reshape(n, nkv, self.n_rep, d)
            attn = self._attend(q, kc[:n, :, :width], vc[:n, :, :width], hide)  # [n, kv, rep, d]
            h = h + _project(lyr.o, attn.view(n, nh * d).t())
            x = rms_norm_cols(h, lyr.ln2, lyr.ln2_eps)
            gu = _project(lyr.gate_up, x)
            gate, up = gu[: lyr.inter], gu[lyr.inter :]
            h = h + _project(lyr.down, F.silu(gate).mul_(up))
        return _project(self.head, rms_norm_cols(h, *self.final_norm)).t().contiguous()

    def _attend(self, q, k, v, hide):
        """Single-query attention, grouped: q [n, kv, rep, d] against k / v [n, kv, width, d]."""
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=~hide, scale=self.scaling)
        # CPU: SDPA's blocked kernel costs more in set-up than these tiny products do (measured).
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.scaling).masked_fill_(hide, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)
