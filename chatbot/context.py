"""What is sent upstream: system prompt, history, new message, within a token budget."""
import math

PER_MESSAGE_TOKENS = 4  # role markers and separators of a chat template


def estimate_tokens(text):
    """A deliberately high estimate of a text's token count, for any tokenizer.

    English runs about 4 characters a token, so 3 over-counts it; a Hangul
    syllable is 1 to 3 tokens depending on the vocabulary, so every non-ASCII
    character counts as 2. Over-counting only trims history a little early;
    under-counting would overflow the model's context.
    """
    ascii_chars = sum(1 for c in text if c < "\x80")
    return math.ceil(ascii_chars / 3) + 2 * (len(text) - ascii_chars) + PER_MESSAGE_TOKENS


def count_tokens(messages):
    return sum(estimate_tokens(m["content"]) for m in messages)


def fits(system_prompt, new_message, budget):
    """Whether the system prompt and the new message alone fit the budget."""
    return estimate_tokens(system_prompt) + estimate_tokens(new_message) <= budget


def fits_messages(messages, budget):
    """Whether a client's own context can be sent: its system messages and its
    last message alone fit the budget."""
    system = [m for m in messages[:-1] if m["role"] == "system"]
    return count_tokens(system + messages[-1:]) <= budget


def trim(messages, budget):
    """A client's own context (OpenAI-style: any system messages anywhere),
    within the budget: the system messages and the last message are kept (the
    caller has checked with fits_messages()), then as many of the latest others
    as fit, dropped as build() drops them, order unchanged."""
    last = len(messages) - 1
    keep = {i for i, m in enumerate(messages) if m["role"] == "system"} | {last}
    used = count_tokens([messages[i] for i in keep])
    kept = [last]   # newest first
    for i in range(last - 1, -1, -1):
        if i in keep:
            continue
        used += estimate_tokens(messages[i]["content"])
        if used > budget:
            while len(kept) > 1 and messages[kept[-1]]["role"] == "assistant":
                kept.pop()
            break
        kept.append(i)
    keep.update(kept)
    return [m for i, m in enumerate(messages) if i in keep]


def build(system_prompt, history, budget):
    """[system] + as many of the latest `history` messages as fit the budget.

    history ends with the new user message, which is always kept (the caller
    has checked with fits() that it fits beside the system prompt). Older
    messages are dropped whole, oldest turn first: when the budget ends inside
    a turn, its reply goes too, so that the context never starts with a reply
    to a question that is no longer in it (some chat templates reject that).
    """
    used = estimate_tokens(system_prompt) + estimate_tokens(history[-1]["content"])
    kept = [history[-1]]   # newest first
    for message in reversed(history[:-1]):
        used += estimate_tokens(message["content"])
        if used > budget:
            while len(kept) > 1 and kept[-1]["role"] == "assistant":
                kept.pop()
            break
        kept.append(message)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + kept[::-1]
