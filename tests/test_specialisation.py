"""The top-half routing share on hand-made masses."""

from __future__ import annotations

import torch

from demo.specialisation import top_half_share


def test_uniform_mass_gives_one_half() -> None:
    assert torch.allclose(top_half_share(torch.ones(3, 16)), torch.full((3,), 0.5))


def test_concentrated_mass_gives_one() -> None:
    mass = torch.zeros(1, 8)
    mass[0, [1, 5]] = 3.0
    assert torch.allclose(top_half_share(mass), torch.ones(1))


def test_partial_concentration() -> None:
    mass = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.allclose(top_half_share(mass), torch.tensor([0.7]))
