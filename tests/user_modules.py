"""A zoo of LightningModules written the way their authors write them, for the drop-in tests.

None of these implements the optional ``split_batch``/``forward``/``loss`` protocol (except the two ``protocol_*``
kinds, which exist to test the one feature that needs it): their ``training_step`` is the only place the loss is
defined, their batches are tuples, dicts, a ``UserDict`` like transformers' ``BatchEncoding`` or a bare tensor, and
they contain what real models contain (dropout, BatchNorm, LayerNorm, ``nn.MultiheadAttention``,
``F.scaled_dot_product_attention``, GRU/LSTM, tied weights, broadcast position ids, manual optimization).

Every module exists for both Lightning packages: :func:`make` builds the class on ``pytorch_lightning``'s or on
``lightning.pytorch``'s ``LightningModule`` (Lightning's own demo modules are imported from that package's
``demos``). Models are tiny and data is random, so a fit of a few steps takes well under a second on one CPU core.

Sources: Lightning's ``demos.boring_classes.BoringModel`` and ``demos.transformer.LightningTransformer``; the
``LitAutoEncoder`` of the Lightning README/docs; the GAN of Lightning's ``basic_gan.py`` example; nanoGPT's
``model.py`` (Karpathy); HuggingFace's ``BertEmbeddings``/``BertPooler`` and ``model(**batch).loss`` convention.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections import UserDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["KINDS", "PACKAGES", "HAS_BATCHNORM", "HAS_VALIDATION_STEP", "BatchEncoding", "make", "make_dataset",
           "make_loader", "make_datamodule"]

#: The two Lightning packages a user may import.
PACKAGES = ("pytorch_lightning", "lightning.pytorch")

#: Every module kind :func:`make` builds.
KINDS = ("boring", "transformer", "autoencoder", "hf_dict", "hf_batchencoding", "bert", "nanogpt", "nanogpt_tied",
         "bn_cnn", "gru", "lstm", "gan", "protocol_logits", "protocol_logprobs")

#: Kinds with BatchNorm layers (the ones ghost batch norm applies to).
HAS_BATCHNORM = frozenset({"bn_cnn", "gan"})

#: Kinds whose author wrote a ``validation_step`` (the README autoencoder, the demo transformer and the GAN did not).
HAS_VALIDATION_STEP = frozenset(set(KINDS) - {"transformer", "autoencoder", "gan"})

BATCH_SIZE = 8  # examples per training batch
VOCAB, SEQ = 16, 8  # token models: vocabulary and sequence length


# ------------------------------------------------------------------------------------------ HuggingFace-style parts
class BatchEncoding(UserDict):
    """What a HuggingFace tokenizer/collator returns: a ``UserDict`` (not a ``dict``) with attribute access and
    ``.to(device)``, as ``transformers.BatchEncoding``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        self.data = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.data.items()}
        return self


@dataclass
class SequenceClassifierOutput:
    """``transformers.modeling_outputs.SequenceClassifierOutput``: the loss and the logits."""

    loss: Tensor | None = None
    logits: Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class TinyModelForSequenceClassification(nn.Module):
    """A HuggingFace-style ``...ForSequenceClassification``: ``model(input_ids, attention_mask, labels)`` returns an
    output object with ``.loss`` and ``.logits`` (embeddings, dropout, masked mean pooling, a classifier head)."""

    def __init__(self, vocab_size: int = VOCAB, hidden: int = 16, num_labels: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.dense = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        self.num_labels = num_labels

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.layer_norm(torch.tanh(self.dense(self.embeddings(input_ids))))  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class TinyBert(nn.Module):
    """BERT-style encoder classifier: word + position embeddings (position ids ``(1, T)``, broadcast over the batch),
    LayerNorm, dropout, one ``nn.TransformerEncoderLayer`` with a key-padding mask, [CLS] pooling (``BertPooler``)."""

    def __init__(self, vocab_size: int = VOCAB, hidden: int = 16, heads: int = 2, max_position: int = 32,
                 num_labels: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_position, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout,
                                                  batch_first=True)
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        t = input_ids.size(1)
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0)  # (1, T)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (B, T, H)
        x = self.dropout(self.layer_norm(x))
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # [CLS]
        return self.classifier(self.dropout(pooled))


# --------------------------------------------------------------------------------------------- nanoGPT-style parts
@dataclass
class GPTConfig:
    block_size: int = SEQ  # longest sequence
    vocab_size: int = VOCAB
    n_layer: int = 1
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.1
    bias: bool = True
    tie_weights: bool = False  # nanoGPT ties wte and lm_head; the untied variant is the default here


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd), nn.Dropout(config.dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        device = idx.device
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


# ------------------------------------------------------------------------------------------------ GAN parts
class Generator(nn.Module):
    def __init__(self, latent_dim: int, img_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.img_shape = img_shape

        def block(in_feat: int, out_feat: int, normalize: bool = True) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(in_feat, out_feat)]
            if normalize:
                layers.append(nn.BatchNorm1d(out_feat, 0.8))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.model = nn.Sequential(*block(latent_dim, 16, normalize=False), *block(16, 32),
                                   nn.Linear(32, int(math.prod(img_shape))), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        img = self.model(z)
        return img.view(img.size(0), *self.img_shape)


class Discriminator(nn.Module):
    def __init__(self, img_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(int(math.prod(img_shape)), 32), nn.LeakyReLU(0.2, inplace=True),
                                   nn.Linear(32, 16), nn.LeakyReLU(0.2, inplace=True), nn.Linear(16, 1), nn.Sigmoid())

    def forward(self, img: Tensor) -> Tensor:
        return self.model(img.view(img.size(0), -1))


# ------------------------------------------------------------------------------------------------ the modules
# Each body below is a LightningModule as its author writes it; :func:`_classes` puts one package's LightningModule
# under it (``class X(Body, LightningModule)``), so ``self.log``, ``self.optimizers()`` etc. are that package's.
class LitAutoEncoder(nn.Module):
    """The Lightning README's autoencoder, verbatim (``forward`` returns the embedding, not the loss's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 28 * 28))

    def forward(self, x: Tensor) -> Tensor:
        # in lightning, forward defines the prediction/inference actions
        embedding = self.encoder(x)
        return embedding

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        # training_step defines the train loop. It is independent of forward
        x, y = batch
        x = x.view(x.size(0), -1)
        z = self.encoder(x)
        x_hat = self.decoder(z)
        loss = F.mse_loss(x_hat, x)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        return optimizer


class HFDictModule(nn.Module):
    """A HuggingFace-style fine-tuning module: dict batches, ``outputs = self.model(**batch)``, ``outputs.loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyModelForSequenceClassification()

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        outputs = self.model(**batch)
        self.log("train_loss", outputs.loss)
        return {"loss": outputs.loss}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        outputs = self.model(**batch)
        preds = outputs["logits"].argmax(-1)
        self.log("val_loss", outputs["loss"])
        self.log("val_acc", (preds == batch["labels"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=5e-4, weight_decay=0.01)


class BertClassifier(nn.Module):
    """A BERT-style classifier; the batch carries ``position_ids`` of shape ``(1, T)`` (a packing collator's)."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = TinyBert()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        return self.bert(input_ids, attention_mask, position_ids)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (logits.argmax(-1) == batch["labels"]).float().mean())
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        self.log("val_loss", F.cross_entropy(logits, batch["labels"]))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=2e-4)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=100)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class NanoGPTModule(nn.Module):
    """nanoGPT in a LightningModule: ``logits, loss = self.model(x, y)``."""

    tie_weights = False

    def __init__(self) -> None:
        super().__init__()
        self.model = GPT(GPTConfig(tie_weights=self.tie_weights))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        self.log("val/loss", loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=6e-4, betas=(0.9, 0.95))


class TiedNanoGPTModule(NanoGPTModule):
    """nanoGPT with its token embedding tied to the LM head (as nanoGPT ships)."""

    tie_weights = True


class BNConvNet(nn.Module):
    """A small CNN with BatchNorm2d and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(torch.flatten(self.features(x), 1)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log_dict({"val_loss": F.cross_entropy(logits, y), "val_acc": (logits.argmax(1) == y).float().mean()})

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)]


class RNNClassifier(nn.Module):
    """A recurrent sequence classifier on ``(B, T, F)`` features: the last hidden state through a linear head."""

    rnn_type: type[nn.Module] = nn.GRU

    def __init__(self, features: int = 4, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.rnn = self.rnn_type(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (B, T, hidden)
        return self.head(out[:, -1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class LSTMClassifier(RNNClassifier):
    rnn_type = nn.LSTM


class GAN(nn.Module):
    """Lightning's GAN example (``basic_gan.py``): manual optimization, two Adam optimizers, toggled."""

    def __init__(self, channels: int = 1, width: int = 4, height: int = 4, latent_dim: int = 8, lr: float = 0.0002,
                 b1: float = 0.5, b2: float = 0.999) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        data_shape = (channels, width, height)
        self.generator = Generator(latent_dim=self.hparams.latent_dim, img_shape=data_shape)
        self.discriminator = Discriminator(img_shape=data_shape)

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def adversarial_loss(self, y_hat: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy(y_hat, y)

    def training_step(self, batch: tuple[Tensor, Tensor]) -> None:
        imgs, _ = batch
        optimizer_g, optimizer_d = self.optimizers()
        # sample noise
        z = torch.randn(imgs.shape[0], self.hparams.latent_dim)
        z = z.type_as(imgs)

        # train generator
        self.toggle_optimizer(optimizer_g)
        self.generated_imgs = self(z)
        valid = torch.ones(imgs.size(0), 1).type_as(imgs)  # ground truth result (ie: all fake)
        g_loss = self.adversarial_loss(self.discriminator(self.generated_imgs), valid)
        self.log("g_loss", g_loss, prog_bar=True)
        self.manual_backward(g_loss)
        optimizer_g.step()
        optimizer_g.zero_grad()
        self.untoggle_optimizer(optimizer_g)

        # train discriminator: how well can it label as real from generated samples?
        self.toggle_optimizer(optimizer_d)
        valid = torch.ones(imgs.size(0), 1).type_as(imgs)
        real_loss = self.adversarial_loss(self.discriminator(imgs), valid)
        fake = torch.zeros(imgs.size(0), 1).type_as(imgs)
        fake_loss = self.adversarial_loss(self.discriminator(self(z).detach()), fake)
        d_loss = (real_loss + fake_loss) / 2
        self.log("d_loss", d_loss, prog_bar=True)
        self.manual_backward(d_loss)
        optimizer_d.step()
        optimizer_d.zero_grad()
        self.untoggle_optimizer(optimizer_d)

    def configure_optimizers(self) -> Any:
        lr, b1, b2 = self.hparams.lr, self.hparams.b1, self.hparams.b2
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(b1, b2))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(b1, b2))
        return [opt_g, opt_d], []


class ProtocolClassifier(nn.Module):
    """A module that implements the optional protocol (``split_batch``/``forward``/``loss``): an MLP on logits with
    cross-entropy, the case the generalized Gauss-Newton needs."""

    def __init__(self, features: int = 10, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def split_batch(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return batch[0], batch[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = self.split_batch(batch)
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = self.split_batch(batch)
        self.log("val_loss", self.loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LogProbProtocolClassifier(ProtocolClassifier):
    """The protocol with ``forward`` returning log-probabilities and ``loss`` = ``nll_loss`` (linear in the outputs),
    as the demo transformer and many classic PyTorch examples write it."""

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.net(x), dim=-1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.nll_loss(outputs, targets)


_BODIES: dict[str, type[nn.Module]] = {
    "autoencoder": LitAutoEncoder,
    "hf_dict": HFDictModule,
    "hf_batchencoding": HFDictModule,
    "bert": BertClassifier,
    "nanogpt": NanoGPTModule,
    "nanogpt_tied": TiedNanoGPTModule,
    "bn_cnn": BNConvNet,
    "gru": RNNClassifier,
    "lstm": LSTMClassifier,
    "gan": GAN,
    "protocol_logits": ProtocolClassifier,
    "protocol_logprobs": LogProbProtocolClassifier,
}


@functools.cache
def _classes(package: str) -> dict[str, type]:
    """The zoo's LightningModule classes on ``package``'s ``LightningModule`` (built once per package)."""
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {PACKAGES}, got {package!r}")
    lightning = importlib.import_module(package)
    boring = importlib.import_module(f"{package}.demos.boring_classes")
    demo = importlib.import_module(f"{package}.demos.transformer")
    built = {body: type(body.__name__, (body, lightning.LightningModule), {"__module__": __name__})
             for body in set(_BODIES.values())}
    classes: dict[str, type] = {kind: built[body] for kind, body in _BODIES.items()}

    class SmallLightningTransformer(demo.LightningTransformer):
        """The demo ``LightningTransformer`` with a small vocabulary and inner ``Transformer``, and random tokens
        instead of WikiText2 (only ``prepare_data``/``train_dataloader`` and the sizes are changed)."""

        def __init__(self, vocab_size: int = VOCAB) -> None:
            super().__init__(vocab_size=vocab_size)
            self.model = demo.Transformer(vocab_size=vocab_size, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.2)

        def prepare_data(self) -> None:
            pass  # the demo downloads WikiText2

        def train_dataloader(self) -> DataLoader:
            return make_loader("transformer")

    class BoringModel(boring.BoringModel):
        """Lightning's ``BoringModel`` with the demo's own data at a batch size of 8 (the demo's loader has 1)."""

        def train_dataloader(self) -> DataLoader:
            return make_loader("boring")

    classes["transformer"] = SmallLightningTransformer
    classes["boring"] = BoringModel
    return classes


# ----------------------------------------------------------------------------------------------------- data
class _DictDataset(Dataset):
    """Padded token sequences as HuggingFace datasets yield them: one dict of tensors per example."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> None:
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def _padded_tokens(n: int, g: torch.Generator, cls_token: bool = False) -> tuple[Tensor, Tensor]:
    ids = torch.randint(2, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (n, T)
    ids = ids * mask  # pad id 0
    if cls_token:
        ids[:, 0] = 1  # [CLS]
    return ids, mask


def make_dataset(kind: str, n: int = 64, seed: int = 0) -> Dataset:
    """``n`` random training examples for ``kind`` (a different ``seed`` gives fresh examples of the same kind)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "boring":
        with torch.random.fork_rng(devices=[]):  # RandomDataset draws from the global RNG
            torch.manual_seed(seed)
            return importlib.import_module("lightning.pytorch.demos.boring_classes").RandomDataset(32, n)
    if kind in ("transformer", "nanogpt", "nanogpt_tied"):
        tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
        return TensorDataset(tokens[:, :-1], tokens[:, 1:])
    if kind == "autoencoder":
        return TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    if kind in ("hf_dict", "hf_batchencoding", "bert"):
        ids, mask = _padded_tokens(n, g, cls_token=kind == "bert")
        return _DictDataset(ids, mask, torch.randint(0, 3, (n,), generator=g))
    if kind == "bn_cnn":
        return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    if kind in ("gru", "lstm"):
        return TensorDataset(torch.randn(n, 5, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    if kind == "gan":
        return TensorDataset(torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g))
    if kind in ("protocol_logits", "protocol_logprobs"):
        return TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g))
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


def _collate_batch_encoding(examples: list[dict[str, Tensor]]) -> BatchEncoding:
    return BatchEncoding(torch.utils.data.default_collate(examples))


def _collate_with_position_ids(examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    batch = torch.utils.data.default_collate(examples)
    batch["position_ids"] = torch.arange(batch["input_ids"].size(1)).unsqueeze(0)  # (1, T), broadcast
    return batch


_COLLATE = {"hf_batchencoding": _collate_batch_encoding, "bert": _collate_with_position_ids}


def make_loader(kind: str, n: int = 64, batch_size: int = BATCH_SIZE, seed: int = 0) -> DataLoader:
    """A DataLoader over :func:`make_dataset` with the collate function such a project would use."""
    return DataLoader(make_dataset(kind, n, seed), batch_size=batch_size, collate_fn=_COLLATE.get(kind))


def make(kind: str, package: str = "lightning.pytorch", seed: int = 0, n: int = 64) -> tuple[Any, DataLoader]:
    """``(module, train_dataloader)`` of ``kind`` on ``package``'s ``LightningModule``, initialised from ``seed``
    (the global RNG is left as it was)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    cls = _classes(package)[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = cls()
    return module, make_loader(kind, n=n, seed=seed)


def make_datamodule(kind: str, package: str = "lightning.pytorch", n: int = 64, seed: int = 0) -> Any:
    """A ``LightningDataModule`` of ``package`` with train/val/test loaders for ``kind`` and a held-out
    ``fresh_pool()`` of new examples (what :class:`lightning_sgd.callbacks.DeepBootstrap` trains its twin on)."""
    lightning = importlib.import_module(package)

    class UserDataModule(lightning.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return make_loader(kind, n=n, seed=seed)

        def val_dataloader(self) -> DataLoader:
            return make_loader(kind, n=16, seed=seed + 1)

        def test_dataloader(self) -> DataLoader:
            return make_loader(kind, n=16, seed=seed + 2)

        def fresh_pool(self) -> Dataset:
            return make_dataset(kind, n=4 * n, seed=seed + 3)

    return UserDataModule()
