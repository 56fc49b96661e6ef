"""Reduction of maximum inner product search (MIPS) to cosine similarity (paper eq. 6-8).

Following Chandar et al. 2016 (section 3.2, after Auvolat et al. 2015), all facts are first scaled
so that the largest norm is U < 1, then m components are appended:

    P(x) = [ s x ; 1/2 - ||s x||^2 ; 1/2 - ||s x||^4 ; ... ; 1/2 - ||s x||^(2^m) ]   (eq. 6-7)
    Q(q) = [ q ; 0 ; ... ; 0 ]                                                       (eq. 8)

with s = U / max_i ||x_i||.  Since ||P(x)||^2 = m/4 + ||s x||^(2^(m+1)) and ||s x|| <= U < 1, the
norm of P(x) is almost constant for moderate m, so

    argmax_x  q . x  =  argmax_x  Q(q) . P(x)  ~=  argmax_x  cos(Q(q), P(x)),

and MIPS becomes a cosine (spherical) nearest-neighbour search that spherical k-means can cluster.

Short names: x facts (N, D), q queries (B, D), U target max norm, m appended components.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["MipsTransform", "check_params", "fit_transform"]

# Slack for norms that exceed U by float rounding after scaling.
_NORM_SLACK = 1e-4


def check_params(U: float, m: int) -> None:
    """Raise ValueError unless 0 < U < 1 and m is an integer >= 0 (eq. 6-7)."""
    _validate(U, m)


def _validate(U: float, m: int, scale: float | None = None) -> None:
    if not isinstance(U, numbers.Real) or not (0.0 < float(U) < 1.0):
        raise ValueError(f"U={U!r}: must satisfy 0 < U < 1 (eq. 6)")
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
        raise ValueError(f"m={m!r}: must be an integer >= 0")
    if scale is not None and not (
        isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0.0
    ):
        raise ValueError(f"scale={scale!r}: must be finite and > 0")


@dataclass(frozen=True)
class MipsTransform:
    """The fitted transform P (facts) / Q (queries) of eq. 6-8.

    Attributes:
        U: target maximum norm of the scaled facts, 0 < U < 1.
        m: number of appended components.
        scale: s = U / max_norm, the factor applied to facts before eq. 7.
    """

    U: float
    m: int
    scale: float

    def __post_init__(self) -> None:
        _validate(self.U, self.m, self.scale)
        # Store plain Python numbers so to_dict() is JSON-serialisable.
        object.__setattr__(self, "U", float(self.U))
        object.__setattr__(self, "m", int(self.m))
        object.__setattr__(self, "scale", float(self.scale))

    def out_dim(self, d: int) -> int:
        """Dimension D + m of transformed vectors."""
        return d + self.m

    def facts(self, x: torch.Tensor) -> torch.Tensor:
        """P(x): (N, D) -> (N, D + m), eq. 6-7; not normalised.

        Raises ValueError if a scaled fact has norm > U (the transform was fitted on other data).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
        xs = x.to(torch.float32) * self.scale  # (N, D) eq. 6: max norm <= U
        norms = torch.linalg.vector_norm(xs, dim=1, keepdim=True)  # (N, 1)
        if norms.numel() and float(norms.max()) > self.U * (1.0 + _NORM_SLACK):
            raise ValueError(
                f"a scaled fact has norm {float(norms.max()):.6g} > U={self.U}: the transform "
                "was fitted with a max_norm smaller than this data's"
            )
        if self.m == 0:
            return xs
        # Powers ||x||^(2^i), i = 1..m, by repeated squaring (eq. 7).
        powers = []
        p = norms
        for _ in range(self.m):
            p = p * p
            powers.append(0.5 - p)
        return torch.cat([xs, *powers], dim=1)  # (N, D + m)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """Q(q): (B, D) -> (B, D + m) with m zeros appended, eq. 8; not normalised."""
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.ndim != 2:
            raise ValueError(f"q must be (B, D), got shape {tuple(q.shape)}")
        q = q.to(torch.float32)
        if self.m == 0:
            return q
        zeros = q.new_zeros((q.shape[0], self.m))  # (B, m)
        return torch.cat([q, zeros], dim=1)  # (B, D + m)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MipsTransform:
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict, got {type(d).__name__}")
        unknown = set(d) - {"U", "m", "scale"}
        missing = {"U", "m", "scale"} - set(d)
        if unknown or missing:
            raise ValueError(
                f"MipsTransform dict: missing keys {sorted(missing)}, "
                f"unknown keys {sorted(unknown)}"
            )
        return cls(U=float(d["U"]), m=int(d["m"]), scale=float(d["scale"]))


def fit_transform(max_norm: float, U: float = 0.75, m: int = 3) -> MipsTransform:
    """Fit the eq. 6-8 transform for facts whose largest L2 norm is ``max_norm``."""
    _validate(U, m)
    if not (isinstance(max_norm, numbers.Real) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm={max_norm!r}: must be finite and > 0")
    t = MipsTransform(U=float(U), m=int(m), scale=float(U) / float(max_norm))
    logger.debug("fitted MIPS transform %s (max_norm=%g)", t, max_norm)
    return t
