"""Name patterns with explicit captures.

A pattern is a dotted parameter name in which `{layer}`, `{expert}` or any other `{name}` stands for a
run of digits. The HF side of a mapping may shift a capture: `model.layers.{mtp+45}.enorm.weight`.
Captures are matched by name, never by position, so a pattern with fewer captures than its partner
(a stacked-expert HF tensor has no `{expert}`) is explicit about which index it drops.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_FIELD = re.compile(r"\{([a-z_]+)([+-]\d+)?\}")


@dataclass(frozen=True)
class Pattern:
    text: str

    def __post_init__(self) -> None:
        fields = [m.group(1) for m in _FIELD.finditer(self.text)]
        if len(fields) != len(set(fields)):
            raise ValueError(f"pattern {self.text!r} repeats a capture")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(m.group(1) for m in _FIELD.finditer(self.text))

    @property
    def regex(self) -> re.Pattern[str]:
        return _regex(self.text)

    @property
    def bucket(self) -> str:
        """The last dotted component with digits and captures as `#`: equal for every name it matches."""
        return bucket(_FIELD.sub("0", self.text))

    def match(self, name: str) -> dict[str, int] | None:
        m = self.regex.match(name)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}

    def partial_regex(self, captures: dict[str, int]) -> re.Pattern[str]:
        """Matches the names of this pattern whose `captures` have these values (offsets applied),
        any digits standing for the other captures."""
        out, pos = [], 0
        for m in _FIELD.finditer(self.text):
            out.append(re.escape(self.text[pos : m.start()]))
            name, offset = m.group(1), m.group(2)
            out.append(str(captures[name] + (int(offset) if offset else 0)) if name in captures else r"\d+")
            pos = m.end()
        out.append(re.escape(self.text[pos:]))
        return re.compile("".join(out) + r"\Z")

    def format(self, captures: dict[str, int]) -> str:
        def field(m: re.Match[str]) -> str:
            name, offset = m.group(1), m.group(2)
            if name not in captures:
                raise KeyError(f"pattern {self.text!r} needs capture {{{name}}}")
            return str(captures[name] + (int(offset) if offset else 0))

        return _FIELD.sub(field, self.text)


@functools.cache
def _regex(text: str) -> re.Pattern[str]:
    """The compiled regex of a pattern's text: built once, since binding a full-size model matches
    every param name against its candidate patterns (re.compile's own cache holds only 512)."""
    out, pos = [], 0
    for m in _FIELD.finditer(text):
        if m.group(2):
            raise ValueError(f"pattern {text!r}: offsets belong on the HF side only")
        out.append(re.escape(text[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    out.append(re.escape(text[pos:]))
    return re.compile("".join(out) + r"\Z")


def bucket(name: str) -> str:
    """`...experts.linear_fc1.weight7` -> `weight#`: a cheap key to find the patterns a name may match."""
    return re.sub(r"\d+", "#", name.rsplit(".", 1)[-1])
