"""Generation speed with the KV cache: meshattn against transformers' `generate` on the same model.

    python benchmarks/generate_speed.py [--rounds 5] [--prompt-len 128] [--new-tokens 64] [--tp2 auto]

One seeded Llama-shaped meshattn model (default d_model 512, 8 heads / 4 KV heads, 8 layers,
d_ff 1536, vocabulary 32000, RMSNorm, rotary, SwiGLU: 57.9M parameters, float32) is exported
with `meshattn.hf.save` to a temporary folder and loaded back by
`transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=float32, attn_implementation="sdpa")`,
so both libraries run the same weights. Both run in this process with torch.set_num_threads
(--threads, default 2); greedy decoding, no end-of-sequence id, so every request makes exactly
--new-tokens tokens.

1. Parity: the greedy tokens of both on the benchmark prompts (said per request: equal, or the
   first step where they part).
2. Throughput at batch 1 (one --prompt-len prompt) and batch 8 (lengths --prompt-len, -8, -16,
   ..., so the batch is ragged: meshattn right-pads internally, transformers gets them
   left-padded with an attention_mask). Prefill tokens/s counts real prompt tokens for both;
   decode tokens/s counts the tokens made by decode steps (each request's first token comes
   from the prefill). Timing:
   - meshattn: `meshattn.inference.run`'s own Generation.prefill_s / decode_s.
   - transformers: one `generate` call with a streamer that stamps time.perf_counter() at every
     put: prefill = from entering generate to the first new token (it includes generate's own
     set-up and the first token's argmax), decode = from the first to the last new token, per
     step = the gaps between stamps.
   - meshattn tp=2: 2 ranks x 1 thread on the same cores, in-process (meshattn.launch with
     `meshattn.hf.load` + `parallelize(.., ParallelDims(ParallelConfig(tp=2)))` and
     `meshattn.inference.run`, after a warm-up) and/or through the CLI, `meshattn generate
     --model FOLDER --tp 2 --greedy --json` (a fresh launch per call, no warm-up: its first
     forward is cold). The folder has a WordLevel tokenizer.json ("t0" .. "t{V-1}", split on
     whitespace), so a prompt text is its token ids exactly.
   Every round runs every engine once, alternating which library goes first; ratios to
   transformers are taken within a round, and the tables give medians over rounds.
3. Decode time per token against the context length (batch 1): a prompt of each --contexts
   length is prefilled, then --flat-steps tokens are decoded; the median step. For contrast the
   time per token without a cache: one forward over the whole context per token, the LM head on
   the last position only, by meshattn (a fresh Engine's prefill of the context: the reference
   forward) and by transformers (forward with use_cache=False, logits_to_keep=1, as generate
   calls it), --uncached-reps times at each --uncached-contexts length.

Writes --out .json (every measurement), .md (the tables) and .png (ms per token vs context).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "generate_speed"


# -- the model, its folder, the prompts

def build_reference(a):
    from meshattn.config import ModelConfig
    from meshattn.model.transformer import Transformer

    cfg = ModelConfig(d_model=a.d_model, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, n_layers=a.n_layers,
                      d_ff=a.d_ff, vocab_size=a.vocab, max_seq_len=a.max_seq_len, norm="rmsnorm", position="rope",
                      activation="swiglu")
    torch.manual_seed(a.seed)
    return Transformer(cfg).eval()


def word_tokenizer(vocab: int, folder: Path) -> None:
    """tokenizer.json mapping the word "t{i}" to id i (whitespace-split), so a prompt text is its ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))


def text_of(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def ids_of(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def export(ref, folder: Path) -> Path:
    import meshattn.hf

    meshattn.hf.save(ref, folder)
    word_tokenizer(ref.cfg.vocab_size, folder)
    return folder


def load_transformers(folder: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    hf.generation_config.bos_token_id = None
    return hf


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """batch 1: one prompt of prompt_len; more: lengths prompt_len, prompt_len - 8, ... (at least 8)."""
    g = torch.Generator().manual_seed(seed * 1000 + batch)
    lengths = [max(prompt_len - 8 * i, 8) for i in range(batch)]
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


# -- one generation by each engine, as a dict of the same fields

def mesh_generate(ref, prompts: list[list[int]], new: int) -> dict:
    from meshattn.inference import Sampling, run

    t0 = time.perf_counter()
    g = run(ref, prompts, new, Sampling(greedy=True))
    total = time.perf_counter() - t0
    return {"tokens": g.tokens, "prefill_s": g.prefill_s, "decode_s": g.decode_s, "steps": g.steps,
            "total_s": total, "prefill_tokens_per_s": g.prefill_tokens_per_s,
            "decode_tokens_per_s": g.decode_tokens_per_s}


class Stamps:
    """A transformers streamer (BaseStreamer's interface) that stamps the time of every put: the
    first is the prompt, then one per generated token (all rows at once)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(hf, prompts: list[list[int]], new: int) -> dict:
    B, S = len(prompts), max(map(len, prompts))
    ids = torch.zeros((B, S), dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding
        ids[b, S - len(p):] = torch.tensor(p)
        mask[b, S - len(p):] = 1
    stamps = Stamps()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0, streamer=stamps)
    total = time.perf_counter() - t0
    t = stamps.times[1:]  # the new tokens' stamps (the first put is the prompt)
    assert len(t) == new, (len(t), new)
    prefill_s, decode_s = t[0] - t0, t[-1] - t[0]
    prompt_tokens = sum(map(len, prompts))
    return {"tokens": out[:, S:].tolist(), "prefill_s": prefill_s, "decode_s": decode_s,
            "steps": [b - a for a, b in zip(t, t[1:])], "total_s": total,
            "prefill_tokens_per_s": prompt_tokens / prefill_s,
            "decode_tokens_per_s": (new - 1) * B / decode_s if decode_s > 0 else float("nan")}


# -- tensor parallelism: in-process (launch) or the CLI

def _tp_worker(folder: str, batches: list, new: int, out: str, tp: int) -> None:
    """One rank: load the folder, split it over tp, warm up, then generate every batch once."""
    import torch.distributed as dist

    import meshattn.hf
    from meshattn.config import ParallelConfig
    from meshattn.inference import Sampling, run
    from meshattn.mesh import ParallelDims
    from meshattn.parallel import parallelize

    ref = meshattn.hf.load(folder)
    model = parallelize(ref, ParallelDims(ParallelConfig(tp=tp)))
    del ref
    run(model, [batches[0][0][:16]], 4, Sampling(greedy=True))  # warm-up
    results = []
    for prompts in batches:
        g = run(model, prompts, new, Sampling(greedy=True))
        results.append({"tokens": g.tokens, "prefill_s": g.prefill_s, "decode_s": g.decode_s, "steps": g.steps,
                        "prefill_tokens_per_s": g.prefill_tokens_per_s, "decode_tokens_per_s": g.decode_tokens_per_s,
                        "threads": torch.get_num_threads()})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


def tp_inprocess(folder: Path, batches: list, new: int, tp: int) -> list[dict]:
    from meshattn.launch import launch

    with tempfile.TemporaryDirectory(prefix="gen-tp-") as d:
        out = Path(d) / "out.json"
        launch(_tp_worker, tp, args=(str(folder), batches, new, str(out), tp))
        return json.loads(out.read_text())


def cli_available() -> bool:
    r = subprocess.run([sys.executable, "-m", "meshattn", "generate", "--help"], capture_output=True, text=True)
    return r.returncode == 0 and "--json" in r.stdout


def tp_cli(folder: Path, prompts: list[list[int]], new: int, tp: int) -> dict:
    cmd = [sys.executable, "-m", "meshattn", "generate", "--model", str(folder), "--max-new-tokens", str(new),
           "--greedy", "--tp", str(tp), "--json", "--no-progress"]
    for p in prompts:
        cmd += ["--prompt", text_of(p)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"meshattn generate failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    tokens = [o["token_ids"] if isinstance(o, dict) and "token_ids" in o else ids_of(o if isinstance(o, str) else o["text"])
              for o in data["outputs"]]
    return {"tokens": tokens, "prefill_tokens_per_s": data["prefill_tokens_per_s"],
            "decode_tokens_per_s": data["decode_tokens_per_s"], "wall_s": total, "raw": data}


# -- parity

def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def parity(mesh: list[list[int]], other: list[list[int]]) -> dict:
    diffs = [first_difference(m, o) for m, o in zip(mesh, other)]
    return {"equal": sum(d is None for d in diffs), "requests": len(diffs), "first_difference": diffs}


# -- the measurements

def throughput(a, ref, hf, folder: Path, log) -> dict:
    batches = {b: make_prompts(b, a.prompt_len, a.vocab, a.seed) for b in a.batch}
    for b, prompts in batches.items():  # warm-up: threads, allocator, transformers' first-call set-up
        mesh_generate(ref, prompts, 4)
        hf_generate(hf, prompts, 4)
    rounds = []
    for r in range(a.rounds):
        row: dict = {"round": r + 1, "load_before": os.getloadavg()[0]}
        order = ["meshattn", "transformers"] if r % 2 == 0 else ["transformers", "meshattn"]
        for b, prompts in batches.items():
            for engine in order:
                res = mesh_generate(ref, prompts, a.new_tokens) if engine == "meshattn" else \
                    hf_generate(hf, prompts, a.new_tokens)
                row[f"{engine}/b{b}"] = res
                log(f"round {r + 1} b{b} {engine:12s} prefill {res['prefill_tokens_per_s']:8.0f} tok/s  decode "
                    f"{res['decode_tokens_per_s']:7.1f} tok/s  median step {1e3 * statistics.median(res['steps']):6.1f} ms")
        if a.tp2 in ("inprocess", "both"):
            res = tp_inprocess(folder, list(batches.values()), a.new_tokens, 2)
            for b, x in zip(batches, res):
                row[f"tp2/b{b}"] = x
                log(f"round {r + 1} b{b} {'tp2':12s} prefill {x['prefill_tokens_per_s']:8.0f} tok/s  decode "
                    f"{x['decode_tokens_per_s']:7.1f} tok/s  median step {1e3 * statistics.median(x['steps']):6.1f} ms")
        if a.tp2 in ("cli", "both"):
            for b, prompts in batches.items():
                x = tp_cli(folder, prompts, a.new_tokens, 2)
                row[f"tp2-cli/b{b}"] = x
                log(f"round {r + 1} b{b} {'tp2 (CLI)':12s} prefill {x['prefill_tokens_per_s']:8.0f} tok/s  decode "
                    f"{x['decode_tokens_per_s']:7.1f} tok/s  wall {x['wall_s']:.1f} s")
        row["load_after"] = os.getloadavg()[0]
        rounds.append(row)
    first = rounds[0]
    checks = {}
    for b in batches:
        mesh = first[f"meshattn/b{b}"]["tokens"]
        checks[f"transformers/b{b}"] = parity(mesh, first[f"transformers/b{b}"]["tokens"])
        for other in ("tp2", "tp2-cli"):
            if f"{other}/b{b}" in first:
                checks[f"{other}/b{b}"] = parity(mesh, first[f"{other}/b{b}"]["tokens"])
    return {"prompt_lengths": {b: list(map(len, p)) for b, p in batches.items()}, "rounds": rounds, "parity": checks}


def context_sweep(a, ref, hf, log) -> dict:
    g = torch.Generator().manual_seed(a.seed + 7)
    longest = max(a.contexts + a.uncached_contexts)
    ids = torch.randint(1, a.vocab, (1, longest), generator=g)
    mesh_generate(ref, [ids[0, :64].tolist()], 4)  # warm-up
    cached = {}
    for r in range(a.flat_rounds):
        for n in a.contexts:
            prompt = [ids[0, :n].tolist()]
            order = ["meshattn", "transformers"] if r % 2 == 0 else ["transformers", "meshattn"]
            for engine in order:
                res = mesh_generate(ref, prompt, a.flat_steps + 1) if engine == "meshattn" else \
                    hf_generate(hf, prompt, a.flat_steps + 1)
                cached.setdefault(engine, {}).setdefault(n, []).append(
                    {"median_step_ms": 1e3 * statistics.median(res["steps"]), "prefill_s": res["prefill_s"],
                     "tokens": res["tokens"][0]})
                log(f"context {n:5d} {engine:12s} cached: median decode step "
                    f"{1e3 * statistics.median(res['steps']):6.1f} ms (prefill {res['prefill_s']:.2f} s)")
    from meshattn.inference import Engine

    uncached = {"meshattn": {}, "transformers": {}}
    with torch.no_grad():
        for n in a.uncached_contexts:
            x = ids[:, :n]
            for r in range(a.uncached_reps):
                for engine in (["meshattn", "transformers"] if r % 2 == 0 else ["transformers", "meshattn"]):
                    t0 = time.perf_counter()
                    if engine == "meshattn":
                        Engine(ref).prefill([x[0].tolist()], 1)  # the whole context again, head on the last token
                    else:
                        hf(input_ids=x, use_cache=False, logits_to_keep=1)
                    ms = 1e3 * (time.perf_counter() - t0)
                    uncached[engine].setdefault(n, []).append(ms)
                    log(f"context {n:5d} {engine:12s} no cache: one forward over the context {ms:8.1f} ms")
    return {"cached": cached, "uncached": uncached}


# -- reporting

def med(xs):
    return statistics.median(xs)


def fmt_range(xs, f="{:,.0f}") -> str:
    return f"{f.format(med(xs))} ({f.format(min(xs))}-{f.format(max(xs))})"


def throughput_table(t: dict, a) -> list[str]:
    rounds = t["rounds"]
    engines = [("meshattn", "meshattn, 1 process", f"1x{a.threads}t"),
               ("transformers", "transformers generate", f"1x{a.threads}t"),
               ("tp2", "meshattn tp=2 (in-process, warm)", "2x1t"),
               ("tp2-cli", "meshattn tp=2 (`meshattn generate --tp 2 --json`)", "2x1t")]
    lines = ["| batch | engine | ranks x threads | prefill tok/s, median (min-max) | vs transformers | "
             "decode tok/s, median (min-max) | vs transformers | decode step ms, median |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for b in a.batch:
        for key, name, rt in engines:
            k = f"{key}/b{b}"
            if k not in rounds[0]:
                continue
            pre = [r[k]["prefill_tokens_per_s"] for r in rounds]
            dec = [r[k]["decode_tokens_per_s"] for r in rounds]
            hf = f"transformers/b{b}"
            rp = [r[k]["prefill_tokens_per_s"] / r[hf]["prefill_tokens_per_s"] for r in rounds]
            rd = [r[k]["decode_tokens_per_s"] / r[hf]["decode_tokens_per_s"] for r in rounds]
            steps = [med(r[k]["steps"]) * 1e3 for r in rounds if r[k].get("steps")]
            lines.append(f"| {b} | {name} | {rt} | {fmt_range(pre)} | {med(rp):.2f}x | {fmt_range(dec, '{:,.1f}')} | "
                         f"{med(rd):.2f}x | {med(steps):.1f} |" if steps else
                         f"| {b} | {name} | {rt} | {fmt_range(pre)} | {med(rp):.2f}x | {fmt_range(dec, '{:,.1f}')} | "
                         f"{med(rd):.2f}x | - |")
    lines.append("")
    lines.append("Load average (1 min) before each round: " + ", ".join(f"{r['load_before']:.1f}" for r in rounds) + ".")
    lines.append("")
    lines.append("Per-round ratios meshattn / transformers (prefill; decode): " + "; ".join(
        f"b{b}: " + ", ".join(f"{r[f'meshattn/b{b}']['prefill_tokens_per_s'] / r[f'transformers/b{b}']['prefill_tokens_per_s']:.2f}"
                              for r in rounds) + " / " + ", ".join(
            f"{r[f'meshattn/b{b}']['decode_tokens_per_s'] / r[f'transformers/b{b}']['decode_tokens_per_s']:.2f}"
            for r in rounds) for b in a.batch) + ".")
    return lines


def parity_lines(t: dict) -> list[str]:
    out = []
    for k, p in t["parity"].items():
        diffs = [d for d in p["first_difference"] if d is not None]
        more = "" if not diffs else f" (the others part at new token {', '.join(map(str, diffs))})"
        out.append(f"- meshattn vs {k}: {p['equal']}/{p['requests']} requests' greedy tokens identical{more}")
    return out


def sweep_table(s: dict) -> list[str]:
    contexts = sorted({int(n) for e in s["cached"].values() for n in e} | {int(n) for e in s["uncached"].values()
                                                                           for n in e})
    lines = ["| context | meshattn, KV cache | transformers, KV cache | meshattn, no cache (prefill of the whole context) | "
             "transformers, no cache (use_cache=False) |", "|---:|---:|---:|---:|---:|"]

    def cell(d: dict, n: int, field=None) -> str:
        v = d.get(n, d.get(str(n)))
        if not v:
            return "-"
        xs = [x[field] for x in v] if field else v
        return f"{med(xs):.1f}"

    for n in contexts:
        lines.append(f"| {n} | {cell(s['cached'].get('meshattn', {}), n, 'median_step_ms')} | "
                     f"{cell(s['cached'].get('transformers', {}), n, 'median_step_ms')} | "
                     f"{cell(s['uncached']['meshattn'], n)} | {cell(s['uncached']['transformers'], n)} |")
    return lines


def sweep_summary(s: dict) -> list[str]:
    """Each series' time per token at its longest context over its shortest."""
    out = []
    for kind, engines in (("KV cache", s["cached"]), ("no cache", s["uncached"])):
        for engine, d in engines.items():
            if len(d) < 2:
                continue
            lo, hi = min(d), max(d)
            val = lambda n: med([x["median_step_ms"] for x in d[n]] if kind == "KV cache" else d[n])  # noqa: E731
            out.append(f"- {engine}, {kind}: {val(hi):.1f} ms per token at {hi} tokens of context against "
                       f"{val(lo):.1f} ms at {lo} ({val(hi) / val(lo):.2f}x for {hi / lo:.0f}x the context)")
    return out


def plot(s: dict, path: Path, title: str) -> None:
    """Left: every series, log-log. Right: the cached series alone on a linear scale from 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4.5))
    series = [(s["cached"].get("meshattn", {}), "median_step_ms", "meshattn, KV cache", "C0", "o-"),
              (s["cached"].get("transformers", {}), "median_step_ms", "transformers, KV cache", "C1", "s-"),
              (s["uncached"]["meshattn"], None, "meshattn, no cache (prefill of the whole context)", "C0", "o--"),
              (s["uncached"]["transformers"], None, "transformers, no cache (use_cache=False)", "C1", "s--")]
    for d, field, label, color, style in series:
        if not d:
            continue
        xs = sorted(d)
        ys = [med([v[field] for v in d[n]] if field else d[n]) for n in xs]
        ax.plot(xs, ys, style, color=color, label=label)
        if field:
            zoom.plot(xs, ys, style, color=color, label=label)
    for a in (ax, zoom):
        a.set_xscale("log", base=2)
        a.set_xlabel("context length (tokens)")
        a.set_ylabel("ms per generated token (batch 1)")
        a.grid(True, which="both", alpha=0.3)
        xs = sorted({n for d, *_ in series for n in d})
        a.set_xticks(xs, [str(x) for x in xs])
    ax.set_yscale("log")
    ax.set_title("with and without a KV cache (log scale)", fontsize=9)
    zoom.set_ylim(bottom=0)
    zoom.set_title("with a KV cache (linear scale)", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_md(path: Path, a, info: dict, t: dict | None, s: dict | None, png: Path | None) -> None:
    lines = ["# Generation speed (benchmarks/generate_speed.py)", "",
             f"Command: `{info['command']}`", "",
             f"Machine: {info['machine']}; torch {info['torch']}, transformers {info['transformers']}, "
             f"{a.threads} threads; load average {info['load_start']:.1f} at the start, {info['load_end']:.1f} at the end; "
             f"{info['wall_s']:.0f} s in all.", "",
             f"Model: {info['model']}.", ""]
    if t is not None:
        lines += [f"## Throughput: prompt lengths {t['prompt_lengths']}, {a.new_tokens} new tokens, greedy, "
                  f"{a.rounds} alternating rounds", ""]
        lines += throughput_table(t, a) + [""] + parity_lines(t) + [""]
    if s is not None:
        lines += [f"## Milliseconds per generated token against the context (batch 1; cached: median of "
                  f"{a.flat_steps} decode steps, median over {a.flat_rounds} rounds; no cache: median of "
                  f"{a.uncached_reps} forwards)", ""]
        lines += sweep_table(s) + [""]
        lines += sweep_summary(s) + [""]
        if png is not None:
            lines += [f"![ms per token vs context]({png.name})", ""]
    path.write_text("\n".join(lines))


def slim(data: dict) -> dict:
    """The record to keep: tokens of the first round only (parity is judged there), no CLI echo,
    times rounded to 0.1 microsecond."""
    def walk(x, keep_tokens):
        if isinstance(x, dict):
            return {k: walk(v, keep_tokens) for k, v in x.items()
                    if k != "raw" and not (k == "tokens" and not keep_tokens)}
        if isinstance(x, list):
            return [walk(v, keep_tokens) for v in x]
        return round(x, 7) if isinstance(x, float) else x

    t = data.get("throughput")
    if t is not None:
        t = dict(t, rounds=[walk(r, i == 0) for i, r in enumerate(t["rounds"])])
    return walk(dict(data, throughput=t), True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the single process (both libraries)")
    p.add_argument("--prompt-len", type=int, default=128, help="the longest prompt of a batch")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tp2", default="auto", choices=["auto", "inprocess", "cli", "both", "none"],
                   help="how tp=2 runs (auto: both when `meshattn generate` exists, else in-process)")
    p.add_argument("--contexts", type=int, nargs="*", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--flat-steps", type=int, default=32, help="decode steps timed at each context")
    p.add_argument("--flat-rounds", type=int, default=3)
    p.add_argument("--uncached-contexts", type=int, nargs="*", default=[128, 512, 1024, 2048, 4096])
    p.add_argument("--uncached-reps", type=int, default=2)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--out", default=str(OUT), help="writes OUT.json, OUT.md and OUT.png")
    a = p.parse_args()
    if max(a.contexts + a.uncached_contexts + [a.prompt_len]) + a.flat_steps + a.new_tokens > a.max_seq_len:
        p.error("--max-seq-len must hold the longest context plus the new tokens")
    if a.tp2 == "auto":
        a.tp2 = "both" if cli_available() else "inprocess"

    import transformers

    torch.set_num_threads(a.threads)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    log = lambda m: print(f"[{time.perf_counter() - start:6.1f}s] {m}", flush=True)  # noqa: E731
    ref = build_reference(a)
    params = sum(p.numel() for p in ref.parameters())
    tmp = Path(tempfile.mkdtemp(prefix="gen-speed-"))
    try:
        folder = export(ref, tmp / "model")
        hf = load_transformers(folder)
        log(f"model {params / 1e6:.1f}M params exported to {folder} and loaded by transformers; tp2: {a.tp2}")
        t = None if a.skip_throughput else throughput(a, ref, hf, folder, log)
        s = None if a.skip_sweep else context_sweep(a, ref, hf, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    info = {"command": " ".join(["python benchmarks/generate_speed.py", *sys.argv[1:]]),
            "machine": f"{os.cpu_count()} cores of {cpu}, no GPU, Python {platform.python_version()}",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "load_start": load_start, "load_end": os.getloadavg()[0], "wall_s": time.perf_counter() - start,
            "model": f"Llama-shaped, d_model {a.d_model}, {a.n_heads} heads / {a.n_kv_heads} KV heads, {a.n_layers} "
                     f"layers, d_ff {a.d_ff} (SwiGLU), vocabulary {a.vocab}, RMSNorm, rotary, float32, "
                     f"{params / 1e6:.1f}M parameters, seed {a.seed}"}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = None
    if s is not None:
        png = out.with_suffix(".png")
        plot(s, png, f"Llama-shaped, d_model {a.d_model}, {a.n_heads}/{a.n_kv_heads} heads, {a.n_layers} layers, "
                     f"vocabulary {a.vocab}, fp32 ({params / 1e6:.1f}M); {a.threads} threads on {os.cpu_count()} cores")
    out.with_suffix(".json").write_text(json.dumps(slim({"args": vars(a), "info": info, "throughput": t, "sweep": s}),
                                                   default=str))
    write_md(out.with_suffix(".md"), a, info, t, s, png)
    log(f"wrote {out.with_suffix('.md')}")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
