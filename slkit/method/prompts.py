"""Every prompt the method sends, in English and Chinese: self-instruct, the query judge, the extension.

Each is a user message; slkit.models.chat renders it for the model. Stage 2 of the extension pre-fills
the answer after the rendered turn and lets the model continue.
"""
from __future__ import annotations

import re

SELF_INSTRUCT_HEADER = {
    "en": "Below are writing requests. Each one asks for a long, detailed piece of writing.\n\n",
    "zh": "下面是一些写作请求，每一条都要求写出一篇内容充实的长文。\n\n",
}
SELF_INSTRUCT_LABEL = {"en": "Instruction {n}:", "zh": "指令{n}："}

# Few-shot, so base models answer in the same form as chat models; ends where the verdict goes.
JUDGE = {
    "en": ("Decide whether each writing request is suitable for guiding a long article of more than 2,000 words. "
           "Answer yes or no.\n\n"
           "Request: Write a detailed history of the printing press and how it changed Europe.\nAnswer: yes\n\n"
           "Request: What is the capital of Peru?\nAnswer: no\n\n"
           "Request: Compose a long story about two sisters who run a mountain inn through one hard winter.\nAnswer: yes\n\n"
           "Request: Give me a synonym for happy.\nAnswer: no\n\n"
           "Request: {query}\nAnswer:"),
    "zh": ("判断每条写作请求是否适合用来指导写一篇两千字以上的长文。回答“是”或“否”。\n\n"
           "请求：请详细介绍印刷术的发展历史及其对欧洲的影响。\n回答：是\n\n"
           "请求：秘鲁的首都是哪里？\n回答：否\n\n"
           "请求：写一篇长篇小说，讲述两姐妹在一个严冬里经营山间客栈的故事。\n回答：是\n\n"
           "请求：给我一个“高兴”的近义词。\n回答：否\n\n"
           "请求：{query}\n回答："),
}

# One extension template per language, holding the request and a text. It serves extension stage 1
# (with the former part of the text), stage 2 (with the whole text, answer pre-filled) and the Extender's
# training set, so the trained Extender always sees its own training prompt and knows the task.
# The quality check rejects its nouns ("draft", "enriched", 初稿, ...) at a text's edges: an Extender
# that talks about the task instead of doing it (quality.meta_words).
EXTENSION = {
    "en": ("Below are a writing request and a draft written for it. Make the draft richer and longer: expand "
           "each part with concrete details, examples and description, and add sub-headings or new sections "
           "where they help. Do not write past the draft's end and do not repeat anything; enrich what is "
           "already there. Keep its language and the order of its parts.\n\nRequest: {query}\n\nDraft:\n\n{text}"),
    "zh": ("下面是一条写作请求和为它写的一份初稿。请把初稿写得更丰富、更长：为每一部分补充具体的细节、例子和描写，"
           "需要时加入小标题或新的章节。不要在初稿结尾之后接着往下写，也不要重复任何内容，而是充实已有的内容。"
           "保持它的语言和各部分的顺序。\n\n请求：{query}\n\n初稿：\n\n{text}"),
}


def self_instruct_prompt(examples: list[str], language: str) -> str:
    """Raw-completion prompt listing `examples`; the model writes the next instruction."""
    label = SELF_INSTRUCT_LABEL[language]
    lines = [f"{label.format(n=i + 1)} {' '.join(q.split())}" for i, q in enumerate(examples)]
    return SELF_INSTRUCT_HEADER[language] + "\n".join(lines) + "\n" + label.format(n=len(examples) + 1)


def parse_self_instruct(completion: str, language: str) -> str:
    """The new instruction: the completion up to its first line break or next numbered label."""
    first = completion.strip().split("\n", 1)[0]
    label = re.escape(SELF_INSTRUCT_LABEL[language].format(n="@")).replace("@", r"\d+")
    return re.split(label, first)[0].strip()


def judge_prompt(query: str, language: str) -> str:
    return JUDGE[language].format(query=query)


def parse_judge(answer: str) -> bool | None:
    """True for yes, False for no, None when the answer says neither."""
    head = answer.strip().lstrip("*\"'“「").lower()
    if head.startswith(("yes", "是", "适合", "可以")):
        return True
    if head.startswith(("no", "否", "不")):
        return False
    return None


def extension_prompt(query: str, text: str, language: str) -> str:
    """The extension template over `query` and `text` (a former part, a whole text, or a draft with lines dropped)."""
    return EXTENSION[language].format(query=query, text=text)
