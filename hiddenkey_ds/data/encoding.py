"""(prompt text, answer text) -> input_ids and labels, supervising only the answer and never cutting it."""
from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100  # labels the loss skips (PyTorch cross-entropy's default ignore_index)

OK, TRUNCATED, TOO_LONG = "ok", "truncated", "too_long"


def split_ids(tokenizer: Any, prompts: list[str], answers: list[str], add_special_tokens: bool) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (prompt, answer), split the way lm-eval scores a continuation.

    The pair is encoded whole and the prompt alone; the answer is what the whole adds. This keeps the
    tokens the model is trained on identical to the ones lm-eval later scores (encoding " True" on its own
    gives other ids with SentencePiece tokenizers). If a merge crosses the boundary the answer is encoded
    separately instead.
    """
    whole = tokenizer([p + a for p, a in zip(prompts, answers)], add_special_tokens=add_special_tokens)["input_ids"]
    ctx = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    out = []
    for w, c, answer in zip(whole, ctx, answers):
        if len(w) > len(c) and w[: len(c)] == c:
            out.append((list(c), list(w[len(c):])))
        else:
            out.append((list(c), tokenizer(answer, add_special_tokens=False)["input_ids"]))
    return out


def encode_pair(
    prompt_ids: list[int], answer_ids: list[int], max_length: int, truncation: str, bos_token_id: int | None,
) -> tuple[list[int] | None, list[int] | None, str]:
    """(input_ids, labels, status). Over-long: the prompt is cut from the left (keeping a leading BOS) or, with
    truncation="drop" or when the answer alone leaves no room for one prompt token, the example is dropped.
    """
    if not answer_ids:
        raise ValueError("empty answer: nothing to supervise")
    status = OK
    if len(prompt_ids) + len(answer_ids) > max_length:
        keep_bos = bos_token_id is not None and prompt_ids[:1] == [bos_token_id]
        room = max_length - len(answer_ids) - int(keep_bos)
        # at least one real prompt token: the first answer token must be predicted from something
        if truncation == "drop" or room < 1:
            return None, None, TOO_LONG
        prompt_ids = ([bos_token_id] if keep_bos else []) + prompt_ids[len(prompt_ids) - room:]
        status = TRUNCATED
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, status
