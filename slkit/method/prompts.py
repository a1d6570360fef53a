"""Every prompt the method sends, in English and Chinese: self-instruct, the query judge, the extension.

Each is written in slkit's own words after the reference's (docs/method.md). A chat model gets them as a user
turn rendered by slkit.models.chat; self-instruct then pre-fills the answer with the numbered examples, and
phase 2 of the extension pre-fills it with the kept head, and the model continues. A model without a chat
template gets the plain forms below (a header and few-shot examples), which a base model can complete.
"""
from __future__ import annotations

import re

# Self-instruct, as a chat turn: the task, then the answer pre-filled with the numbered examples up to
# the next label, as the reference does.
SELF_INSTRUCT_TASK = {
    "en": "Your job is to write user instructions that lead a model to generate long texts.",
    "zh": "请构造一些能够引导模型生成长文本的用户指令，每条指令都要完整。",
}
# The same for a model without a chat template: a header it can continue in raw completion mode.
SELF_INSTRUCT_HEADER = {
    "en": "Below are writing requests. Each one asks for a long, detailed piece of writing.\n\n",
    "zh": "下面是一些写作请求，每一条都要求写出一篇内容充实的长文。\n\n",
}
# The reference's English label ends in a space, its Chinese one in a full-width colon.
SELF_INSTRUCT_LABEL = {"en": "Instruction {n}: ", "zh": "指令{n}："}

# The query judge, zero-shot, as the reference asks it: an exact yes (是) keeps the query.
JUDGE = {
    "en": ("Here is a user's instruction. Decide whether it is suitable for guiding the writing of a long article "
           "(for example, more than 2,000 words). Reply with yes or no only.\n\n"
           "<Instruction>\n{query}\n</Instruction>"),
    "zh": ("下面是一条用户指令。请判断它是否适合用来指导一篇长文（例如两千字以上）的写作。只回答“是”或“否”。\n\n"
           "<指令>\n{query}\n</指令>"),
}
# For a model without a chat template: few-shot, so a base model answers in the same form (one word, then a
# line break, where the judge's stop string ends it).
JUDGE_FEW_SHOT = {
    "en": ("Decide whether each writing request is suitable for guiding a long article of more than 2,000 words. "
           "Answer yes or no.\n\n"
           "Request: Write a detailed history of the printing press and how it changed Europe.\nAnswer: yes\n\n"
           "Request: What is the capital of Peru?\nAnswer: no\n\n"
           "Request: Compose a long story about two sisters who run a mountain inn through one hard winter.\n"
           "Answer: yes\n\n"
           "Request: Give me a synonym for happy.\nAnswer: no\n\n"
           "Request: {query}\nAnswer:"),
    "zh": ("判断每条写作请求是否适合用来指导写一篇两千字以上的长文。回答“是”或“否”。\n\n"
           "请求：请详细介绍印刷术的发展历史及其对欧洲的影响。\n回答：是\n\n"
           "请求：秘鲁的首都是哪里？\n回答：否\n\n"
           "请求：写一篇长篇小说，讲述两姐妹在一个严冬里经营山间客栈的故事。\n回答：是\n\n"
           "请求：给我一个“高兴”的近义词。\n回答：否\n\n"
           "请求：{query}\n回答："),
}
JUDGE_YES = {"en": "yes", "zh": "是"}
JUDGE_NO = {"en": "no", "zh": "否"}

# One extension template per language, holding the request and a text, in the reference's terms: the text
# is an "original outline" to expand, not to continue. It serves extension phase 1 (with the former part of
# the text), phase 2 (with the whole text, answer pre-filled) and the Extender's training set, so the trained
# Extender always sees its own training prompt. As in the reference, only the English one asks for a text as
# long, rich and engaging as possible. The quality check rejects its nouns ("outline", "enriched", 大纲, ...)
# at a text's edges: an Extender that talks about the task instead of doing it (quality.meta_words).
EXTENSION = {
    "en": ("You are a skilled editor who polishes writing. Using the instruction and the original outline below, "
           "expand the outline with care so that it carries more information, concrete details and better "
           "description. Your job is not to write on past where the content ends but to enrich what is already "
           "there: fill out its paragraphs with fuller description, or add new sections. Be as creative and "
           "informative as you can, and leave out repeated content and long-winded narration. Write a text "
           "that is as long, rich and engaging as you can make it.\n\nInstruction: {query}\n\nOriginal outline:"
           "\n\n{text}"),
    "zh": ("请依据下面的指令和原始大纲，细致地扩展这份大纲，使内容更充实：补充信息，加入具体细节，让描写更生动。"
           "注意，你要做的是丰富已有的内容，而不是接着往下写。可以为已有段落补充更详细的描写，也可以增加小标题。"
           "回答中不要出现冗长的叙述，也不要有任何重复的内容。\n\n指令：{query}\n\n原始大纲：\n\n{text}"),
}


def self_instruct_list(examples: list[str], language: str) -> str:
    """The numbered examples and the next label: the start of the answer the model completes."""
    label = SELF_INSTRUCT_LABEL[language]
    lines = [label.format(n=i + 1) + q.strip() for i, q in enumerate(examples)]
    return "\n".join(lines) + "\n" + label.format(n=len(examples) + 1)


def self_instruct_prompt(examples: list[str], language: str) -> str:
    """The plain (no chat template) self-instruct prompt: a header, then the numbered examples."""
    return SELF_INSTRUCT_HEADER[language] + self_instruct_list(examples, language)


def parse_self_instruct(completion: str, language: str) -> str:
    """The new instruction: the completion up to the next numbered label (the reference's stop string), all its
    lines, stripped."""
    label = re.escape(SELF_INSTRUCT_LABEL[language].strip().format(n="@")).replace("@", r"\d+")
    return re.split(r"\n\s*" + label, completion)[0].strip()


def judge_prompt(query: str, language: str, few_shot: bool = False) -> str:
    """The judge's question about `query`: zero-shot (a chat turn), or few-shot for a model without a chat
    template."""
    return (JUDGE_FEW_SHOT if few_shot else JUDGE)[language].format(query=query.strip())


def parse_judge(answer: str, language: str) -> bool | None:
    """True for an exact yes (是), False for an exact no (否), None for anything else, which keeps no query
    either: the reference keeps a query only when the whole answer, stripped (and lower-cased in English), is
    the yes."""
    said = answer.strip()
    said = said.lower() if language == "en" else said
    if said == JUDGE_YES[language]:
        return True
    if said == JUDGE_NO[language]:
        return False
    return None


def extension_prompt(query: str, text: str, language: str) -> str:
    """The extension template over `query` and `text` (a former part, a whole text, or a draft with lines dropped)."""
    return EXTENSION[language].format(query=query, text=text)
