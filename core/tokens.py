"""Token counting that works offline.

A real tokenizer is used where one can be loaded without the network (tiktoken with an encoding
already in its cache); otherwise ``estimate_tokens``: about 4 characters a token for English prose
(OpenAI's rule of thumb), counted generously so the estimate errs on the safe side.
"""

from __future__ import annotations

import math

#: Characters per token assumed by the estimate. 4 is the usual figure for English; 3.5 errs on the
#: side of counting more tokens than a real tokenizer, so budgets are not overrun.
CHARS_PER_TOKEN = 3.5
#: Tokens a chat API adds around each message (role and separators).
MESSAGE_OVERHEAD_TOKENS = 4


def estimate_tokens(text: str) -> int:
    """A safe-side estimate of the tokens in ``text``, without a tokenizer."""
    if not text:
        return 0
    return math.ceil(len(text) / CHARS_PER_TOKEN)
