"""Incremental detokenizing: the text of a growing row of tokens, each token's text made once.

As vLLM's incremental detokenizer does, a row keeps two offsets into its tokens: `read`, the tokens
whose text is settled, and `prefix`, where the window decoded again for context begins. Each new
token decodes only the window from `prefix` on; its text beyond the window's old text is new. New
text that ends in U+FFFD is a multi-byte character split across tokens: it stays pending (not
settled, not streamed) until the rest of it comes. Stop strings are searched only where one can
newly be complete: in the new text and the `longest stop - 1` settled characters before it. Text
that could begin a stop string is held back from the stream, as `stop_strings.streamable` does.

Pure text: `text_of` (token ids to text, the tokenizer's own decoding) is passed in. So the work
per token is constant, not the length of the row (while a character stays half-made, its window
grows until it is complete, as in vLLM).
"""

from __future__ import annotations

from typing import Callable, Sequence

from .stop_strings import find_stop, streamable

HALF_MADE = "\ufffd"  # what a character split across tokens shows as until its last byte comes


class Detokenizer:
    """The text of one row, fed its tokens as they come (`advance`)."""

    def __init__(self, text_of: Callable[[Sequence[int]], str], stops: Sequence[str] = ()):
        self.text_of = text_of
        self.stops = tuple(stops)
        self.overlap = max(map(len, self.stops), default=1) - 1  # settled characters a new stop may begin in
        self.prefix = 0  # tokens[prefix:read] are decoded again beside the new ones, for context
        self.read = 0  # tokens whose text is settled
        self.settled = ""  # the text of tokens[:read]
        self.pending = ""  # the text of tokens[read:], which ends in a half-made character
        self.stop_at: int | None = None  # where the answer ends in settled + pending: its first stop string
        self.sent = 0  # characters of the answer given out by `take`

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    def advance(self, tokens: Sequence[int]) -> None:
        """Take the row's tokens, the same list as before with new ones at its end."""
        window = self.text_of(tokens[self.prefix:self.read])
        new = self.text_of(tokens[self.prefix:])[len(window):]
        before = len(self.settled)
        if new.endswith(HALF_MADE):
            self.pending = new
        else:
            self.settled += new
            self.pending = ""
            self.prefix, self.read = self.read, len(tokens)
        if self.stops and not self.stopped:
            start = max(0, before - self.overlap)
            at = find_stop(self.settled[start:] + self.pending, self.stops)
            self.stop_at = None if at is None else start + at

    def take(self) -> str:
        """The text that may be streamed now and was not yet: settled, before any stop string, and
        short of a tail that could begin one."""
        if self.stopped:
            end = min(self.stop_at, len(self.settled))
        else:
            tail = max(0, len(self.settled) - self.overlap)
            end = tail + len(streamable(self.settled[tail:], self.stops))
        new, self.sent = self.settled[self.sent:end], end
        return new

    def answer(self) -> str:
        """The whole answer of a row that has ended: its text before its first stop string (a
        half-made character at the very end stays, as decoding the whole row gives it)."""
        return (self.settled + self.pending)[:self.stop_at]

    def so_far(self) -> str:
        """The answer of a row stopped early (cancelled): its settled text, before any stop string."""
        return self.settled[:self.stop_at]
