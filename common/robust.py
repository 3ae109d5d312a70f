"""Defences against poisoned devices: what ``--defense`` may say, parsed once for the server and the devices.

The aggregation rules themselves live on the server (``metafleet.server.defenses``); the one a device takes
part in is ``norm-bound`` with an explicit bound, where every honest device clips its update before sending
(before masking under SecAgg+, where the server sees only the sum).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFENSES = ("none", "median", "trimmed-mean", "krum", "multi-krum", "norm-bound", "rsa")
# The defences that read individual updates: SecAgg+ hides those from the server.
NEEDS_PLAINTEXT = ("median", "trimmed-mean", "krum", "multi-krum", "rsa")
TRIM_DEFAULT = 0.2  # trimmed-mean: the share cut from each end of every coordinate (Flower's FedTrimmedAvg)
ASSUMED_ATTACKERS_DEFAULT = 0.3  # krum / multi-krum: the share of a round's devices assumed malicious
RSA_VARIANTS = ("", "cluster", "consensus", "consensus-cluster")  # rsa's parameter is the position here


@dataclass(frozen=True)
class Defense:
    """A parsed ``--defense`` value. ``parameter``: trimmed-mean's cut per end, krum's assumed attacker share,
    norm-bound's bound (0: none given, the server clips to the round's median norm, plain path only), rsa's
    variant (its position in ``RSA_VARIANTS``)."""

    kind: str = "none"
    parameter: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Defense:
        kind, _, argument = (text or "none").strip().partition(":")
        if kind not in DEFENSES:
            raise ValueError(f"must be one of {', '.join(DEFENSES)} (trimmed-mean:B, krum:F, multi-krum:F and "
                             f"norm-bound:C take a number; rsa:cluster also drops the outlier cluster)")
        if kind == "rsa":
            if argument not in RSA_VARIANTS:
                raise ValueError("rsa takes no argument, or one of 'cluster' (drop the outlier cluster), 'consensus' "
                                 "(compare with the round's median dissimilarities, not the global model's), "
                                 "'consensus-cluster'")
            return cls(kind, float(RSA_VARIANTS.index(argument)))
        if kind in ("none", "median"):
            if argument:
                raise ValueError(f"{kind} takes no argument")
            return cls(kind)
        default = {"trimmed-mean": TRIM_DEFAULT, "krum": ASSUMED_ATTACKERS_DEFAULT,
                   "multi-krum": ASSUMED_ATTACKERS_DEFAULT, "norm-bound": 0.0}[kind]
        try:
            value = float(argument) if argument else default
        except ValueError:
            raise ValueError(f"{kind}'s argument must be a number") from None
        if kind == "trimmed-mean" and not 0 < value < 0.5:
            raise ValueError("trimmed-mean cuts a share in (0, 0.5) from each end")
        if kind in ("krum", "multi-krum") and not 0 <= value < 0.5:
            raise ValueError(f"{kind} assumes a share of attackers in [0, 0.5)")
        if kind == "norm-bound" and argument and not value > 0:
            raise ValueError("norm-bound's bound must be > 0")
        return cls(kind, value)

    @property
    def needs_plaintext(self) -> bool:
        return self.kind in NEEDS_PLAINTEXT

    @property
    def rsa_drops_outliers(self) -> bool:
        return self.kind == "rsa" and "cluster" in RSA_VARIANTS[int(self.parameter)]

    @property
    def rsa_consensus(self) -> bool:
        return self.kind == "rsa" and "consensus" in RSA_VARIANTS[int(self.parameter)]

    @property
    def device_bound(self) -> float | None:
        """The L2 bound every honest device clips its update to, if this defence sets one."""
        return self.parameter if self.kind == "norm-bound" and self.parameter > 0 else None


# Attacks exist in simulation only (metafleet.simulations.attacks); a device has no setting that makes it
# attack. They are named here so that a run's config, checked in one place, says which one it simulated.
ATTACKS = ("none", "label-flip", "sign-flip", "scale", "noise", "backdoor")
SIGN_FLIP_DEFAULT = 10.0  # 20 % of the devices at -10x reverse the mean of the other 80 %


@dataclass(frozen=True)
class Attack:
    """A parsed ``--attack`` value; ``scale`` is sign-flip's S."""

    kind: str = "none"
    scale: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Attack:
        kind, _, argument = (text or "none").strip().partition(":")
        if kind not in ATTACKS:
            raise ValueError(f"must be one of {', '.join(ATTACKS)} (sign-flip:S takes a factor)")
        if kind != "sign-flip":
            if argument:
                raise ValueError(f"{kind} takes no argument")
            return cls(kind)
        try:
            scale = float(argument) if argument else SIGN_FLIP_DEFAULT
        except ValueError:
            raise ValueError("sign-flip's factor must be a number, as sign-flip:10") from None
        if not 0 < scale < 1e6:
            raise ValueError("sign-flip's factor must be > 0 (the device sends -S times its update)")
        return cls(kind, scale)

    @property
    def active(self) -> bool:
        return self.kind != "none"
