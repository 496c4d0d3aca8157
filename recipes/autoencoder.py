"""The fully connected MNIST auto-encoder (Hinton & Salakhutdinov 2006), a benchmark of Smith, Elsen & De (2020)."""

from __future__ import annotations

from torch import Tensor, nn


class FCAutoencoder(nn.Module):
    """784-1000-500-250-30 encoder and its mirror decoder (2.83M parameters), with ``activation`` between layers,
    a linear 30-unit code, and logits of the 784 pixels as output (train with
    :class:`lightning_sgd.recipes.AutoencoderModule`).

    Args:
        sizes: input size then the encoder's layer sizes; the decoder mirrors them.
        activation: ``"sigmoid"`` (the original), ``"relu"`` or ``"tanh"``.
    """

    def __init__(self, sizes: tuple[int, ...] = (784, 1000, 500, 250, 30), activation: str = "sigmoid") -> None:
        super().__init__()
        acts = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}.")
        dims = list(sizes) + list(sizes[-2::-1])  # 784 ... 30 ... 784
        layers: list[nn.Module] = []
        code_layer = len(sizes) - 2
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i != code_layer and i != len(dims) - 2:  # linear code, logits out
                layers.append(acts[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, 28, 28) -> (B, 784) logits
        return self.net(x.flatten(1))
