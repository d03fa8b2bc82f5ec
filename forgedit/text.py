"""E(s): the CLIP text encoder's ``last_hidden_state`` for a prompt, as SD conditions on it.

Tokenised to exactly 77 tokens (``padding="max_length"``, truncation), no attention mask,
after the final LayerNorm; never the pooled output or ``hidden_states[-2]`` (spec §12).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer


def tokenize(tokenizer: CLIPTokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompt(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str
) -> torch.Tensor:
    """[1, 77, D] for one prompt. Prompts are encoded one at a time, as the original does:
    batching several prompts through the encoder rounds differently (~1e-7)."""
    device = next(text_encoder.parameters()).device
    return text_encoder(tokenize(tokenizer, prompt).to(device))[0]
