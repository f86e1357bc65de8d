"""The smallest router for disaggregated prefill, as the tests' stand-in for a real one (the
production-stack router, llm-d): the prompt goes to a prefill server with max_tokens=1, then to a
decode server with the kv_transfer_params the prefill server answered with."""

from __future__ import annotations

from .servetools import Server


def prefill_then_decode(
    prefill: Server, decode: Server, prompt: list[int], max_tokens: int
) -> tuple[dict, dict]:
    """(the prefill server's response, the decode server's response)."""
    first = prefill.complete(prompt, 1, kv_transfer_params={"do_remote_decode": True})
    params = first.get("kv_transfer_params")
    extra = {"kv_transfer_params": params} if params else {}
    return first, decode.complete(prompt, max_tokens, **extra)


def cached_tokens(response: dict) -> int:
    return int((response["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def tokens(response: dict) -> list[int]:
    return list(response["choices"][0]["token_ids"])
