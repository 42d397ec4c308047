"""Rollout throughput of the torch engine on a GRPO-shaped batch, side by side in one process.

The same rows (A adapters x P prompts x G samples of one chat-templated question, as in
examples/quickstart) are generated four ways, interleaved --repeats times, medians reported:

- ``shared``: the engine as the trainer runs it, one prefill per distinct (adapter, prompt);
- ``per-row``: the engine with ``share_prefill=False``, every row prefilling its own prompt;
- ``shared, base``: the shared engine with every row on the base model (adapter None);
- ``hf generate``: transformers' ``generate`` on the base model with the same rows (sampled);
- ``shared, one adapter``: the torch engine with every row on the first adapter;
- where vLLM is installed (``make test-vllm`` builds such an environment; ``--vllm off`` skips
  it): ``vllm, mixed`` (the vLLM engine, the same mixed batch) and ``vllm, one adapter``.

Prints seconds and generated tokens per second for each, and the ratios to ``shared``.
Usage: ``python bench/bench_rollout.py [--repeats N] [--threads N] [--model URI] [--adapters 8]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from quickstart_adapters import add_quickstart_adapters

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.model_host import BaseModel, load_base_model
from loraplex_trainer.rollout import GenerationRequest, RolloutEngine
from loraplex_trainer.rollout.base import EngineLimits
from loraplex_trainer.rollout.choice import vllm_installed
from loraplex_trainer.rollout.torch_engine import TorchRolloutEngine

QUESTIONS = [
    "What is 7 + 5? Answer with just the number.",
    "How many times does the letter r appear in 'strawberry'?",
    "Sort these numbers in ascending order: 42, 7, 19, 3, 88.",
    "What is 9 - 4? Answer with just the number.",
    "How many times does the letter s appear in 'mississippi'?",
    "Sort these numbers in ascending order: 5, 61, 12, 30.",
    "What is 3 * 6? Answer with just the number.",
    "What is 8 + 8? Answer with just the number.",
]


def build_model(base: BaseModel, adapters: int) -> tuple[MultiLoRAModel, list[str]]:
    """Wrap the base with the quickstart's adapters; random B so that every adapter changes the output."""
    model = MultiLoRAModel(base.model)
    names = add_quickstart_adapters(model, adapters)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            for parameter in model.adapter_parameters(name)[1::2]:  # A, B, A, B, ...: the Bs
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return model, names


def build_requests(
    base: BaseModel, names: list[str], prompts: int, group: int, max_new_tokens: int
) -> list[GenerationRequest]:
    """promptsPerStep x groupSize sampled rows per adapter, grouped as the trainer sends them."""
    requests = []
    for a, name in enumerate(names):
        for p in range(prompts):
            question = QUESTIONS[(a * prompts + p) % len(QUESTIONS)]
            messages = [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": question},
            ]
            text = base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
            for g in range(group):
                seed = 1000 * a + 10 * p + g
                requests.append(GenerationRequest(prompt_ids, name, max_new_tokens, seed=seed))
    return requests


def hf_generate(base: BaseModel, requests: list[GenerationRequest], stop_ids: frozenset[int]) -> int:
    """Sample every request's prompt with transformers' generate; return the tokens up to each stop."""
    width = max(len(r.prompt_ids) for r in requests)
    pad = base.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests])
    starts = torch.tensor([width - len(r.prompt_ids) for r in requests])
    attention_mask = (torch.arange(width)[None, :] >= starts[:, None]).long()
    with torch.inference_mode():
        # mypy sees PreTrainedModel without GenerationMixin; every causal LM has generate.
        output = base.model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=requests[0].max_new_tokens,
            pad_token_id=pad,
            eos_token_id=sorted(stop_ids),
        )
    tokens = 0
    for row in output[:, width:].tolist():
        stop = next((k for k, token in enumerate(row) if token in stop_ids), len(row) - 1)
        tokens += stop + 1
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin://smollm2-135m-instruct")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2, help="distinct prompts per adapter")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO groupSize)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--vllm", choices=["auto", "off"], default="auto", help="vLLM arms where it is installed"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    base = load_base_model(args.model)
    model, names = build_model(base, args.adapters)
    requests = build_requests(base, names, args.prompts, args.group, args.max_new_tokens)
    base_requests = [GenerationRequest(r.prompt_ids, None, r.max_new_tokens, seed=r.seed) for r in requests]
    shared = TorchRolloutEngine(model, base.tokenizer)
    per_row = TorchRolloutEngine(model, base.tokenizer, share_prefill=False)

    one = [GenerationRequest(r.prompt_ids, names[0], r.max_new_tokens, seed=r.seed) for r in requests]

    def tokens_of(engine: RolloutEngine, rows: list[GenerationRequest]) -> Callable[[], int]:
        return lambda: sum(len(c.token_ids) for c in engine.generate(rows))

    arms: dict[str, Callable[[], int]] = {
        "shared": tokens_of(shared, requests),
        "per-row": tokens_of(per_row, requests),
        "shared, base": tokens_of(shared, base_requests),
        "hf generate": lambda: hf_generate(base, base_requests, shared.stop_ids),
        "shared, one adapter": tokens_of(shared, one),
    }
    if args.vllm == "auto" and vllm_installed():
        from loraplex_trainer.rollout.vllm_engine import VLLMRolloutEngine

        limits = EngineLimits(max_adapters=len(names), max_rank=64, max_model_len=1024, enforce_eager=True)
        served = VLLMRolloutEngine(model, base, limits)
        for name in names:
            served.sync_adapter(name)
        arms["vllm, mixed"] = tokens_of(served, requests)
        arms["vllm, one adapter"] = tokens_of(served, one)
        arms["vllm, mixed"]()  # warm-up
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    tokens: dict[str, list[int]] = {arm: [] for arm in arms}
    arms["shared"]()  # warm-up: first-call allocations and lazy initialisation
    for _ in range(args.repeats):
        for arm, run in arms.items():  # interleaved, so load changes hit every arm alike
            torch.manual_seed(0)
            started = time.perf_counter()
            tokens[arm].append(run())
            seconds[arm].append(time.perf_counter() - started)

    prompt_lengths = sorted({len(r.prompt_ids) for r in requests})
    print(
        f"{args.model}: {len(requests)} rows = {args.adapters} adapters x {args.prompts} prompts x "
        f"{args.group} samples, prompts of {prompt_lengths} tokens, max_new_tokens={args.max_new_tokens}, "
        f"threads={torch.get_num_threads()}, repeats={args.repeats} (medians)"
    )
    reference = statistics.median(seconds["shared"])
    reference_rate = statistics.median(tokens["shared"]) / reference
    print(
        f"{'arm':<20} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'time / shared':>14} {'rate / shared':>14}"
    )
    for arm in arms:
        median_seconds = statistics.median(seconds[arm])
        median_tokens = statistics.median(tokens[arm])
        rate = median_tokens / median_seconds
        print(
            f"{arm:<20} {median_seconds:>8.2f} {median_tokens:>7.0f} {rate:>9.1f} "
            f"{median_seconds / reference:>14.2f} {rate / reference_rate:>14.2f}"
        )


if __name__ == "__main__":
    main()
