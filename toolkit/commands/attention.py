"""`playattention attention`: what each attention head attends to."""
from __future__ import annotations

import argparse

from ..lookinside import look_inside
from . import add_trust_option


def cmd_attention(args) -> int:
    r = look_inside(args.folder, prompt=args.prompt, ids=args.ids, out=args.out, importance=args.head_importance,
                    text=args.text, windows=args.windows, length=args.length, device=args.device or "cpu")
    print(r["table"])
    if "importance_table" in r:
        print(r["importance_table"])
    print(f"wrote {', '.join(r['files'])} into {r['out']}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Draw every layer's and head's attention over a prompt (attention.png, and "
                     "attention.html to pick a head and hover a query token) and print each head's entropy, sink "
                     "mass, mean distance and most attended earlier token. --head-importance: the validation loss "
                     "change when each head is zeroed. See docs/look-inside.md.")
    p.add_argument("folder", metavar="RUN_OR_HF_FOLDER", help="a finished run folder or a Hugging Face folder")
    p.add_argument("--prompt", help="the text to look at")
    p.add_argument("--ids", metavar="I,J,...", help="token ids instead of a prompt (a folder without a tokenizer)")
    p.add_argument("--out", metavar="DIR", help="where the files go (default attention-out/<folder name>/)")
    p.add_argument("--head-importance", action="store_true",
                   help="also the val loss change when each head's output is zeroed (one forward per head)")
    p.add_argument("--text", metavar="FILE", help="validation text for --head-importance (default the run's val split)")
    p.add_argument("--windows", type=int, default=4, metavar="N", help="--head-importance: windows of text (default 4)")
    p.add_argument("--length", type=int, default=256, metavar="T",
                   help="--head-importance: tokens per window (default 256, at most block_size)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:1")
    add_trust_option(p)
    p.set_defaults(func=cmd_attention)
