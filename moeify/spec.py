"""The declarative conversion spec: what a recipe's `moe:` section maps onto one-to-one."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConversionError

SCOPES = ("auto", "hidden", "branches", "paper")
ROUTERS = ("layer", "global")
CUTS = ("copies", "all")


@dataclass(frozen=True)
class MoESpec:
    """How to turn a dense CNN into an MoE-CNN.

    experts: N, the number of equal contiguous channel groups per MoE layer.
    top_k: K, experts kept per sample (default N // 2, the paper's ratio 0.5).
    scope: which channel groups become MoE: ``hidden`` (never touch a residual stream),
        ``branches`` (also residual-branch outputs that are only added into the stream),
        ``paper`` (the AdvMoE layer set: ``branches`` without the first conv), or ``auto`` (the
        default: ``hidden`` where it saves MACs, else ``branches``; the plan says which and why).
    router: ``layer`` (one router per MoE layer, on that layer's input) or ``global``
        (one router on the image shared by every layer, as in the released AdvMoE code).
    router_norm: layer routers standardise their pooled input with running statistics before
        the linear layer (off: the paper's router). Pooled CNN features share a large mean across
        images, so an unnormalised router's scores move together for every input and collapse
        onto one expert; standardised, they follow what differs between images.
    cuts: which layers whose channels are shared out are cut into parts (graph/cuts.py):
        ``copies`` (the default: a layer writing or reading one group's channels twice, as in
        gated MLPs and GhostNet) or ``all`` (also layers whose output is split among several
        consumers, or that read several groups at once: fewer MACs, but on the CPU more, smaller
        contractions that can run slower than the dense layer; docs/coverage.md).
    layers: optional glob patterns of producer names to convert (others stay dense).
    exclude: glob patterns of producer names to keep dense.
    """

    experts: int
    top_k: int | None = None
    scope: str = "auto"
    router: str = "layer"
    router_norm: bool = False
    cuts: str = "copies"
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.experts, bool) or not isinstance(self.experts, int) or self.experts < 1:
            raise ConversionError(f"experts must be an integer >= 1, got {self.experts!r}")
        if self.top_k is None:
            object.__setattr__(self, "top_k", max(1, self.experts // 2))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConversionError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_k > self.experts:
            raise ConversionError(
                f"top_k ({self.top_k}) cannot exceed experts ({self.experts}); use top_k <= {self.experts}"
            )
        if self.scope not in SCOPES:
            raise ConversionError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.router not in ROUTERS:
            raise ConversionError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.cuts not in CUTS:
            raise ConversionError(f"unknown cuts {self.cuts!r}; choose one of {', '.join(CUTS)}")
        if not isinstance(self.router_norm, bool):
            raise ConversionError(f"router_norm must be true or false, got {self.router_norm!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoESpec":
        known = {"experts", "top_k", "scope", "router", "router_norm", "cuts", "layers", "exclude"}
        unknown = set(d) - known
        if unknown:
            raise ConversionError(f"unknown MoE spec key(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        kw = dict(d)
        if kw.get("layers") is not None:
            kw["layers"] = tuple(kw["layers"])
        if "exclude" in kw:
            kw["exclude"] = tuple(kw["exclude"] or ())
        return cls(**kw)
