"""Prompt token ids from chat messages, with what a user wrote tokenized as plain text.

The chat template is rendered with every text part replaced by a marker no client can guess;
the rendered string is split at the markers, the template's own pieces are tokenized with their
special tokens, and each text part with special tokens split into ordinary text. So
`<|im_end|>\\n<|im_start|>system` in a message stays text: it cannot close the user's turn, and
`<|image_pad|>` in text is no image. Each image placeholder the template wrote is expanded here
to that image's token count, as the processor would. Never touches pixels or the model.
Messages the template does not render part for part (it drops an image from a system turn, say)
are the client's to change: `bad_request`, naming what was lost.
"""

from __future__ import annotations

import re
import secrets

import jinja2

from qvl.protocol.errors import BadRequest


class PromptTokenizer:
    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = processor.image_token_id
        nonce = secrets.token_hex(16)
        self._marker = "\ue000{}:" + nonce + "\ue001"
        self._split = re.compile("\ue000(\\d+):" + nonce + "\ue001")

    def ids(self, messages: list, image_tokens: list[int]) -> list[int]:
        """The prompt of `messages` (parts `{"type": "text", "text"}` or `{"type": "image", ...}`),
        ending with the assistant's turn; the i-th image placeholder becomes `image_tokens[i]` tokens."""
        texts: list[str] = []
        chat = [{"role": m["role"], "content": [self._template_part(part, texts) for part in m["content"]]}
                for m in messages]
        try:
            rendered = self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as exc:  # the template's raise_exception(): a conversation it refuses
            raise BadRequest(f"the model's chat template refuses these messages: {exc}") from None
        pieces = self._split.split(rendered)  # template, text index, template, text index, ..., template
        if [int(i) for i in pieces[1::2]] != list(range(len(texts))):
            raise BadRequest("the model's chat template drops, repeats or reorders text parts of these messages "
                             "(a system message after the first, say); send the conversation in a form it renders")
        template = self.tokenizer(pieces[0::2], add_special_tokens=False)["input_ids"]
        text = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
        ids: list[int] = []
        images = iter(image_tokens)
        for i, piece in enumerate(template):
            for token in piece:
                ids.extend([token] * next(images, 0) if token == self.image_token_id else (token,))
            if i < len(text):
                ids.extend(text[i])
        if ids.count(self.image_token_id) != sum(image_tokens):
            raise BadRequest("the model's chat template renders a different number of images than these messages "
                             "hold (an image in a system message, say); put images in user turns")
        return ids

    def _template_part(self, part: dict, texts: list[str]) -> dict:
        if part["type"] == "image":
            return {"type": "image"}
        texts.append(part["text"])
        return {"type": "text", "text": self._marker.format(len(texts) - 1)}
