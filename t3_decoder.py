"""T3's transformer as a fixed-shape decoder over a static KV cache: the model half of fast T3 decoding,
as gpt-fast's model.py is to its generate.py. server.py holds the rest (the decode loop, sampling, CUDA graphs).

A module of its own so that a server that only runs Piper never imports torch: server.py imports this
one lazily, on a Chatterbox engine's first use of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

CACHE_BUCKET = 256  # graphed/compiled steps attend over the cache in buckets of this many positions


@dataclass(frozen=True)
class DecodeOptions:
    """How T3 runs: the load-time settings, resolved for the device."""

    dtype: torch.dtype = torch.float32
    quantize: str = "none"  # "int8"
    attention: str = "sdpa"  # or "eager"
    compile_mode: str = ""  # "" = no torch.compile, else its mode
    cuda_graphs: bool = False
    eos_check_every: int = 1  # steps between reading tokens back; >1 saves a sync per step on CUDA
    s3gen_dtype: torch.dtype = torch.float32  # S3Gen's flow, under autocast (its vocoder stays float32)
    max_batch: int = 8  # generation slots decoded together
    prefill_chunk: int = 32  # prompt positions per prefill turn while others decode

    @property
    def bucketed(self) -> bool:
        """Static attention shapes (needed by graphs and compiled steps)."""
        return self.cuda_graphs or bool(self.compile_mode)

    def describe(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "s3gen_dtype": str(self.s3gen_dtype).removeprefix("torch."),
            "quantize": self.quantize,
            "torch_compile": bool(self.compile_mode),
            "compile_mode": self.compile_mode or None,
            "cuda_graphs": self.cuda_graphs,
            "attention": self.attention,
            "eos_check_every": self.eos_check_every,
            "max_batch": self.max_batch,
        }


class KVCache:
    """Keys and values of every row of the batch, allocated once at load for the longest generation:
    [2 (keys, values), rows, heads, capacity, head_dim] per layer. Never reallocated: graphs read it by address."""

    def __init__(
        self,
        layers: int,
        rows: int,
        heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.layers = [
            torch.zeros(2, rows, heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(layers)
        ]
        self.capacity = capacity

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor) -> None:
        """One write of keys and values: kv [r, T, 2, heads, head_dim] at rows [r, 1] x positions [r or 1, T]."""
        self.layers[layer][:, rows, :, positions] = kv

    def prefix(self, rows: slice, length: int) -> list[torch.Tensor]:
        """A copy of the first `length` positions of `rows`, every layer."""
        return [layer[:, rows, :, :length].clone() for layer in self.layers]

    def put_prefix(self, rows: slice, prefix: list[torch.Tensor]) -> None:
        for layer, kept in zip(self.layers, prefix):
            layer[:, rows, :, : kept.shape[3]] = kept

    def clear(self, rows: slice, start: int) -> None:
        """Zero `rows` from position `start` on, every layer."""
        for layer in self.layers:
            layer[:, rows, :, start:].zero_()


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    attention: str,
) -> torch.Tensor:
    """Scaled dot-product attention, [B, H, T, D]; `mask` is additive or boolean over the keys."""
    if attention == "sdpa":
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal and mask is None)
    return attention_probs(query, keys, mask, causal) @ values


def attention_probs(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    scores = (query @ keys.transpose(-1, -2)) * query.shape[-1] ** -0.5
    if causal and mask is None:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(mask.logical_not(), float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores.float(), dim=-1).to(query.dtype)


def prompt_mask(start: int, count: int, device: torch.device | str) -> torch.Tensor | None:
    """Causal mask of `count` prompt positions written after `start` earlier ones (None: plain causal)."""
    if start == 0:
        return None
    return torch.ones(count, start + count, dtype=torch.bool, device=device).tril(start)


def step_mask(positions: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [rows, 1, 1, length] of a decode step: each row sees the cache up to its own position.
    Built once per step, shared by every layer."""
    hidden = torch.arange(length, device=positions.device) > positions[:, None]
    return torch.zeros(hidden.shape, dtype=dtype, device=positions.device).masked_fill(hidden, float("-inf"))[
        :, None, None
    ]


def gpt2_layer(block: Any) -> torch.nn.Module:
    """One of Turbo's GPT-2 blocks as the decoder's layer: norms, fused projections (HF's Conv1D as Linear)."""

    def linear(conv: Any) -> torch.nn.Linear:  # HF's Conv1D holds the transposed weight of a Linear
        layer = torch.nn.Linear(1, 1, device="meta")
        layer.in_features, layer.out_features = conv.weight.shape
        layer.weight = torch.nn.Parameter(conv.weight.t(), requires_grad=False)
        layer.bias = conv.bias
        return layer

    return torch.nn.ModuleDict(
        dict(
            norm1=block.ln_1,
            qkv=linear(block.attn.c_attn),
            out=linear(block.attn.c_proj),
            norm2=block.ln_2,
            up=linear(block.mlp.c_fc),
            down=linear(block.mlp.c_proj),
        )
    )


def llama_layer(layer: Any) -> torch.nn.Module:
    """One of the Llama layers as the decoder's layer: RMS norms, q/k/v and gate/up fused."""
    attn, mlp = layer.self_attn, layer.mlp
    return torch.nn.ModuleDict(
        dict(
            norm1=RMSNorm(layer.input_layernorm),
            qkv=fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj),
            out=attn.o_proj,
            norm2=RMSNorm(layer.post_attention_layernorm),
            gate_up=fuse_linears(mlp.gate_proj, mlp.up_proj),
            down=mlp.down_proj,
        )
    )


class T3Decoder(torch.nn.Module):
    """T3's transformer over a static KV cache of `max_batch` slots; GPT-2 (Turbo) or Llama (standard,
    Multilingual, whose slots hold a conditional and an unconditional row for CFG).

    `prefill` writes one slot's prompt; `step` advances every row by one position. Both return the final
    hidden state of each row's last position in float32. Layers use the checkpoint's own weights: Llama's
    q/k/v and gate/up projections are fused into one matrix each, and the checkpoint's modules are left
    holding views of it (nothing is copied unless quantized). The rotary tables and the cache are sized
    once, at construction, for the longest generation.
    """

    def __init__(
        self,
        tfmr: Any,
        rows_per_slot: int,
        options: DecodeOptions,
        capacity: int,
        probes: tuple[tuple[int, int], ...] = (),
    ):
        super().__init__()
        config = tfmr.config
        self.gpt2 = config.model_type == "gpt2"
        self.options, self.rows_per_slot = options, rows_per_slot
        self.heads = config.num_attention_heads
        self.dim = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or self.dim // self.heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.layer_count = config.num_hidden_layers
        self.layers = torch.nn.ModuleList(
            gpt2_layer(b) if self.gpt2 else llama_layer(b) for b in (tfmr.h if self.gpt2 else tfmr.layers)
        )
        self.final_norm = tfmr.ln_f if self.gpt2 else RMSNorm(tfmr.norm)
        self.positions = tfmr.wpe if self.gpt2 else None
        device = self.final_norm.weight.device
        if options.quantize == "int8":
            quantize_linears(self.layers, device.type)
        # Whether eager steps may leave out the idle slots past the last busy one.
        self.independent_rows = exact_at_any_row_count(self.layers)
        self.capacity = -(-capacity // CACHE_BUCKET) * CACHE_BUCKET
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.gpt2:
            cos, sin = tfmr.rotary_emb(
                torch.zeros(1, dtype=options.dtype, device=device), torch.arange(self.capacity, device=device)[None]
            )
            self.rope = (cos[0], sin[0])
        self.rows = options.max_batch * rows_per_slot
        self.cache = KVCache(
            self.layer_count, self.rows, self.kv_heads, self.head_dim, self.capacity, options.dtype, device
        )
        self.all_rows = torch.arange(self.rows, device=device)[:, None]
        # (layer, head) pairs whose attention the alignment monitor reads: each slot's conditional row.
        self.probes = probes
        self.probe_rows = torch.zeros(len(probes), options.max_batch, self.capacity, device=device)
        self.prefill_probes: dict[tuple[int, int], torch.Tensor] = {}  # the last prefill chunk's rows

    def forward(
        self,
        embeds: torch.Tensor,
        rows: slice,
        positions: torch.Tensor,
        attend_rows: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Write `positions` ([r or 1, T]) of cache `rows` from embeds [r, T, dim] and return each row's last
        hidden state; `attend_rows(layer, q, keys, values)` attends q over those rows' whole cache."""
        x = embeds.to(self.options.dtype)
        b, t, _ = x.shape
        row_index = self.all_rows[rows]
        if self.positions is not None:
            x = x + self.positions(positions)
        rope = None if self.rope is None else (self.rope[0][positions], self.rope[1][positions])
        for index, layer in enumerate(cast("list[torch.nn.ModuleDict]", self.layers)):
            qkv = layer["qkv"](layer["norm1"](x))
            q = qkv[..., : self.heads * self.head_dim].view(b, t, self.heads, self.head_dim)
            kv = qkv[..., self.heads * self.head_dim :].view(b, t, 2, self.kv_heads, self.head_dim)
            if rope is not None:
                if self.kv_heads == self.heads:  # queries and keys side by side: rotated together
                    qk = rotate(
                        qkv[..., : 2 * self.heads * self.head_dim].view(b, t, 2, self.heads, self.head_dim), *rope
                    )
                    q, keys = qk[:, :, 0], qk[:, :, 1]
                else:
                    q, keys = rotate(q, *rope), rotate(kv[:, :, 0], *rope)
                kv = torch.stack((keys, kv[:, :, 1]), dim=2)
            q = q.transpose(1, 2)
            self.cache.write(index, row_index, positions, kv)
            keys, values = self.cache.layers[index][:, rows]
            out = attend_rows(index, q, keys, values)
            x = x + layer["out"](out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
            h = layer["norm2"](x)
            if self.gpt2:
                x = x + layer["down"](F.gelu(layer["up"](h), approximate="tanh"))
            else:
                gate, up = layer["gate_up"](h).chunk(2, dim=-1)
                x = x + layer["down"](F.silu(gate) * up)
        return self.final_norm(x[:, -1]).float()

    def _probed_heads(self, layer: int) -> list[tuple[int, int]]:
        """(index in probe_rows, head) of each probed head in this layer."""
        return [(n, head) for n, (probed, head) in enumerate(self.probes) if probed == layer]

    def _grouped(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_heads == self.heads:
            return keys, values
        groups = self.heads // self.kv_heads  # grouped-query attention
        return keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)

    def prefill(self, embeds: torch.Tensor, slot: int, start: int = 0) -> torch.Tensor:
        """Write prompt positions [start, start + T) of one slot (embeds [rows_per_slot, T, dim])."""
        count = embeds.shape[1]
        end = start + count
        mask = prompt_mask(start, count, embeds.device)

        def attend_rows(index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            keys, values = self._grouped(keys[:, :, :end], values[:, :, :end])
            for _, head in self._probed_heads(index):
                rows = attention_probs(q[:1, head : head + 1], keys[:1, head : head + 1], mask, True)[0, 0]
                # Indexed by position, as the monitor reads it: rows of earlier chunks stay zero.
                self.prefill_probes[(index, head)] = F.pad(rows, (0, 0, start, 0)) if start else rows
            return attend(q, keys, values, mask, True, self.options.attention)

        rows = slice(slot * self.rows_per_slot, (slot + 1) * self.rows_per_slot)
        positions = torch.arange(start, end, device=embeds.device)[None]
        return self(embeds, rows, positions, attend_rows)

    def step(self, embeds: torch.Tensor, positions: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Every row's next position (embeds [rows, 1, dim], positions [rows]), eagerly: each slot attends
        over exactly its own `lengths[slot]` positions (0: idle, skipped), as it would alone. Rows past
        the last busy slot are left out (zeros out) when that cannot change the others' arithmetic;
        otherwise every row is computed, busy or not."""
        per_slot = self.rows_per_slot
        slots = [(slice(s * per_slot, (s + 1) * per_slot), n, s) for s, n in enumerate(lengths) if n]
        count = self.rows
        if self.independent_rows and slots:
            count = slots[-1][0].stop

        def attend_rows(index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(q)
            for rows, length, slot in slots:
                slot_keys, slot_values = self._grouped(keys[rows, :, :length], values[rows, :, :length])
                out[rows] = attend(q[rows], slot_keys, slot_values, None, False, self.options.attention)
                for n, head in self._probed_heads(index):
                    self.probe_rows[n, slot, :length] = attention_probs(
                        q[rows.start : rows.start + 1, head : head + 1], slot_keys[:1, head : head + 1], None, False
                    )[0, 0, 0]
            return out

        if count == self.rows:
            return self(embeds, slice(0, self.rows), positions[:, None], attend_rows)
        hidden = torch.zeros(self.rows, self.dim, device=embeds.device)
        hidden[:count] = self(embeds[:count], slice(0, count), positions[:count, None], attend_rows)
        return hidden

    def masked_step(self, embeds: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """The static-shape step: every row attends over the first `length` cache positions (a bucket
        boundary) through one mask, so graphs and compiled code see a handful of shapes."""
        mask = step_mask(positions, length, self.options.dtype)
        conditional = slice(0, self.rows, self.rows_per_slot)

        def attend_rows(index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            keys, values = self._grouped(keys[:, :, :length], values[:, :, :length])
            for n, head in self._probed_heads(index):
                self.probe_rows[n, :, :length] = attention_probs(
                    q[conditional, head : head + 1], keys[conditional, head : head + 1], mask[conditional], False
                )[:, 0, 0]
            return attend(q, keys, values, mask, False, self.options.attention)

        return self(embeds, slice(0, self.rows), positions[:, None], attend_rows)


class RMSNorm(torch.nn.Module):
    """Llama's RMS norm as one fused kernel (HF's module runs six), over the checkpoint's own weight."""

    def __init__(self, norm: Any):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [B, T, ..., D] (cos, sin: [B or 1, T, D]), as HF's Llama applies it."""
    shape = (*cos.shape[:2], *[1] * (x.dim() - 3), cos.shape[-1])
    cos, sin = cos.view(shape), sin.view(shape)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def fuse_linears(*linears: torch.nn.Linear) -> torch.nn.Linear:
    """One Linear computing several (same input) at once; the originals are left holding views of its weight."""
    first = linears[0]
    weight = torch.cat([m.weight.detach() for m in linears])
    fused = torch.nn.Linear(first.in_features, weight.shape[0], bias=False, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if any(m.bias is not None for m in linears):
        raise ValueError("fuse_linears: biased projections are not expected in T3's Llama")
    start = 0
    for m in linears:
        m.weight = torch.nn.Parameter(weight[start : start + m.out_features], requires_grad=False)
        start += m.out_features
    return fused


def bucket_length(position: int, capacity: int) -> int:
    """The static attention length that covers `position`."""
    return min(-(-(position + 1) // CACHE_BUCKET) * CACHE_BUCKET, capacity)


class RowScaledInt8Linear(torch.nn.Module):
    """A Linear in int8 (one weight scale per output row) whose activations get one scale per input row.

    PyTorch's dynamic int8 quantizes a whole batch with one activation scale, so a row's result would
    depend on the rows beside it. Here each row is scaled to [-1, 1] first, and a sentinel row pins the
    batch's range to exactly that, so every row is quantized alike; fbgemm's integer products are exact,
    and the row's own scale is applied after."""

    _sentinel: torch.Tensor  # a buffer

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        from torch.ao.quantization.observer import PerChannelMinMaxObserver

        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        observer(weight)
        scales, zero_points = observer.calculate_qparams()
        quantized = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer(
            "_sentinel",
            torch.tensor([1.0, -1.0]).repeat((self.in_features + 1) // 2)[None, : self.in_features],
            persistent=False,
        )

    def weight(self) -> torch.Tensor:
        """The quantized weight (qint8, one scale per output row)."""
        return torch.ops.quantized.linear_unpack(self._packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).float()
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
        scaled = torch.cat([x / scale, self._sentinel])
        y = torch.ops.quantized.linear_dynamic(scaled, self._packed, True)[:-1] * scale
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def exact_at_any_row_count(module: torch.nn.Module) -> bool:
    """Whether a row's arithmetic under `module` is the same however many rows are computed together:
    it is when every linear is row-scaled int8 (exact integer products, each row's own scale); a float
    matmul may sum in another order for another row count."""
    linears = [m for m in module.modules() if isinstance(m, (torch.nn.Linear, RowScaledInt8Linear))]
    return all(isinstance(m, RowScaledInt8Linear) for m in linears)


def quantize_linears(module: torch.nn.Module, device: str) -> None:
    """Swap every Linear under `module` for an int8 one, in place: row-scaled int8 on CPU (the
    checkpoint's own float modules stay), bitsandbytes on CUDA (their float weights are freed)."""
    if device == "cuda":
        quantize_bitsandbytes(module)
    else:
        replace_linears(module, RowScaledInt8Linear)


class Float16Around(torch.nn.Module):
    """Runs a float16 module on inputs of any float dtype: bitsandbytes' int8 kernels take and give
    float16 (and fuse the bias only in float16), so casting here saves a kernel and a log line per call.
    T3's linear layers see normalized states and attention or MLP outputs, well within float16's range."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.float16)).to(x.dtype)


def quantize_bitsandbytes(module: torch.nn.Module) -> None:
    """Every Linear under `module` becomes bitsandbytes' LLM.int8 layer, quantized on its own device
    (one scale per weight row and per activation row, so batched rows stay independent), and its float
    weight's storage is freed, also under the checkpoint's modules that shared it: memory goes down, not up.

    threshold=0 drops LLM.int8's outlier columns, whose search syncs the host (`outliers.any()`,
    `argwhere`) and so cannot run inside a CUDA graph capture; eval mode keeps bitsandbytes on its
    inference path; the weights are quantized once, here."""
    import bitsandbytes as bnb

    def int8(child: torch.nn.Linear) -> torch.nn.Module:
        weight = child.weight.detach()
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        layer = bnb.nn.Linear8bitLt(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            has_fp16_weights=False,
            threshold=0.0,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
        if child.bias is not None:
            layer.bias = torch.nn.Parameter(child.bias.detach().to(torch.float16), requires_grad=False)
        layer.init_8bit_state()
        weight.untyped_storage().resize_(0)  # a view (GPT-2's transposed Conv1D, Llama's fused q/k/v) frees its base
        return Float16Around(layer.eval())

    replace_linears(module, int8)


def replace_linears(module: torch.nn.Module, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> None:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, make(child))
