"""``kvtier demo``: two questions about one long real document, cold then warm.

The document is the Python license history (``LICENSE.txt`` of the running
Python's standard library, a few thousand tokens of real English that every
Python install carries, so nothing is shipped or downloaded). The two prompts
share the document as their prefix, so the second question reuses the first
one's chunks; a second ``kvtier demo`` run reuses them from disk.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvtier.config import KvtierConfig
from kvtier.errors import KvtierError

QUESTIONS = (
    "Who created Python, and at which institute in the Netherlands?",
    "Which organization holds the copyright of Python today?",
)
SYSTEM = "You are a helpful assistant. Answer questions about the document the user gives, briefly."


def default_document() -> Path:
    """The stdlib's LICENSE.txt (real English text shipped with every CPython)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.is_file():
        raise KvtierError(f"the demo document {path} is missing; pass --document PATH")
    return path


@dataclass(frozen=True)
class DemoRow:
    question: str
    prompt_tokens: int
    reused_tokens: int
    tiers: str
    ttft_s: float
    answer: str


def run_demo(config: KvtierConfig, document: Path | None, max_new_tokens: int, console: Console) -> list[DemoRow]:
    """Load the model through kvtier, ask each question about the document, print and return the rows."""
    from kvtier.adapters.hf import CachedModel

    doc_path = document or default_document()
    text = doc_path.read_text(encoding="utf-8", errors="replace")
    console.print(f"[bold]kvtier demo[/]: model [cyan]{config.model}[/], chunk cache [cyan]{config.chunk_dir}[/]")
    with console.status("loading the model (converted once on first use)…"):
        cached = CachedModel.from_config(config)
    tok = cached.tokenizer
    assert tok is not None
    rows: list[DemoRow] = []
    try:
        for question in QUESTIONS:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Document:\n{text}\n\nQuestion: {question}"},
            ]
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            with console.status(f"prompt of {ids.shape[1]} tokens: {question}"):
                gen = cached.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
            answer = tok.decode(gen.new_tokens, skip_special_tokens=True).strip()
            rows.append(DemoRow(question, gen.prompt_tokens, gen.reused_tokens, gen.tiers, gen.ttft_s, answer))
        cached.engine.flush()
    finally:
        cached.close()
    table = Table(title=f"{doc_path.name}: cold, then warm")
    for col in ("#", "prompt tokens", "reused", "from tier", "TTFT (s)"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows, 1):
        table.add_row(str(i), str(r.prompt_tokens), str(r.reused_tokens), r.tiers, f"{r.ttft_s:.2f}")
    console.print(table)
    for i, r in enumerate(rows, 1):
        console.print(f"[bold]{i}. {r.question}[/]\n   {r.answer}")
    if len(rows) == 2 and rows[1].ttft_s > 0:
        console.print(f"TTFT speed-up of the second question: [bold]{rows[0].ttft_s / rows[1].ttft_s:.1f}x[/]")
    return rows
