"""Prefix training of a decoder with the HF Trainer, and ``generate()`` before and after.

    python -m examples.causal_lm_prefix

No pretrained decoder is available offline, so the example builds a tiny Llama from a config and first pre-trains it
(all weights) on number sequences that count up by 1 (75%) or by 2 (25%). Given one number, the base model therefore
continues +1. Then the base is frozen and a P-Tuning v2 adapter is trained on +2 sequences only: the same frozen
model, steered by the prefix alone, continues +2. ``--model-type gpt2`` runs the same on a tiny GPT-2.
"""

from __future__ import annotations

import argparse
import sys

import torch

NUMBERS = 32
PAD, BOS = NUMBERS, NUMBERS + 1
VOCAB = NUMBERS + 2
LENGTH = 10


def sequences(size: int, strides: tuple[int, ...], weights: tuple[float, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, NUMBERS, (size, 1), generator=generator)
    choice = torch.multinomial(torch.tensor(weights), size, replacement=True, generator=generator)
    stride = torch.tensor(strides)[choice].unsqueeze(1)
    body = (start + stride * torch.arange(LENGTH - 1)) % NUMBERS
    return torch.cat([torch.full((size, 1), BOS), body], dim=1)


class LMRows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def tiny_decoder(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=BOS, eos_token_id=PAD, pad_token_id=PAD)
    else:
        config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=BOS, eos_token_id=PAD,
                                      pad_token_id=PAD)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def pretrain(model, steps: int) -> None:
    """Plain full training of the base model (stands in for a pretrained checkpoint)."""
    data = sequences(4096, (1, 2), (0.75, 0.25), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (64,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def continuation(model, first: int, new_tokens: int = 7) -> list[int]:
    prompt = torch.tensor([[BOS, first]])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=PAD)
    return out[0, 1:].tolist()


def stride_share(model, stride: int, prompts: int = NUMBERS) -> float:
    """Share of one-number prompts (0, 1, ...) whose greedy continuation counts by ``stride`` throughout."""
    hits = 0
    for first in range(prompts):
        out = continuation(model, first)
        hits += all((b - a) % NUMBERS == stride for a, b in zip(out, out[1:]))
    return hits / prompts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="llama", choices=["llama", "gpt2", "qwen2", "mistral"])
    parser.add_argument("--output-dir", default="runs/causal_lm_prefix")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--num-virtual-tokens", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=NUMBERS, help="one-number prompts scored before/after")
    args = parser.parse_args(argv)

    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from ptv2_plugin import PTuningV2Config

    base = tiny_decoder(args.model_type)
    pretrain(base, args.pretrain_steps)
    before = {f"stride_{k}": stride_share(base, k, args.prompts) for k in (1, 2)} | {"sample": continuation(base, 5)}

    model = get_peft_model(base, PTuningV2Config(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens))
    model.print_trainable_parameters()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=f"{args.output_dir}/checkpoints",
            max_steps=args.max_steps,
            per_device_train_batch_size=32,
            learning_rate=args.learning_rate,
            save_strategy="no",
            logging_steps=25,
            report_to=[],
        ),
        train_dataset=LMRows(sequences(2048, (2,), (1.0,), seed=1)),
    )
    trainer.train()
    model.eval()
    trainer.save_model(f"{args.output_dir}/adapter")
    after = {f"stride_{k}": stride_share(model, k, args.prompts) for k in (1, 2)} | {"sample": continuation(model, 5)}
    with model.disable_adapter():
        unchanged = continuation(model, 5) == before["sample"]

    print(f"prompt [5], base model:        {before['sample']}  (counts +1 for {before['stride_1']:.0%} of prompts, "
          f"+2 for {before['stride_2']:.0%})")
    print(f"prompt [5], with the prefix:   {after['sample']}  (counts +2 for {after['stride_2']:.0%} of prompts)")
    print(f"adapter disabled again gives the base output: {unchanged}")
    return {"before": before, "after": after, "base_unchanged": unchanged}


if __name__ == "__main__":
    main(sys.argv[1:])
