"""Stand-ins of the expert modules of real models (timm ``Mlp``, CogVLM's LLaMA MLP, torchscale's
``FeedForwardNetwork`` and ``MultiwayNetwork``), shared by the experts tests that convert them with
``from_experts``, and of torchscale's multiway encoder (attention, layer, encoder as BEiT-3 runs them)
for the torchscale integration tests: same attribute names, same forward."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class TimmMlp(nn.Module):
    """timm.layers.Mlp (VLMo's mlp_text / mlp_imag / mlp_vl)."""

    def __init__(self, in_features, hidden_features, out_features=None, act_layer=nn.GELU, bias=True, drop=0.0,
                 norm_layer=None):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class LlamaMLP(nn.Module):
    """CogVLM's MLP (= LLaMA MLP): down_proj(act_fn(gate_proj(x)) * up_proj(x)), no biases, SiLU."""

    def __init__(self, hidden_size, intermediate_size, act_fn=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = nn.SiLU() if act_fn is None else act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TorchscaleFFN(nn.Module):
    """torchscale.component.feedforward_network.FeedForwardNetwork (VLMo/BEiT-3 in torchscale)."""

    def __init__(self, embed_dim, ffn_dim, activation_fn="gelu", dropout=0.0, subln=False, layernorm_eps=1e-5):
        super().__init__()
        self.embed_dim = embed_dim
        self.activation_fn = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}[activation_fn]
        self.activation_dropout_module = nn.Dropout(dropout)
        self.dropout_module = nn.Dropout(dropout)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=layernorm_eps) if subln else None

    def forward(self, x):
        x_shape = x.shape
        x = x.reshape(-1, x.size(-1))
        x = self.fc1(x)
        x = self.activation_fn(x.float()).type_as(x)
        x = self.activation_dropout_module(x)
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        x = self.fc2(x)
        x = x.view(x_shape)
        return self.dropout_module(x)


class MultiwayNetwork(nn.Module):
    """torchscale.component.multiway_network.MultiwayNetwork: A for positions < split_position, B after."""

    def __init__(self, module, dim=1):
        super().__init__()
        self.dim = dim
        self.A = module
        self.B = copy.deepcopy(module)
        for m in self.B.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        self.split_position = -1

    def forward(self, x):
        if self.split_position == -1:
            return self.A(x)
        if self.split_position == 0:
            return self.B(x)
        x1, x2 = torch.split(x, [self.split_position, x.size(self.dim) - self.split_position], dim=self.dim)
        return torch.cat([self.A(x1), self.B(x2)], dim=self.dim)


class TorchscaleAttention(nn.Module):
    """torchscale.component.multihead_attention.MultiheadAttention as BEiT-3 runs it: self-attention,
    multiway=True (q/k/v/out projections and subln's inner_attn_ln in MultiwayNetworks), no xpos, no
    relative position bias, no attention dropout. key_padding_mask [B, S]: True = padding."""

    def __init__(self, embed_dim, num_heads, layernorm_eps=1e-5):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.k_proj = MultiwayNetwork(nn.Linear(embed_dim, embed_dim))
        self.v_proj = MultiwayNetwork(nn.Linear(embed_dim, embed_dim))
        self.q_proj = MultiwayNetwork(nn.Linear(embed_dim, embed_dim))
        self.out_proj = MultiwayNetwork(nn.Linear(embed_dim, embed_dim))
        self.inner_attn_ln = MultiwayNetwork(nn.LayerNorm(embed_dim, eps=layernorm_eps))

    def forward(self, query, key, value, key_padding_mask=None):
        bsz, tgt_len, embed_dim = query.size()
        q = self.q_proj(query) * self.scaling
        k, v = self.k_proj(key), self.v_proj(value)
        q, k, v = (t.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        w = q @ k.transpose(-1, -2)                                           # [B, heads, S, S]
        if key_padding_mask is not None:
            w = w.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
        w = torch.softmax(w, dim=-1)  # torchscale: softmax in float32 (the same for float32 inputs)
        attn = (w @ v).transpose(1, 2).reshape(bsz, tgt_len, embed_dim)
        return self.out_proj(self.inner_attn_ln(attn)), w


class TorchscaleEncoderLayer(nn.Module):
    """torchscale.architecture.encoder.EncoderLayer with multiway=True, normalize_before=True (pre-LN),
    subln FFN, no MoE, no drop path, no deepnorm (residual scale 1)."""

    def __init__(self, embed_dim, num_heads, ffn_dim, layernorm_eps=1e-5, subln=True):
        super().__init__()
        self.self_attn = TorchscaleAttention(embed_dim, num_heads, layernorm_eps)
        self.self_attn_layer_norm = MultiwayNetwork(nn.LayerNorm(embed_dim, eps=layernorm_eps))
        self.ffn = MultiwayNetwork(TorchscaleFFN(embed_dim, ffn_dim, subln=subln, layernorm_eps=layernorm_eps))
        self.final_layer_norm = MultiwayNetwork(nn.LayerNorm(embed_dim, eps=layernorm_eps))

    def forward(self, x, encoder_padding_mask=None):
        residual = x
        x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask)
        x = residual + x
        residual = x
        x = self.ffn(self.final_layer_norm(x))
        return residual + x


class TorchscaleEncoder(nn.Module):
    """torchscale's Encoder body (multiway, pre-LN): the layers, then a multiway layer_norm."""

    def __init__(self, embed_dim, num_heads, ffn_dim, layers=1, layernorm_eps=1e-5):
        super().__init__()
        self.layers = nn.ModuleList(TorchscaleEncoderLayer(embed_dim, num_heads, ffn_dim, layernorm_eps)
                                    for _ in range(layers))
        self.layer_norm = MultiwayNetwork(nn.LayerNorm(embed_dim, eps=layernorm_eps))

    def forward(self, x, encoder_padding_mask=None):
        for layer in self.layers:
            x = layer(x, encoder_padding_mask)
        return self.layer_norm(x)
