"""Generation speed on this CPU, the ways slkit can decode, side by side in one run.

    python bench/cpu_generate.py --model builtin:qwen2.5-coder-0.5b-instruct --batches 1 16

Each row generates `--tokens` new tokens (forced: no early stop) for a batch of chat prompts with the
reference's sampling (temperature 0.7, top-k 20, top-p 0.8, repetition penalty 1.1), and reports seconds
per decode step, tokens/s and the time against the first row at the same batch:

- float32, transformers' sampler: do_sample=True (sorts and samples over the whole vocabulary each step);
- float32, TopKSampler: slkit's engine (slkit/engines/transformers.py), the same distribution among the top-k only;
- int8, TopKSampler: `engine.cpu_int8` (slkit.models.loading.quantize_int8_for_cpu, down_proj kept float32);
- bfloat16, TopKSampler: what `model.dtype: auto` picks on CPUs with AVX512-BF16 or AMX.

The last column is the mean KL divergence (nats per token) of the row's next-token distribution from
float32's over the same text: what the faster weights cost in fidelity.
"""
from __future__ import annotations

import argparse
import time

PROMPTS = ["Write an essay of about 300 words on why cities should plant more trees.",
           "写一篇大约400字的短文，介绍你家乡的一条河。",
           "Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "给一位刚退休的老师写一封感谢信，字数大于300字。"]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slkit.engines.transformers import TopKSampler
    from slkit.models.loading import compute_dtype, quantize_int8_for_cpu, resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per row (each a decode step)")
    args = parser.parse_args()
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, model.dtype auto -> {compute_dtype('auto', 'cpu')}")

    def render(text: str) -> str:
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return text

    sampling = dict(temperature=0.7, top_k=20, top_p=0.8)
    configs = [("float32", "transformers' sampler"), ("float32", "TopKSampler"), ("int8", "TopKSampler"),
               ("bfloat16", "TopKSampler")]
    reference_text = tokenizer(render(PROMPTS[0]) + " Trees give shade, clean the air and calm the streets.",
                               return_tensors="pt")
    reference_logprobs = None
    results: dict[tuple[str, str, int], float] = {}
    kl: dict[tuple[str, str], float] = {}
    for weights, sampler in configs:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if weights == "bfloat16"
                                                     else torch.float32).eval()
        if weights == "int8":
            quantize_int8_for_cpu(model, ["down_proj"])
        with torch.inference_mode():
            logprobs = model(**reference_text).logits[0].float().log_softmax(-1)
            if reference_logprobs is None:
                reference_logprobs = logprobs
            kl[weights, sampler] = float((reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1).mean())
            for batch in args.batches:
                texts = [render(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
                enc = tokenizer(texts, return_tensors="pt", padding=True)
                kwargs = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, repetition_penalty=1.1,
                              pad_token_id=tokenizer.pad_token_id)
                if sampler == "TopKSampler":
                    kwargs.update(do_sample=False, logits_processor=[TopKSampler(**sampling)])
                else:
                    kwargs.update(do_sample=True, **sampling)
                torch.manual_seed(0)
                start = time.perf_counter()
                model.generate(**enc, **kwargs)
                results[weights, sampler, batch] = (time.perf_counter() - start) / args.tokens
        del model
    first = configs[0]
    print("| weights | sampler | batch | s / step | tokens/s | time vs first row | KL to float32 |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for weights, sampler in configs:
            s = results[weights, sampler, batch]
            print(f"| {weights} | {sampler} | {batch} | {s:.3f} | {batch / s:.1f} | "
                  f"{s / results[first[0], first[1], batch]:.2f}x | {kl[weights, sampler]:.3g} |")


if __name__ == "__main__":
    main()
