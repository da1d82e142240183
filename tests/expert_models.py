"""Stand-ins of the expert modules of real models (timm ``Mlp``, CogVLM's LLaMA MLP), shared by
the experts tests that convert them with ``from_experts``."""
from __future__ import annotations

from torch import nn


class TimmMlp(nn.Module):
    """timm.layers.Mlp (VLMo's mlp_text / mlp_imag / mlp_vl)."""

    def __init__(self, in_features, hidden_features, out_features=None, act_layer=nn.GELU, bias=True, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
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
