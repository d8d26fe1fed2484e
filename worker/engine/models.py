"""The built-in models. None mixes samples within a batch, so accumulation is exact."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from app.jobs.spec import CnnSpec, MlpSpec, TinyGptSpec
from worker.engine.data_types import DataInfo
from worker.engine.errors import TrainingError


def _require(value: int | None, what: str, model: str) -> int:
    if value is None:
        raise TrainingError("invalid_spec", f"model {model!r} needs a data set with {what}")
    return value


def _outputs(info: DataInfo, model: str) -> int:
    """One output per class, or per float target for regression."""
    if info.target_size is not None:
        return info.target_size
    return _require(info.num_classes, "classes or regression targets", model)


def build_mlp(spec: MlpSpec, info: DataInfo) -> nn.Module:
    if info.input_shape is None:
        raise TrainingError("invalid_spec", "model 'mlp' needs a data set of features")
    widths = [math.prod(info.input_shape), *spec.hidden_sizes]
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in, width_out in itertools.pairwise(widths):
        layers += [nn.Linear(width_in, width_out), nn.GELU()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
    layers.append(nn.Linear(widths[-1], _outputs(info, "mlp")))
    return nn.Sequential(*layers)


def build_cnn(spec: CnnSpec, info: DataInfo) -> nn.Module:
    shape = info.input_shape
    if shape is None or len(shape) != 3:
        raise TrainingError("invalid_spec", "model 'cnn' needs images shaped C×H×W")
    channels_in, height, width = shape
    layers: list[nn.Module] = []
    for channels_out in spec.channels:
        layers += [
            nn.Conv2d(channels_in, channels_out, spec.kernel_size, padding=spec.kernel_size // 2),
            nn.GELU(),
        ]
        channels_in = channels_out
    layers += [
        nn.Flatten(),
        nn.Linear(channels_in * height * width, spec.hidden_size),
        nn.GELU(),
    ]
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    layers.append(nn.Linear(spec.hidden_size, _outputs(info, "cnn")))
    return nn.Sequential(*layers)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: TinyGptSpec) -> None:
        super().__init__()
        self.n_head = spec.n_head
        self.qkv = nn.Linear(spec.n_embd, 3 * spec.n_embd)
        self.proj = nn.Linear(spec.n_embd, spec.n_embd)
        self.dropout = spec.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (
            t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
            for t in (q, k, v)
        )
        # Causal attention over right-padded rows: real tokens never attend to padding,
        # so a sample's outputs do not depend on how long its micro-batch was padded.
        # Packed rows: `mask` is causal within each row and closed between rows.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, spec: TinyGptSpec) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(spec.n_embd)
        self.attention = CausalSelfAttention(spec)
        self.norm_2 = nn.LayerNorm(spec.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(spec.n_embd, 4 * spec.n_embd),
            nn.GELU(),
            nn.Linear(4 * spec.n_embd, spec.n_embd),
            nn.Dropout(spec.dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class TinyGpt(nn.Module):
    """A small decoder-only transformer (nanoGPT's shape, untied embeddings)."""

    def __init__(self, spec: TinyGptSpec, vocab_size: int) -> None:
        super().__init__()
        self.block_size = spec.block_size
        self.token_embedding = nn.Embedding(vocab_size, spec.n_embd)
        self.position_embedding = nn.Embedding(spec.block_size, spec.n_embd)
        self.dropout = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.norm = nn.LayerNorm(spec.n_embd)
        # Untied head: safetensors stores each tensor once, and shared storage would
        # need the slower save_model path.
        self.head = nn.Linear(spec.n_embd, vocab_size, bias=False)
        # The spec's activation_checkpointing (worker/engine/registry.py turns it on).
        self.activation_checkpointing = False

    def forward(
        self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [batch, tokens, vocabulary]. With `position_ids` (packed rows, each
        numbered from 0) every row attends only to itself and is embedded at its own
        positions: its logits are those it has alone."""
        length = tokens.shape[1]
        if length > self.block_size:
            raise TrainingError(
                "invalid_data",
                f"a sequence of {length} inputs exceeds block_size {self.block_size}",
            )
        mask = None
        if position_ids is None:
            positions = torch.arange(length, device=tokens.device)
        else:
            positions, mask = position_ids, packed_rows_mask(position_ids)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        # Only when there will be a backward to recompute for: evaluation runs as is.
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant: autograd's saved-tensor hooks drop what the block saves and run
            # it again when backward needs it, so gradients reach the parameters inside even
            # when x does not require them (a frozen embedding, LoRA). The default
            # preserve_rng_state=True replays the forward's RNG state, so the dropout masks
            # of the recomputation are the forward's: the same gradients bit for bit.
            x = checkpoint(block, x, mask, use_reentrant=False) if recompute else block(x, mask)
        return self.head(self.norm(x))


def packed_rows_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, tokens, tokens], True where a token may attend: causal, and only within
    its row, a row being a run of positions that starts at 0."""
    rows = (position_ids == 0).cumsum(dim=1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((rows[:, :, None] == rows[:, None, :]) & causal).unsqueeze(1)


def build_tiny_gpt(spec: TinyGptSpec, info: DataInfo) -> nn.Module:
    # A sequence of n tokens gives n-1 input positions, each needing a position embedding.
    if info.max_length is not None and info.max_length - 1 > spec.block_size:
        raise TrainingError(
            "invalid_spec",
            f"model.block_size must be at least dataset.max_length - 1 = {info.max_length - 1}, "
            f"not {spec.block_size}",
        )
    return TinyGpt(spec, _require(info.vocab_size, "a token vocabulary", "tiny-gpt"))
