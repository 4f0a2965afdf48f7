"""mHC-lite's identity init (``identity_logit``) at and near the edge of what a logit on the identity can reach.

With the other permutations' logits at 0, the diagonal of the mixture is ``(E + (n-1)! - 1) / (E + n! - 1)`` for
``E = e^c``: any value above ``((n-1)! - 1) / (n! - 1)`` (E > 0), including values below the uniform mixture's
``1/n`` (a negative logit). The mixture is written out index by index (tests/paper.py).
"""

import math
import re

import pytest
import torch

from mhc_rewrite.ops.permutations import identity_logit

import paper
from tolerances import assert_close


def _mixture_diagonal(logit_on_identity: float, n: int) -> torch.Tensor:
    logits = torch.zeros(math.factorial(n), dtype=torch.float64)
    logits[0] = logit_on_identity  # itertools order: the identity first
    return torch.diagonal(paper.permutation_mixture(logits, n))


# (3, 0.25) lies below the uniform mixture's 1/3 and above the lowest, 0.2: a negative logit reaches it
@pytest.mark.parametrize("n,diagonal", [(3, 0.25), (3, 0.3), (3, 0.9), (4, 0.23), (2, 0.6)])
def test_the_logit_gives_the_asked_diagonal(n, diagonal):
    c = identity_logit(n, diagonal)
    assert_close(_mixture_diagonal(c, n), torch.full((n,), diagonal, dtype=torch.float64), "float64", torch.float64)


# E = 0 exactly, then below; all weight on the identity (a division by zero before), then above
@pytest.mark.parametrize("n,diagonal", [(2, 0.0), (3, 0.2), (3, 0.1), (3, 1.0), (4, 1.5)])
def test_a_diagonal_no_logit_reaches_is_refused(n, diagonal):
    lowest = (math.factorial(n - 1) - 1) / (math.factorial(n) - 1)  # the mixture's diagonal with the identity at 0
    message = f"no logit on the identity gives a diagonal of {diagonal}: at n={n} it must lie strictly between {lowest}"
    with pytest.raises(ValueError, match=re.escape(message)):
        identity_logit(n, diagonal)

