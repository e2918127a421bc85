"""The composed decoder-only transformer.

The model names no concrete component: attention, norm, position and MLP come from the registry
by the kinds in :class:`ModelConfig`, and obey the contracts in :mod:`toolkit.contracts`.
Parameter names follow the GPT-2 checkpoint (``transformer.wte``, ``transformer.wpe``,
``transformer.h.0.attn.c_attn``, ``transformer.ln_f``, ``lm_head``) so weights load by name.

References: GPT-2 (Radford et al. 2019), nanoGPT (Karpathy), Attention Is All You Need (Vaswani et al. 2017).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .contracts import (AttentionObserver, Dims, Position, acts_per_layer, flops_per_token, observing_attention,
                        new_state, takes_state)
from .converter import resolve_specs
from .errors import ConfigError
from .families import PER_LAYER, SPEC_TYPES
from .plugin_manager import default_registry
from .recipe.schema import ModelConfig, select_layers  # noqa: F401 - the schema's; importers know them from here
from .registry import Registry

# the Spec of each model family, by the names older code imports
AttentionSpec, NormSpec, PositionSpec, MlpSpec = (SPEC_TYPES[f] for f in ("attention", "norm", "position", "mlp"))


def model_dims(config: ModelConfig, build: Callable | None = None, layer: int | None = None,
               record: Callable | None = None) -> Dims:
    """The shape handed to the factories of ``layer``'s components (None: the model-wide ones)."""
    parts = {f: config.spec_at(f, layer) for f in PER_LAYER}
    return Dims(config.n_embd, config.n_head, config.n_layer, config.block_size, config.vocab_size, config.dropout,
                config.bias, build, head_size=config.head_dim, layer=layer, parts=parts, record=record)


def embed_per_layer_refusal(kind: str) -> str:
    """Why a position with an embed hook cannot be a layer's own: the embeddings are added once."""
    return (f"position '{kind}' adds to the embeddings (embed), which the model does once, before the first "
            "layer; a layer's own position must rotate q and k or bias the scores (rope, alibi, none)")


class Transformer(nn.Module):
    """A GPT: token embedding, positional component, N blocks, final norm, LM head."""

    def __init__(self, config: ModelConfig, registry: Registry | None = None):
        super().__init__()
        registry = default_registry() if registry is None else registry
        self.config = config = resolve_specs(registry, config)  # typed options for every component
        build = registry.build_in
        self.parts: list[tuple[str, str, nn.Module, int | None]] = []  # what each layer is made of

        def record(family, kind, module, layer):
            self.parts.append((family, kind, module, layer))

        C, V = config.n_embd, config.vocab_size
        # the parametrization first: attention asks it for its logit scale (muP: 1/d)
        self.parametrization = build("parametrization", config.parametrization, model_dims(config, build))
        dims = attrs.evolve(model_dims(config, build, record=record), parametrization=self.parametrization)
        wte = nn.Embedding(V, C)  # built in GPT-2's order, so a seed gives the same weights as ever
        wpe = build("position", config.position, dims)
        record("position", config.position.kind, wpe, None)
        blocks = []
        for i in range(config.n_layer):
            layer_dims = attrs.evolve(model_dims(config, build, i, record), parametrization=self.parametrization)
            block = build("block", config.spec_at("block", i), layer_dims)
            record("block", config.spec_at("block", i).kind, block, i)
            blocks.append(block)
        # a block that ends in a norm (post-norm) needs no final one: it would only add parameters
        final = dims.part("norm", C, role="final") if getattr(blocks[-1], "final_norm", True) else nn.Identity()
        self.transformer = nn.ModuleDict(dict(wte=wte, wpe=wpe, drop=nn.Dropout(config.dropout),
                                              h=nn.ModuleList(blocks), ln_f=final))
        if not isinstance(self.transformer.wpe, Position):
            raise TypeError(f"position {config.position.kind!r} must build a toolkit.contracts.Position")
        # a layer group's own position (iRoPE: RoPE on local layers, none on global ones); layers that
        # choose the same one share it, and the model's stays transformer.wpe (GPT-2's name)
        own: dict = {}
        for i in range(config.n_layer):
            spec = config.spec_at("position", i)
            if spec != config.position and spec not in own:
                own[spec] = build("position", spec, model_dims(config, build, i))
                if not isinstance(own[spec], Position):
                    raise TypeError(f"position {spec.kind!r} must build a toolkit.contracts.Position")
                if not acts_per_layer(own[spec]):
                    group = next(n for n, g in config.layers.items() if g.position == spec)
                    raise ConfigError(f"$.model.layers.{group}.position: {embed_per_layer_refusal(spec.kind)}")
                record("position", spec.kind, own[spec], i)
        if own:
            self.transformer.layer_wpe = nn.ModuleList(own.values())
        # each layer's own position as an index into layer_wpe, or None: the model's (looked up in
        # forward, so that a position swapped in for transformer.wpe reaches every layer)
        self._own_position = [list(own).index(s) if s in own else None
                              for s in (config.spec_at("position", i) for i in range(config.n_layer))]
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_embeddings:  # weight tying (Press & Wolf 2017), as in GPT-2
            self.lm_head.weight = self.transformer.wte.weight
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer),
        # since each block adds two such contributions to the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and config.zero_init_proj:
                torch.nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for module in {id(m): m for m in self.modules()}.values():  # then each component's own init
            reset = getattr(type(module), "reset_parameters", None)
            if reset is not None and not reset.__module__.startswith("torch."):
                module.reset_parameters()
        # then the parametrization's rescaling of what every init gave (muP: hidden matrices by width)
        self.parametrization.apply(self, lambda width: _shapes_at(config, width, registry))
        self.logit_multiplier = self.parametrization.output_multiplier()
        # every component may add auxiliary losses by setting ``self.aux_losses`` in forward, with or
        # without declaring it in its class: each gets an empty dict now, so an undeclared one is
        # collected too (and never keeps a stale value from an earlier forward)
        self._loss_sources = [m for m in self.modules() if m is not self and not type(m).__module__.startswith("torch.")]
        for m in self._loss_sources:
            if not isinstance(getattr(m, "aux_losses", None), dict):
                m.aux_losses = {}
        # which components ask for the per-forward state (a ``state`` keyword in forward), found once
        # here so that forward (compiled too) reads a constant: contracts.state_for
        for m in self.modules():
            m._takes_state = takes_state(m) and m is not self
        for family, kind, module, layer in self.parts:
            block = self.transformer.h[layer] if layer is not None else None
            if family != "block" and block is not None and module._takes_state and not block._takes_state:
                raise ConfigError(f"{family} '{kind}' at layer {layer} asks for the per-forward state, but block "
                                  f"'{config.spec_at('block', layer).kind}' does not hand it on: declare state=None "
                                  "in the block's forward and call its parts with **state_for(part, state)")

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: list[dict] | None = None, start_pos: int = 0, last_only: bool = False,
                return_aux: bool = False):
        """idx (B, T) token ids -> (logits (B, T, V) or (B, 1, V) if last_only, loss or None).

        ``loss`` is the cross-entropy. With ``return_aux`` a third item holds the components'
        auxiliary losses, each summed over layers ({} when none adds any): the training objective
        is loss + their sum (the engine step adds them before backward).
        """
        B, T = idx.shape
        for source in self._loss_sources:
            source.aux_losses = {}
        position: Position = self.transformer.wpe
        own = list(self.transformer.layer_wpe) if "layer_wpe" in self.transformer else []
        limits = [p.max_len for p in [position, *own] if p.max_len is not None]
        if limits and start_pos + T > min(limits):
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds the positional limit {min(limits)}")
        pos = torch.arange(start_pos, start_pos + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.embedding_multiplier is not None:  # Gemma: sqrt(n_embd), in the embeddings' dtype
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        x = self.transformer.drop(position.embed(x, pos))
        state = new_state(idx, x)  # this forward's (or decoding step's) state: contracts, "State between layers"
        for i, block in enumerate(self.transformer.h):
            layer_cache = cache[i] if cache is not None else None
            position = self.transformer.wpe if self._own_position[i] is None else own[self._own_position[i]]
            if self.activation_checkpointing and self.training and layer_cache is None:
                x, state = checkpoint(_with_state, block, x, position, pos, None, state, use_reentrant=False)
            else:
                x, state = _with_state(block, x, position, pos, layer_cache, state)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, [-1], :]  # (B, 1, C): generation needs only the next token's logits
        logits = self.lm_head(x)  # (B, T, V)
        if self.logit_multiplier is not None:  # muP: the readout shrinks with width (Yang et al. 2021)
            logits = logits * self.logit_multiplier
        if self.config.logit_softcap is not None:  # Gemma 2: logits smoothly within +-cap
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        if not return_aux:
            return logits, loss
        aux: dict[str, torch.Tensor] = {}
        for source in self._loss_sources:
            for name, value in source.aux_losses.items():
                aux[name] = aux[name] + value if name in aux else value
        return logits, loss, aux

    def component_metrics(self) -> dict[str, float]:
        """Every component's ``metrics()``, averaged over the layers that have it: ``{"family/name": value}``."""
        sums: dict[str, list[float]] = {}
        for family, _, module, _ in self.parts:
            if callable(getattr(module, "metrics", None)):
                for name, value in module.metrics().items():
                    sums.setdefault(f"{family}/{name}", []).append(float(value))
        return {name: sum(vals) / len(vals) for name, vals in sums.items()}

    # -- looking inside --------------------------------------------------------------------
    @contextlib.contextmanager
    def observe_attention(self, *, masked: set[tuple[int, int]] | None = None, record: bool = True):
        """Inside, every forward records each layer's attention probabilities through attend's math
        path (fused kernels do not expose them); yields :class:`AttentionMaps`. ``masked`` (layer,
        head) pairs get their attention output zeroed. Outside, nothing of this runs."""
        observer = AttentionObserver(record, masked)
        hooks = [block.register_forward_pre_hook(lambda _m, _a, i=i: observer.enter_layer(i))
                 for i, block in enumerate(self.transformer.h)]
        attention = {layer: (kind, module) for family, kind, module, layer in self.parts if family == "attention"}
        try:
            with observing_attention(observer):
                yield AttentionMaps(observer, attention, self.config.n_layer)
        finally:
            for hook in hooks:
                hook.remove()

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 use_cache: bool = True, on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); temperature 0 is greedy.

        With ``use_cache`` each step feeds only the new token through a KV cache. Once the text
        outgrows ``block_size`` the context is cropped to the last ``block_size`` tokens and
        recomputed, exactly as without a cache, so both give the same tokens.
        """
        was_training = self.training
        self.eval()
        gen = None
        if seed is not None:
            gen = torch.Generator(device=idx.device).manual_seed(seed)
        limit = self.config.block_size
        cache, n_cached = None, 0
        try:
            for _ in range(max_new_tokens):
                if use_cache and idx.size(1) <= limit:
                    if cache is None:
                        cache = [{} for _ in self.transformer.h]
                    logits, _ = self(idx[:, n_cached:], cache=cache, start_pos=n_cached, last_only=True)
                    n_cached = idx.size(1)
                else:
                    logits, _ = self(idx[:, -limit:], last_only=True)
                nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, gen)  # (B, 1)
                idx = torch.cat((idx, nxt), dim=1)
                if on_token is not None:
                    on_token(nxt)
        finally:
            self.train(was_training)
        return idx

    # -- accounting ------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position parameters (as nanoGPT reports it)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.transformer.wpe.parameters())
        return n

    def component_report(self, seq_len: int | None = None) -> list[dict]:
        """Parameters (all, and active per token) and forward FLOPs per token for each (family, kind),
        summed over layers, plus a total row. A block counts only what its parts do not."""
        T = seq_len or self.config.block_size
        rows: dict[tuple[str, str], dict] = {}

        def add(family, kind, params, active, flops):
            row = rows.setdefault((family, kind), dict(component=family, kind=kind, params=0, active_params=0,
                                                       flops_per_token=0))
            row["params"] += params
            row["active_params"] += active
            row["flops_per_token"] += flops

        wte = self.transformer.wte.weight.numel()
        add("embedding", "wte", wte, wte, 0)  # a lookup, not a matmul
        in_parts = set()
        for family, kind, module, _ in self.parts:
            if family == "block":
                continue
            n = sum(p.numel() for p in module.parameters())
            in_parts |= {id(p) for p in module.parameters()}
            active = module.active_params() if callable(getattr(module, "active_params", None)) else n
            add(family, kind, n, active, flops_per_token(module, T))
        for family, kind, module, _ in self.parts:
            if family == "block":  # its own parameters, if any (a learned residual scale, ...)
                own = sum(p.numel() for p in module.parameters() if id(p) not in in_parts)
                add("block", kind, own, own, int(module.flops_per_token(T)) if hasattr(module, "flops_per_token") else 0)
        head = 0 if self.config.tie_embeddings else self.lm_head.weight.numel()
        add("lm_head", "tied" if self.config.tie_embeddings else "linear", head, head, 2 * self.lm_head.weight.numel())
        out = list(rows.values())
        out.append(dict(component="total", kind="", **{k: sum(r[k] for r in out)
                                                        for k in ("params", "active_params", "flops_per_token")}))
        return out

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token; training costs about three times this (forward + backward)."""
        return self.component_report(seq_len)[-1]["flops_per_token"]


def _shapes_at(config: ModelConfig, width: int, registry: Registry) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape in this model at n_embd = ``width`` (built on meta, standard parametrization)."""
    narrow = attrs.evolve(config, n_embd=width, parametrization="standard")
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in Transformer(narrow, registry).named_parameters()}


def _with_state(block: nn.Module, x, position, pos, cache, state: dict):
    """One block over its own shallow copy of the state -> (x, the copy): its writes reach later layers
    through what it returns, and a recompute (activation checkpointing) starts from the same contents."""
    if not block._takes_state:
        return block(x, position, pos, cache), state
    state = dict(state)
    return block(x, position, pos, cache, state=state), state


class AttentionMaps:
    """Each layer's attention map from the last forward inside ``Transformer.observe_attention()``."""

    def __init__(self, observer: AttentionObserver, attention: dict, n_layer: int):
        self.observer, self.attention, self.n_layer = observer, attention, n_layer

    def kind(self, layer: int) -> str:
        return self.attention.get(layer, ("?", None))[0]

    def calls(self, layer: int) -> list[torch.Tensor]:
        """What attend (or record_attention) recorded in this layer, in call order (differential: two maps)."""
        return self.observer.maps.get(layer, [])

    def layer(self, layer: int) -> torch.Tensor | None:
        """(B, h, Tq, Tk): the map the layer's attention applies to its values, or None (see :meth:`missing`)."""
        calls = self.calls(layer)
        module = self.attention.get(layer, (None, None))[1]
        if calls and callable(getattr(module, "attention_map", None)):
            return module.attention_map(calls)
        return calls[0] if len(calls) == 1 else None

    def missing(self, layer: int) -> str | None:
        """Why a layer has no map, or None when it has one."""
        n = len(self.calls(layer))
        if n == 0:
            return "no maps: does not use attend() nor record_attention()"
        if n > 1 and not callable(getattr(self.attention.get(layer, (None, None))[1], "attention_map", None)):
            return f"no map: {n} attention maps per forward and no attention_map() to combine them"
        return None

    def layers(self) -> dict[int, torch.Tensor]:
        """Every layer that has a map: layer -> (B, h, Tq, Tk)."""
        out = {i: self.layer(i) for i in range(self.n_layer)}
        return {i: m for i, m in out.items() if m is not None}


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token id per row of logits (B, V) -> (B, 1)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus sampling (Holtzman et al. 2019): keep the smallest set whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        # the mass of the tokens ranked above each one, in float64: an fp32 running sum over a 50k
        # vocabulary drifts by ~1e-4, which at top_p 0.999 is dozens of tokens of the tail
        probs = torch.softmax(sorted_logits.double(), dim=-1)
        above = torch.cat([torch.zeros_like(probs[..., :1]), probs.cumsum(dim=-1)[..., :-1]], dim=-1)  # (B, V)
        drop = above >= top_p
        drop[..., 0] = False  # the most likely token is always kept (top_p = 0 would otherwise drop all)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
