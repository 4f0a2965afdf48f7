"""``MHCSiteParams``: the new parameters of one rewritten residual site, and their initialisation."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import MHCConfig
from .ops import num_logits
from .ops.permutations import identity_logit, num_permutation_logits

# How far the identity init leans H_res towards the identity: logits c·I give a diagonal of
# e^c / (e^c + n - 1) (0.475 at n=4). A saturated (near-permutation) H_res has a near-zero Jacobian.
RES_DIAGONAL_LOGIT = 1.0


def pre_weights(n: int, favoured: int) -> torch.Tensor:
    """Non-uniform read weights summing to 1: stream ``favoured`` gets 2/(n+1), the others 1/(n+1).

    Uniform weights would leave every stream with the same gradient, so equal streams stay equal and
    ``H_res`` never learns (its gradient is zero while they are); favouring stream
    ``layer mod n`` (as the HC paper does) breaks that symmetry without changing the function.
    """
    w = torch.full((n,), 1.0 / (n + 1), dtype=torch.float64)
    w[favoured % n] = 2.0 / (n + 1)
    return w


def initial_bias(config: MHCConfig, site_index: int) -> torch.Tensor:
    """The bias ``[pre (n) | post (n) | res (n², row-major; n! under constraint="permutations")]``, float64, on the
    CPU whatever the default device (under ``torch.device("meta")`` it would hold no values to copy)."""
    with torch.device("cpu"):
        return _initial_bias(config, site_index)


def _initial_bias(config: MHCConfig, site_index: int) -> torch.Tensor:
    n = config.n
    pre, post = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    res = torch.zeros(n, n, dtype=torch.float64)
    if config.mode == "mhc":
        if config.init == "identity":
            w = pre_weights(n, site_index)
            pre = torch.log(w) - torch.log1p(-w)  # sigmoid(pre) = w
            res = RES_DIAGONAL_LOGIT * torch.eye(n, dtype=torch.float64)
        if config.constraint == "permutations":  # logits over the n! permutations, the identity first
            res = torch.zeros(num_permutation_logits(n) - 2 * n, dtype=torch.float64)
            if config.init == "identity":  # the same H_res as Sinkhorn's identity init
                diagonal = math.exp(RES_DIAGONAL_LOGIT) / (math.exp(RES_DIAGONAL_LOGIT) + n - 1)
                res[0] = identity_logit(n, diagonal)
        # "paper": b = 0: H_pre = 0.5, H_post = 2·sigmoid(0) = 1, H_res uniform.
    else:  # hc: the bias is the mapping itself (H = b + a·tanh(z))
        one_hot = torch.eye(n, dtype=torch.float64)[site_index % n]  # the HC paper's A_m
        pre = pre_weights(n, site_index) if config.init == "identity" else one_hot
        post = torch.ones(n, dtype=torch.float64)
        res = torch.eye(n, dtype=torch.float64)
    return torch.cat([pre, post, res.flatten()])


class MHCSiteParams(nn.Module):
    """Parameters of one mHC site: ``bias [n²+2n]``, and when dynamic ``phi [n·C, n²+2n]`` and ``alpha [3]``.

    Args:
        config: the conversion options (n, dynamic, mode, init).
        channels: C, the width of the residual stream at this site.
        site_index: the site's position in the model (chooses the favoured stream).
        module_path: the site's module path, kept for display.
    """

    def __init__(self, config: MHCConfig, channels: int, site_index: int, module_path: str = "",
                 device: torch.device | None = None):
        super().__init__()
        n = config.n
        m = num_permutation_logits(n) if config.constraint == "permutations" else num_logits(n)
        self.n, self.channels, self.module_path = n, channels, module_path
        self.site_index, self.mode, self.init, self.constraint = site_index, config.mode, config.init, config.constraint
        self.bias = nn.Parameter(torch.empty(m, device=device))
        if config.dynamic:
            self.alpha = nn.Parameter(torch.empty(3, device=device))
            self.phi = nn.Parameter(torch.empty(n * channels, m, device=device))
        else:
            self.register_parameter("alpha", None)
            self.register_parameter("phi", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise in place: the identity init keeps the converted model's function (``phi`` redrawn).

        Also what a meta-device workflow calls after ``to_empty()``.
        """
        config = MHCConfig(n=self.n, mode=self.mode, init=self.init, constraint=self.constraint)
        self.bias.copy_(initial_bias(config, self.site_index))
        if self.phi is not None:
            # alpha = 0 keeps the function exact at init while phi, small and random, gives the gates a
            # gradient from step 0 (breaking the stream symmetry). The paper states only a = 0.01.
            self.alpha.fill_(0.0 if self.init == "identity" else 0.01)
            if self.init == "paper" and self.mode == "hc":
                self.phi.zero_()  # the HC paper starts its dynamic weights at zero
            else:
                fan_in = self.phi.shape[0]
                self.phi.copy_(torch.randn(self.phi.shape, device=self.phi.device) / math.sqrt(fan_in))

    def extra_repr(self) -> str:
        return f"n={self.n}, channels={self.channels}, module_path={self.module_path!r}"
