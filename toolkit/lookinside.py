"""`playattention attention FOLDER --prompt TEXT`: what each head of a run (or a Hugging Face folder)
attends to, drawn and measured.

Writes into ``--out``: ``attention.png`` (a grid of heatmaps, layer x head, token labels on the
axes for short prompts), ``attention.html`` (one self-contained page: pick a layer and head, hover
a query token to see where it looks; no server, no external files) and prints a table per head
(:mod:`toolkit.headstats`). With ``--head-importance``, ``head_importance.png``: the validation
loss change when one head's attention output is zeroed, one forward per head (Michel et al. 2019
measure the same by masking; not the gradient estimate).

The maps come from the model's ``observe_attention()``: attend's math path records them, so every
attention that goes through ``attend`` (or offers maps with ``record_attention``) has them; a
layer that offers none is reported as such.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import torch

from .convert import is_hf_folder
from .data import prepared_dir, read_split
from .errors import DataError, UsageError
from .generate import encode_prompt, load_run
from .headstats import head_stats
from .hf import load_hf
from .hf.tokenizers import hf_tokenizer
from .report import _pyplot

#: prompts up to this many tokens get token labels on the heatmaps' axes
LABEL_TOKENS = 24


# -- loading ----------------------------------------------------------------------------------------
def load_folder(folder: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer or None, prepared data folder or None) of a run or Hugging Face folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such run folder or Hugging Face folder")
    if is_hf_folder(folder):
        return load_hf(folder).to(device).eval(), hf_tokenizer(folder), None
    model, tokenizer, recipe = load_run(folder, device=device)
    prepared = prepared_dir(recipe.data)
    return model, tokenizer, prepared if prepared.is_dir() else None


def prompt_ids(tokenizer, prompt: str | None, ids: str | None) -> list[int]:
    """The token ids to look at: ``--ids 1,2,3`` as given, else the encoded ``--prompt``."""
    if ids is not None:
        try:
            return [int(t) for t in ids.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--ids {ids}: expected comma-separated token ids, e.g. 1,2,3") from None
    if prompt is None:
        raise UsageError("give --prompt TEXT (or --ids 1,2,3)")
    if tokenizer is None:
        raise UsageError("this folder has no tokenizer: give token ids with --ids 1,2,3")
    try:
        return encode_prompt(tokenizer, prompt)
    except ValueError as exc:
        raise UsageError(f"--prompt {prompt!r}: {exc}") from None


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """One short printable label per token."""
    if tokenizer is None:
        return [str(i) for i in ids]
    out = []
    for i in ids:
        try:
            text = tokenizer.decode([i])
        except (ValueError, KeyError, IndexError):
            text = f"<{i}>"
        out.append(repr(text)[1:-1][:12] or f"<{i}>")
    return out


# -- observing ---------------------------------------------------------------------------------------
@torch.no_grad()
def observe(model, ids: list[int]) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """({layer: map (H, T, T)}, {layer: why it has none}) for one forward of ``ids``."""
    device = next(model.parameters()).device
    with model.observe_attention() as maps:
        model(torch.tensor([ids], dtype=torch.long, device=device))
        got = {i: m[0].float().cpu() for i, m in maps.layers().items()}
        missing = {i: maps.missing(i) for i in range(model.config.n_layer) if i not in got}
    return got, missing


def stats_table(maps: dict[int, torch.Tensor], missing: dict[int, str], labels: list[str]) -> tuple[list[dict], str]:
    """(rows, text): entropy, sink mass, mean distance and the most attended earlier token of each head."""
    rows = []
    for layer in sorted(maps):
        s = head_stats(maps[layer][None])
        for h in range(maps[layer].size(0)):
            k = int(s["top_key"][h])
            rows.append(dict(layer=layer, head=h, entropy=float(s["entropy"][h]), sink_mass=float(s["sink_mass"][h]),
                             distance=float(s["distance"][h]), top_key=k, top_token=labels[k],
                             top_key_mass=float(s["top_key_mass"][h])))
    lines = [f"{'layer':>5} {'head':>4} {'entropy':>8} {'sink':>6} {'distance':>8}  most attended earlier token"]
    for r in rows:
        lines.append(f"{r['layer']:>5} {r['head']:>4} {r['entropy']:>8.3f} {r['sink_mass']:>6.3f} {r['distance']:>8.2f}  "
                     f"{r['top_key']}:{r['top_token']!r} ({r['top_key_mass']:.3f})")
    lines += [f"{layer:>5}    -  {why}" for layer, why in sorted(missing.items())]
    lines.append("entropy in nats; sink: probability on the first token; distance: mean i - j in tokens; "
                 "each a mean over queries 1..T-1")
    return rows, "\n".join(lines)


# -- drawing -----------------------------------------------------------------------------------------
def _signed(m: torch.Tensor) -> bool:
    return bool((m < 0).any())  # differential attention's difference of two maps


def plot_grid(maps: dict[int, torch.Tensor], missing: dict[int, str], labels: list[str], path: Path,
              title: str = "") -> None:
    """attention.png: one heatmap per layer (rows) and head (columns), query down, key across."""
    plt = _pyplot()
    n_layer = len(maps) + len(missing)
    n_head = max((m.size(0) for m in maps.values()), default=1)
    T = len(labels)
    cell = 2.2 if T <= LABEL_TOKENS else 1.6
    fig, axes = plt.subplots(n_layer, n_head, figsize=(cell * n_head + 1, cell * n_layer + 0.6), squeeze=False)
    for layer in range(n_layer):
        for h in range(n_head):
            ax = axes[layer][h]
            ax.set_xticks([])
            ax.set_yticks([])
            m = maps.get(layer)
            if m is None or h >= m.size(0):
                if h == 0:
                    ax.text(0.02, 0.5, missing.get(layer, ""), fontsize=7, wrap=True, va="center")
                ax.axis("off")
                continue
            a = m[h].numpy()
            if _signed(m):
                lim = float(np.abs(a).max()) or 1.0
                ax.imshow(a, cmap="RdBu_r", vmin=-lim, vmax=lim)
            else:
                ax.imshow(a, cmap="viridis", vmin=0.0, vmax=1.0)
            if T <= LABEL_TOKENS:
                ax.set_xticks(range(T))
                ax.set_xticklabels(labels, rotation=90, fontsize=5)
                ax.set_yticks(range(T))
                ax.set_yticklabels(labels, fontsize=5)
            if layer == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(title or "attention: query (rows) -> key (columns)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importance(delta: np.ndarray, path: Path, title: str = "") -> None:
    """head_importance.png: validation loss change per (layer, head) when that head is zeroed."""
    plt = _pyplot()
    L, H = delta.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * H, 0.8 + 0.55 * L), dpi=110)
    finite = delta[np.isfinite(delta)]
    lim = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    im = ax.imshow(delta, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for (i, j), d in np.ndenumerate(delta):
        ax.text(j, i, "–" if not math.isfinite(d) else f"{d:+.3f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "val loss change when the head is zeroed", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>__TITLE__</title><style>
body{font:13px sans-serif;margin:16px} #toks span{display:inline-block;padding:2px 3px;margin:1px;border-radius:3px;
cursor:default;font-family:monospace;white-space:pre} rect.q{cursor:pointer} .info{color:#555;margin:6px 0}
</style></head><body><h3>__TITLE__</h3>
<div>layer <select id="layer"></select> head <select id="head"></select> <span class="info" id="stat"></span></div>
<p class="info">Hover a token (or a row of the map) to see where that query looks; colour is probability.</p>
<div id="toks"></div><svg id="map"></svg><p class="info" id="note"></p>
<script>
const D=__DATA__;const T=D.labels.length,S=Math.max(4,Math.min(18,Math.floor(480/T)));
const L=document.getElementById('layer'),H=document.getElementById('head'),svg=document.getElementById('map');
D.layers.forEach((l,i)=>L.add(new Option(l.layer+(l.maps?'':' (no maps)'),i)));
function heads(){H.innerHTML='';const l=D.layers[L.value];(l.maps||[]).forEach((_,h)=>H.add(new Option(h,h)));draw()}
function col(p,signed){if(signed){const a=Math.min(1,Math.abs(p)/D.layers[L.value].lim);
return p<0?`rgba(33,102,172,${a})`:`rgba(178,24,43,${a})`}return `rgba(68,1,84,${Math.min(1,Math.max(0,p))})`}
function draw(q){const l=D.layers[L.value];const n=document.getElementById('note'),st=document.getElementById('stat');
if(!l.maps){svg.innerHTML='';n.textContent=l.why;st.textContent='';return}
const m=l.maps[H.value],sg=l.signed;const s=l.stats[H.value];
st.textContent=`entropy ${s[0]} nats, sink ${s[1]}, distance ${s[2]}`;n.textContent=sg?'signed map (differential: softmax1 - lambda softmax2)':'';
svg.setAttribute('width',T*S+2);svg.setAttribute('height',T*S+2);let h='';
for(let i=0;i<T;i++)for(let j=0;j<=i&&j<T;j++){h+=`<rect class="q" data-q="${i}" x="${j*S}" y="${i*S}" width="${S}" height="${S}" fill="${col(m[i][j],sg)}"${q===i?' stroke="orange"':''}/>`}
svg.innerHTML=h;const t=document.getElementById('toks');t.innerHTML='';
D.labels.forEach((w,j)=>{const e=document.createElement('span');e.textContent=w;
if(q!==undefined){const p=j<=q?m[q][j]:0;e.style.background=col(p,sg);e.style.color=(!sg&&p>0.5)?'#fff':'#000';
e.title=`p=${p}`;if(j===q)e.style.outline='2px solid orange'}else e.style.background='#eee';
e.onmouseenter=()=>draw(j);t.appendChild(e)})}
svg.onmouseover=e=>{const q=e.target.dataset&&e.target.dataset.q;if(q!==undefined)draw(+q)};
L.onchange=heads;H.onchange=()=>draw();heads();
</script></body></html>
"""


def write_html(maps: dict[int, torch.Tensor], missing: dict[int, str], labels: list[str], rows: list[dict],
               path: Path, title: str = "attention") -> None:
    """attention.html: a self-contained page (inline data, SVG and JS) to pick a head and hover a query."""
    layers = []
    for layer in range(len(maps) + len(missing)):
        m = maps.get(layer)
        if m is None:
            layers.append(dict(layer=layer, maps=None, why=missing.get(layer, "")))
            continue
        stats = [[round(r["entropy"], 3), round(r["sink_mass"], 3), round(r["distance"], 2)]
                 for r in rows if r["layer"] == layer]
        layers.append(dict(layer=layer, maps=np.round(m.numpy(), 4).tolist(), signed=_signed(m),
                           lim=float(m.abs().max()) or 1.0, stats=stats))
    data = json.dumps({"labels": labels, "layers": layers}).replace("</", "<\\/")
    path.write_text(_PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data), encoding="utf-8")


# -- head importance ---------------------------------------------------------------------------------
def validation_windows(tokens: np.ndarray, length: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of n windows of ``length`` tokens spread evenly over ``tokens``: (n, length) each."""
    length = min(length, len(tokens) - 1)
    if length < 1:
        raise DataError("head importance needs at least 2 tokens of validation text")
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(np.int64)
    rows = torch.from_numpy(np.stack([tokens[s:s + length + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def head_importance(model, x: torch.Tensor, y: torch.Tensor, heads: dict[int, int]) -> tuple[float, np.ndarray]:
    """(baseline loss, delta (L, H)): the loss on (x, y) with head h of layer l zeroed, minus the loss
    with none zeroed, one forward per head; NaN where a layer has no maskable head. Both run attend's
    math path, so a head that adds nothing has a delta of exactly 0. Only heads that go through
    attend can be zeroed: a layer whose attention does not (it offers maps another way) stays NaN."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    attended: set = set()

    def loss(masked=None) -> float:
        with model.observe_attention(masked=masked, record=False) as maps:
            out = float(model(x, y)[1])
        attended.update(maps.observer.attended)
        return out

    base = loss()
    delta = np.full((model.config.n_layer, max(heads.values(), default=1)), np.nan)
    for layer, n in heads.items():
        if layer not in attended:
            continue
        for h in range(n):
            delta[layer, h] = loss({(layer, h)}) - base
    return base, delta


def importance_tokens(tokenizer, prepared: Path | None, text: str | None) -> tuple[np.ndarray, str]:
    """The validation tokens: ``--text FILE`` tokenized, else the run's prepared val split."""
    if text is not None:
        file = Path(text)
        if not file.is_file():
            raise UsageError(f"--text {text}: no such file")
        if tokenizer is None:
            raise UsageError("--text needs a tokenizer, and this folder has none")
        try:
            return np.array(tokenizer.encode(file.read_text(encoding="utf-8")), dtype=np.int64), text
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{text}: {exc}") from None
    if prepared is None:
        raise UsageError("--head-importance needs validation text: give --text FILE (this folder has no prepared data)")
    return np.concatenate(read_split(prepared, "val")).astype(np.int64), f"{prepared} (val split)"


# -- the command --------------------------------------------------------------------------------------
def look_inside(folder: str | Path, *, prompt: str | None = None, ids: str | None = None, out: str | Path | None = None,
                importance: bool = False, text: str | None = None, windows: int = 4, length: int = 256,
                device: str = "cpu") -> dict:
    """Write attention.png / attention.html (and head_importance.png) into ``out``; returns what it printed."""
    if importance and (windows < 1 or length < 2):
        raise UsageError("--windows must be >= 1 and --length >= 2")
    model, tokenizer, prepared = load_folder(folder, device)
    tokens = prompt_ids(tokenizer, prompt, ids)
    if len(tokens) < 2:
        raise UsageError("the prompt must be 2 tokens or more: one token attends only to itself")
    if len(tokens) > model.config.block_size:
        raise UsageError(f"the prompt is {len(tokens)} tokens, longer than the model's block_size {model.config.block_size}")
    out = Path(out) if out is not None else Path("attention-out") / Path(folder).resolve().name
    out.mkdir(parents=True, exist_ok=True)
    labels = token_labels(tokenizer, tokens)
    maps, missing = observe(model, tokens)
    rows, table = stats_table(maps, missing, labels)
    name = Path(folder).resolve().name
    plot_grid(maps, missing, labels, out / "attention.png", title=f"{name}: query (rows) -> key (columns)")
    write_html(maps, missing, labels, rows, out / "attention.html", title=f"{name}: attention")
    result = dict(out=str(out), table=table, rows=rows, files=["attention.png", "attention.html"])
    if importance:
        val, where = importance_tokens(tokenizer, prepared, text)
        x, y = validation_windows(val, min(length, model.config.block_size), windows)
        base, delta = head_importance(model, x, y, {layer: m.size(0) for layer, m in maps.items()})
        plot_importance(delta, out / "head_importance.png",
                        title=f"{name}: val loss change when a head is zeroed (base {base:.4f})")
        lines = [f"head importance: loss on {x.numel()} tokens of {where} is {base:.4f}; the change when one "
                 f"head's attention output is zeroed (one forward per head; -: not through attend(), not maskable):"]
        lines += [f"  layer {layer}: " + " ".join("   -   " if math.isnan(d) else f"{d:+.4f}" for d in delta[layer])
                  for layer in range(delta.shape[0])]
        result.update(base_loss=base, importance=delta, importance_table="\n".join(lines))
        result["files"].append("head_importance.png")
    return result
