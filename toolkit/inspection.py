"""`playattention inspect`: what a recipe costs before it runs.

Parameters (all, and active per token) and forward FLOPs per token per component, the KV cache
each attention keeps, the activations each component saves for the backward pass, the batch
arithmetic, the derived DeepSpeed config, and memory per GPU for ZeRO stages 0 to 3. The model is
built and run on the ``meta`` device (shapes without storage), so GPT-2 124M inspects instantly and
what is measured is what this implementation of each component really keeps.

Counting references: Kaplan et al. 2020 (C = 6N per token), PaLM (Chowdhery et al. 2022, App. B:
6N + 12·L·H·Q·T with attention), ZeRO (Rajbhandari et al. 2020, §3: 2Ψ + 2Ψ + KΨ with K = 12 for
mixed-precision Adam), activations after Korthikanti et al. 2022 (§4: 34·s·b·h per layer in 16 bit).
"""
from __future__ import annotations

import json

import attrs
import psutil
import torch

from .contracts import new_state, state_for
from .engine import batch_plan, check_deepspeed_config, deepspeed_config, merged_deepspeed_config, on_cuda
from .errors import ConfigError
from .families import PER_LAYER
from .model import Transformer, select_layers
from .probe import build_meta_model, estimated_named_params
from .recipe import Recipe, registry_of


@attrs.frozen
class FlopsCheck:
    """The model's own count against the 6N + 12·L·H·Q·T estimate, per token, for training."""

    from_components: int  # 3 x the summed forward FLOPs of the table (backward ~ 2 x forward)
    estimate: int  # 6N + 12·L·H·Q·T
    n_matmul_params: int  # N: parameters that take part in matmuls (no embedding lookup tables)

    @property
    def ratio(self) -> float:
        return self.from_components / self.estimate


def flops_check(recipe: Recipe, model: Transformer, report: list[dict]) -> FlopsCheck:
    cfg = recipe.model
    total = report[-1]
    # N counts each weight used in a matmul once: the LM head (= wte when tied), not the lookup tables
    lookups = sum(p.numel() for p in model.transformer.wpe.parameters())
    if not cfg.tie_embeddings:
        lookups += model.transformer.wte.weight.numel()
    n = total["params"] - lookups
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_dim or cfg.n_embd // cfg.n_head, cfg.block_size
    return FlopsCheck(3 * total["flops_per_token"], 6 * n + 12 * L * H * Q * T, n)


# -- memory ---------------------------------------------------------------------------------------
#: fp32 values of optimizer state per parameter where the optimizer declares none: Adam's momentum and
#: variance (an optimizer keeping less, Lion or Muon, declares ``states_per_param``; toolkit.contracts)
DEFAULT_OPTIMIZER_STATES = 2


def state_bytes_per_param(precision: str, states: float = DEFAULT_OPTIMIZER_STATES) -> tuple[int, int, float]:
    """Bytes per parameter for (weights, gradients, optimizer states), the optimizer keeping ``states``
    fp32 values per parameter (Adam 2).

    Mixed precision (ZeRO paper's accounting): 2 + 2 + (4 + 4 * states), the optimizer holding the fp32
    master weights too (Adam: 12); fp32: 4 + 4 + 4 * states (the weights are their own master copy).
    """
    return (2, 2, 4 + 4 * states) if precision in ("bf16", "fp16") else (4, 4, 4 * states)


def optimizer_states(recipe: Recipe, named_params) -> float:
    """The mean fp32 values of state per parameter that the recipe's optimizer keeps over ``named_params``
    ((name, tensor, times) each): its factory's ``states_per_param``, a number or a function of (name,
    tensor), else Adam's :data:`DEFAULT_OPTIMIZER_STATES`."""
    factory = registry_of(recipe).get("optimizer", recipe.train.optimizer.kind).factory
    per = getattr(factory, "states_per_param", DEFAULT_OPTIMIZER_STATES)
    if not callable(per):
        return float(per)
    values = count = 0
    for name, p, times in named_params:
        values += per(name, p) * p.numel() * times
        count += p.numel() * times
    return values / max(count, 1)


def _width(recipe: Recipe) -> int:
    return 2 if recipe.deepspeed.precision in ("bf16", "fp16") else 4


def _parts_of(model: Transformer) -> dict[int, tuple[str, str]]:
    """Each module of the model -> the (family, kind) of the part it belongs to (the innermost part)."""
    owner: dict[int, tuple[str, str]] = {}
    for family, kind, module, _ in sorted(model.parts, key=lambda p: p[0] != "block"):  # blocks first, parts win
        for sub in module.modules():
            owner[id(sub)] = (family, kind)
    return owner


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel (flash, memory-efficient) keeps for backward: q, k, v, the output, a
    log-sum-exp per query and the mask if there is one. On the meta device SDPA always spells out the
    T x T score matrix, which the kernels that train models never store."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty((*q.shape[:-1], v.size(-1)))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, nh, T)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(q, k, v, attn_mask)


def measured_activations(recipe: Recipe, model: Transformer | None = None) -> dict[tuple[str, str], int] | None:
    """Bytes that each (family, kind) saves for the backward pass of one micro batch, measured with
    autograd's saved-tensor hooks on the meta device; None if a component cannot run there."""
    m, t = recipe.model, recipe.train
    model = model or build_meta_model(recipe)
    if _width(recipe) == 2:
        model = model.to(torch.bfloat16)
    model.activation_checkpointing = t.activation_checkpointing
    model.train()
    owner, stack = _parts_of(model), [("model", "embedding, loss")]
    saved: dict[tuple[str, str], int] = {}
    weights = {id(p) for p in model.parameters()}

    def pack(tensor):  # weights a layer keeps for its backward are the model's, not activations
        if id(tensor) not in weights and id(tensor._base) not in weights:
            saved[stack[-1]] = saved.get(stack[-1], 0) + tensor.numel() * tensor.element_size()
        return tensor

    def enter(mod, args):
        stack.append(owner[id(mod)])

    def leave(mod, args, out):  # returns None: a forward hook's return value would replace the output
        stack.pop()

    handles = [h for mod in model.modules() if id(mod) in owner
               for h in (mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave))]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa  # what the kernels keep, not meta's math
    try:
        idx = torch.zeros((t.micro_batch, m.block_size), dtype=torch.long, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            model(idx, idx)
    except Exception:  # noqa: BLE001 - a component with data-dependent shapes: fall back to the estimate
        return None
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    return saved


def activation_bytes(recipe: Recipe) -> int:
    """Activation memory of one micro batch for the backward pass: measured on the meta device
    (:func:`measured_activations`), or :func:`estimated_activation_bytes` where that cannot run."""
    measured = measured_activations(recipe)
    return sum(measured.values()) if measured is not None else estimated_activation_bytes(recipe)


def estimated_activation_bytes(recipe: Recipe) -> int:
    """Estimated activation memory of one micro batch for the backward pass.

    Per layer 34·s·b·h bytes in 16 bit (Korthikanti et al. 2022) for a GPT-2-shaped block, scaled
    for fp32; the 5·a·s²·b attention-matrix term only with ``backend = "math"`` (SDPA's fused kernels
    keep no score matrix). Activation checkpointing keeps each block's input plus one block's
    working set. Plus the logits, their fp32 copy for the loss and its gradient.
    """
    m, t = recipe.model, recipe.train
    s, b, h, a, L, V = m.block_size, t.micro_batch, m.n_embd, m.n_head, m.n_layer, m.vocab_size
    h = max(h, a * (m.head_dim or 0))  # heads wider than the model keep their own q, k, v and outputs
    width = 2 if recipe.deepspeed.precision in ("bf16", "fp16") else 4
    scale = width / 2
    layer = 34 * s * b * h * scale
    if getattr(m.attention.options, "backend", "sdpa") == "math":
        layer += 5 * a * s * s * b * scale
    if recipe.train.activation_checkpointing:
        blocks = L * 2 * s * b * h * scale + layer
    else:
        blocks = L * layer
    logits = s * b * V * (width + 4 + 4)
    return int(blocks + logits)


def kv_cache(model: Transformer, precision: str) -> list[dict]:
    """What each layer's attention keeps in its KV cache: bytes per cached token and how many tokens
    it keeps of a full context, measured by running each attention on the meta device."""
    T, C = model.config.block_size, model.config.n_embd
    width = 2 if precision in ("bf16", "fp16") else 4
    position, rows = model.transformer.wpe, []

    def cached(attn, n: int) -> int:
        cache, x = {}, torch.zeros((1, n, C), device="meta")
        state = state_for(attn, new_state(torch.zeros((1, n), dtype=torch.long, device="meta"), x))  # value residual
        attn(x, position, torch.arange(n, device="meta"), cache, **state)
        return sum(v.numel() for k, v in cache.items() if isinstance(v, torch.Tensor) and k != "pos")

    for i, block in enumerate(model.transformer.h):
        per_token = cached(block.attn, 1)
        kept = cached(block.attn, T) // per_token if per_token else 0
        rows.append(dict(layer=i, kind=model.config.spec_at("attention", i).kind, bytes_per_token=per_token * width,
                         tokens_kept=kept, bytes=kept * per_token * width))
    return rows


def memory_per_gpu(recipe: Recipe, n_params: int, world_size: int = 1, activations: int | None = None,
                   states: float = DEFAULT_OPTIMIZER_STATES) -> list[dict]:
    """Estimated bytes per GPU for ZeRO stages 0-3: weights, gradients, optimizer states, activations.

    Stage 1 shards the optimizer states over the ``world_size`` ranks, stage 2 also the gradients,
    stage 3 also the weights. With ``offload = "cpu"`` (stages 2 and 3) the optimizer states live
    in host memory and are left out of the GPU total. ``states``: :func:`optimizer_states`.
    """
    wb, gb, ob = state_bytes_per_param(recipe.deepspeed.precision, states)
    act = activation_bytes(recipe) if activations is None else activations
    n, N = n_params, world_size
    rows = []
    for stage in range(4):
        weights = wb * n / (N if stage >= 3 else 1)
        grads = gb * n / (N if stage >= 2 else 1)
        optim = ob * n / (N if stage >= 1 else 1)
        offloaded = recipe.deepspeed.offload == "cpu" and stage >= 2
        gpu = weights + grads + (0 if offloaded else optim) + act
        rows.append(dict(stage=stage, weights=int(weights), grads=int(grads), optimizer=int(optim),
                         optimizer_on_host=offloaded, activations=act, total=int(gpu)))
    return rows


# -- before training: does it fit? ---------------------------------------------------------------
def available_memory() -> tuple[int, str]:
    """(bytes free for one rank's work, what they are): the GPU's free memory, or the host's available memory."""
    if on_cuda():
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    return psutil.virtual_memory().available, "available in host memory"


def check_fits(recipe: Recipe, world_size: int = 1, available: tuple[int, str] | None = None) -> None:
    """ConfigError (one line, with the numbers) if weights, gradients, optimizer states and activations
    per rank exceed the memory of the device, before anything is built or allocated. On a CPU the
    ranks share the host, so all of them count; optimizer states offloaded to the host count there."""
    named = estimated_named_params(recipe)
    n = sum(p.numel() * times for _, p, times in named)
    row = memory_per_gpu(recipe, n, world_size, estimated_activation_bytes(recipe),
                         optimizer_states(recipe, named))[recipe.deepspeed.zero_stage]
    have, where = available or available_memory()
    cpu = not on_cuda()
    need = row["total"] * (world_size if cpu else 1) + (row["optimizer"] * world_size if row["optimizer_on_host"] and cpu else 0)
    if need > have:
        ranks = f" x {world_size} ranks on this host" if cpu and world_size > 1 else " per rank"
        raise ConfigError([f"$.model: {_count(n)} parameters need about {_gib(need)} to train{ranks} (weights "
                           f"{_gib(row['weights'])}, gradients {_gib(row['grads'])}, optimizer {_gib(row['optimizer'])}, "
                           f"activations {_gib(row['activations'])} at ZeRO {recipe.deepspeed.zero_stage}), more than the "
                           f"{_gib(have)} {where}; make the model or micro_batch smaller, or shard it over more devices"])


# -- the report -----------------------------------------------------------------------------------
def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def inspect_recipe(recipe: Recipe, world_size: int = 1, path: str = "") -> str:
    """The report `playattention inspect` prints."""
    m, t, ds = recipe.model, recipe.train, recipe.deepspeed
    try:
        plan = batch_plan(recipe, world_size)
    except ConfigError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError([f"{where}--world-size {world_size}: {line}" for line in exc.lines]) from None
    if ds.config and (problems := check_deepspeed_config(merged_deepspeed_config(recipe, plan))):
        raise ConfigError([f"{path}: {line}" if path else line for line in problems])
    model = build_meta_model(recipe)
    report = model.component_report(m.block_size)
    total = report[-1]
    lines = [f"recipe {recipe.name}" + (f" ({path})" if path else "") + (f": {recipe.description}" if recipe.description else "")]
    lines.append(
        f"model: {m.n_layer} layers x {m.n_head} heads (head dim {m.head_dim or m.n_embd // m.n_head}), n_embd {m.n_embd}, "
        f"block_size {m.block_size}, vocab {m.vocab_size}, {'tied' if m.tie_embeddings else 'untied'} embeddings, "
        f"{m.block.kind} blocks"
    )
    for name, group in m.layers.items():
        chosen = ", ".join(f"{f} {getattr(group, f).kind}" for f in PER_LAYER if getattr(group, f) is not None)
        lines.append(f"  layers {name} {select_layers(group.at, m.n_layer)}: {chosen or 'nothing of their own'}")
    lines.append("")
    lines.append(f"parameters and forward FLOPs per token (context T = {m.block_size}):")
    sparse = any(r["active_params"] != r["params"] for r in report)  # a mixture of experts: say what a token uses
    rows = []
    for r in report:
        if r["component"] == "block" and not r["params"] and not r["flops_per_token"]:
            continue  # a block that only wires its parts together
        row = [r["component"], r["kind"], f"{r['params']:,}", f"{100 * r['params'] / total['params']:.1f}%"]
        row += [f"{r['active_params']:,}"] if sparse else []
        rows.append(row + [f"{r['flops_per_token']:,}",
                           f"{100 * r['flops_per_token'] / max(total['flops_per_token'], 1):.1f}%"])
    header = ["component", "kind", "params", "", *(["active"] if sparse else []), "fwd FLOPs/token", ""]
    lines += _table(header, rows, set(range(2, len(header))))

    cache = kv_cache(model, ds.precision)
    lines.append("")
    lines.append(f"KV cache ({'16' if _width(recipe) == 2 else '32'}-bit, one sequence of {m.block_size} tokens):")
    kinds: dict[str, list[dict]] = {}
    for r in cache:
        kinds.setdefault(r["kind"], []).append(r)
    cache_rows = [[kind, str(len(rs)), f"{rs[0]['bytes_per_token']:,}", f"{rs[0]['tokens_kept']:,}",
                   _gib(sum(r["bytes"] for r in rs))] for kind, rs in kinds.items()]
    cache_rows.append(["total", str(len(cache)), f"{sum(r['bytes_per_token'] for r in cache):,}", "",
                       _gib(sum(r["bytes"] for r in cache))])
    lines += _table(["attention", "layers", "bytes/token/layer", "tokens kept", "per sequence"], cache_rows, {1, 2, 3, 4})

    measured = measured_activations(recipe, model)
    if measured is not None:
        lines.append("")
        lines.append(f"activations saved for backward, measured (micro batch {t.micro_batch} x {m.block_size}"
                     f"{', activation checkpointing' if t.activation_checkpointing else ''}):")
        act_total = sum(measured.values())
        act_rows = [[family, kind, _gib(n), f"{100 * n / max(act_total, 1):.1f}%"]
                    for (family, kind), n in sorted(measured.items(), key=lambda kv: -kv[1])]
        lines += _table(["component", "kind", "bytes", ""], act_rows + [["total", "", _gib(act_total), ""]], {2, 3})

    check = flops_check(recipe, model, report)
    lines.append("")
    lines.append("training FLOPs per token (forward + backward = 3 x forward):")
    lines.append(f"  from the table      {check.from_components:>16,}")
    lines.append(f"  6N + 12*L*H*Q*T     {check.estimate:>16,}   (PaLM's estimate, N = {check.n_matmul_params:,} "
                 f"matmul params; table / estimate = {check.ratio:.4f})")

    lines.append("")
    tokens = plan.tokens_per_step
    lines.append(f"batch (world size {world_size}):")
    lines.append(f"  micro batch {plan.micro_batch} x block_size {m.block_size} = {plan.micro_batch * m.block_size:,} "
                 f"tokens per GPU per micro step")
    lines.append(f"  x {plan.grad_accum} accumulation step{'s' if plan.grad_accum != 1 else ''} x {world_size} "
                 f"GPU{'s' if world_size != 1 else ''} = {tokens:,} tokens per optimizer step "
                 f"({plan.batch_size} sequences)")
    total_tokens = tokens * t.max_steps
    train_flops = check.from_components * total_tokens
    lines.append(f"  x {t.max_steps:,} steps = {_count(total_tokens)} tokens, about {train_flops:.2e} training FLOPs "
                 f"({total_tokens / max(total['params'], 1):.1f} tokens per parameter)")

    lines.append("")
    lines.append(f"deepspeed config (world size {world_size}):")
    try:
        cfg = deepspeed_config(recipe, plan)
        lines += ["  " + line for line in json.dumps(cfg, indent=2, sort_keys=True).splitlines()]
    except ConfigError as exc:  # e.g. fp16 on a machine without CUDA
        lines += [f"  not derivable on this machine: {line}" for line in exc.lines]

    lines.append("")
    n = total["params"]
    states = optimizer_states(recipe, ((name, p, 1) for name, p in model.named_parameters()))
    wb, gb, ob = state_bytes_per_param(ds.precision, states)
    mixed = ds.precision in ("bf16", "fp16")
    lines.append(
        f"memory per GPU, an ESTIMATE (world size {world_size}, {ds.precision}"
        f"{' with fp32 master weights' if mixed else ''}, optimizer {t.optimizer.kind} (states per parameter: "
        f"{states:.3g}): {wb}+{gb}+{ob:.3g} bytes per parameter; "
        f"activations for micro batch {t.micro_batch}"
        f"{', activation checkpointing' if t.activation_checkpointing else ''}; "
        "CUDA context, temporary buffers and fragmentation not counted):"
    )
    mem_rows = []
    act = sum(measured.values()) if measured is not None else estimated_activation_bytes(recipe)
    for r in memory_per_gpu(recipe, n, world_size, act, states):
        optim = _gib(r["optimizer"]) + (" (host)" if r["optimizer_on_host"] else "")
        mark = "  <- recipe" if r["stage"] == ds.zero_stage else ""
        mem_rows.append([f"ZeRO {r['stage']}", _gib(r["weights"]), _gib(r["grads"]), optim, _gib(r["activations"]),
                         _gib(r["total"]) + mark])
    lines += _table(["stage", "weights", "gradients", "optimizer", "activations", "total"], mem_rows, {1, 2, 3, 4})
    return "\n".join(lines)
