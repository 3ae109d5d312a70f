"""Client-level differential privacy on the server: Gaussian noise on the clipped clients' mean, and the
privacy spent, from Opacus's RDP accountant (Mironov, "Rényi Differential Privacy", CSF 2017; the
subsampled Gaussian mechanism of Mironov, Talwar & Zhang, 2019) rather than a formula of our own.

Each round is one step of the subsampled Gaussian mechanism: clients_per_round of the training clients are
sampled (sample rate q), each update is clipped to C on the device, and noise of std σ·C is added to their
sum (σ·C/n to their mean). The accountant assumes Poisson sampling; metafleet samples a fixed number per
round, the usual approximation (as in DP-FedAvg, McMahan et al., ICLR 2018).
"""

from __future__ import annotations

import secrets

import torch

from metafleet.common.config import RunConfig
from metafleet.common.errors import MetafleetError
from metafleet.common.meta import Params
from metafleet.common.privacy import gaussian_noise_like


class PrivacyLedger:
    """Adds the noise and keeps the account; its state is the number of noised rounds (for a checkpoint)."""

    def __init__(self, config: RunConfig):
        try:
            from opacus.accountants import RDPAccountant
        except ImportError:
            raise MetafleetError(
                "differential privacy needs Opacus's accountant: pip install 'metafleet[dp]' (opacus)"
            ) from None
        self.config = config
        self.sample_rate = config.clients_per_round / config.training_clients
        self.accountant = RDPAccountant()
        self.rounds = 0

    def noised_mean(self, mean: Params, contributors: int) -> Params:
        """The mean of ``contributors`` clipped updates plus noise of std σ·C/contributors; counts the round."""
        std = self.config.dp_noise_multiplier * self.config.dp_clip_norm / contributors
        # From the OS's random source, never the run's seed: whoever knows the seed could subtract the noise.
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        noise = gaussian_noise_like(mean, std, generator)
        self.rounds += 1
        self._sync_accountant()
        return {name: value + noise[name] for name, value in mean.items()}

    def count_noised_round(self) -> None:
        """A round whose mean came noised from the devices (distributed DP): at least min_replies devices'
        shares, each of std σ·Δ/sqrt(min_replies), make the sum's noise std σ·Δ or more on sensitivity Δ:
        the same Gaussian mechanism of multiplier σ, accounted the same way (conservatively, as if exactly
        min_replies devices took part)."""
        self.rounds += 1
        self._sync_accountant()

    @property
    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.config.dp_delta)) if self.rounds else 0.0

    def _sync_accountant(self) -> None:
        self.accountant.history = [(self.config.dp_noise_multiplier, self.sample_rate, self.rounds)]

    def state_dict(self) -> dict[str, int]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.rounds = int(state["rounds"])
        self._sync_accountant()
