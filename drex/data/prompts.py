"""Chat templates of the InternVL-2 models (MPT separator style) and image-token expansion.

A conversation is: [BOS] system turn, then per turn the user turn, the assistant prefix and the
answer + separator (the target). An image in a user turn is `<img>` + `<IMG_CONTEXT>` x (tokens per
tile x tiles) + `</img>` (`image_block`), put where its `<image>` placeholder was, as InternVL's
`chat()` and fine-tuning loader build it.
"""

from __future__ import annotations

import dataclasses

from drex.data import tokenizer as tok_lib

# InternVL-2's default system message (the same sentence in all three templates).
INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  name: str
  system: str  # format of the system turn ('' = none); '{}' is the message
  user: str  # format of the user turn
  assistant: str  # prefix of the assistant turn
  sep: str  # end of a turn; generation stops at it
  system_message: str = ""
  bos: bool = False  # prepend the tokenizer's <s>

  def user_turn(self, content: str, first: bool = True) -> str:
    """The text before an answer: ([BOS] + system turn, on the first turn) + user turn + assistant prefix."""
    if not first:
      return self.user.format(content) + self.assistant
    system = self.system.format(self.system_message) if self.system and self.system_message else ""
    return (tok_lib.BOS if self.bos else "") + system + self.user.format(content) + self.assistant

  def prompt(self, question: str, num_image_tokens: int) -> str:
    """A one-turn prompt about one image of `num_image_tokens` tokens (0 = text only)."""
    content = image_block(num_image_tokens) + "\n" + question if num_image_tokens else question
    return self.user_turn(content)

  def target(self, answer: str) -> str:
    return answer + self.sep


def image_block(num_image_tokens: int) -> str:
  """The tokens that stand for one image in a prompt."""
  return tok_lib.IMG_START + tok_lib.IMG_CONTEXT * num_image_tokens + tok_lib.IMG_END


_MPT_IM = dict(system="<|im_start|>system\n{}<|im_end|>", user="<|im_start|>user\n{}<|im_end|>",
               assistant="<|im_start|>assistant\n", sep="<|im_end|>")

TEMPLATES = {
    # The embedded default: InternLM2's format without the long system message.
    "tiny": ChatTemplate("tiny", bos=True, **_MPT_IM),
    "internlm2-chat": ChatTemplate("internlm2-chat", system_message=INTERNVL_SYSTEM, bos=True, **_MPT_IM),
    "Hermes-2": ChatTemplate("Hermes-2", system_message=INTERNVL_SYSTEM, **_MPT_IM),
    "phi3-chat": ChatTemplate("phi3-chat", system="<|system|>\n{}<|end|>", user="<|user|>\n{}<|end|>",
                              assistant="<|assistant|>\n", sep="<|end|>", system_message=INTERNVL_SYSTEM, bos=True),
}


def get_template(name: str) -> ChatTemplate:
  if name not in TEMPLATES:
    raise ValueError(f"unknown chat template {name!r}; use one of {', '.join(TEMPLATES)}")
  return TEMPLATES[name]
