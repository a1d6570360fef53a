"""python bench/join_replay.py DRAFTS.jsonl      # lines of {"language": "en"|"zh", "text": a real draft}

Item 4 of issue 27: the verdicts of phase-2 texts joined as slkit joins them (kept head, a blank line, the
continuation stripped of its leading breaks) against the reference's raw join (kept head + raw continuation),
on real drafts cut at every paragraph boundary and inside paragraphs."""
import json
import sys
from collections import Counter
from pathlib import Path

from slkit.method.extensions import phase2_text
from slkit.method.quality import quality_failure
from slkit.core.params import QualityParams

rules = QualityParams()
tally, examples = Counter(), []
for line in Path(sys.argv[1]).read_text(encoding="utf-8").splitlines():
    d = json.loads(line)
    text, lang = d["text"], d["language"]
    cuts = [i for i in range(len(text)) if text.startswith("\n\n", i)]          # after a paragraph
    cuts += [i for i in range(1, len(text)) if text[i - 1] == "." and text[i] == " "][::5]  # inside one
    for i in cuts:
        head, raw = text[:i], text[i:]
        if not head.strip() or not raw.strip():
            continue
        ours = phase2_text(head, raw.lstrip("\n").strip())   # the engines strip a continuation's ends
        ref = head + raw
        a, b = quality_failure(ours, lang, rules), quality_failure(ref, lang, rules)
        kind = "paragraph" if raw.startswith("\n") else "inside"
        tally[(kind, "same" if a == b else "differs")] += 1
        if a != b and len(examples) < 5:
            examples.append((kind, a, b))
print(dict(tally)); print(examples)
