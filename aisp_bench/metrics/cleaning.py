"""Response cleaning, applied before every metric and before the judge sees an answer.

The lineage (ARGS, RE-Control) evaluates ``clean(clean(response[len(prompt):],
"###Human:"), "\\n\\nHuman:")`` (RE-Control: ``"###USER:"``, ``"\\n\\nUSER:"``) and
replaces an empty result by a single space. Here:

1. the text after the prompt: the lineage sliced ``response[len(prompt):]`` because its
   generations included the prompt (and that slice eats the start of any response that
   does not). Our engine stores the generated text alone, which *is* the text after the
   prompt, so nothing is sliced off;
2. cut at the next turn marker: a line that starts a new user turn, i.e. optional
   ``#`` characters, a role name (``Human``, ``User``, any case) and a colon, at the start
   of the text or of a line, or ``##``+ role + colon anywhere. ``"\\n\\nHuman:"``,
   ``"###Human:"``, ``"USER:"``, ``"### User:"`` are all caught; a Markdown heading such
   as ``"### Step 1"`` and the word "human:" in the middle of a line are not (the
   lineage's ``clean`` defaults to a bare ``"###"``, which would cut at any heading, but
   its calls pass the role markers above). The roles are
   configurable per model (``model.turn_roles``), and the model's own ``stop_strings``
   are cut anywhere, as the engine does;
3. surrounding whitespace is stripped, and an empty response becomes ``" "`` (so that
   every metric and the judge get a defined input, as in the lineage).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

DEFAULT_TURN_ROLES: tuple[str, ...] = ("Human", "User")
EMPTY_RESPONSE = " "


@lru_cache(maxsize=64)
def turn_marker_pattern(roles: tuple[str, ...] = DEFAULT_TURN_ROLES) -> re.Pattern[str]:
    """Regex matching a new turn for any of ``roles`` at a line start (case-insensitive)."""
    if not roles:
        return re.compile(r"(?!x)x")  # matches nothing
    names = "|".join(re.escape(r) for r in roles)
    line_start = rf"(?:^|\n)[ \t]*(?:#+[ \t]*)?(?:{names})[ \t]*:"
    hashes = rf"#{{2,}}[ \t]*(?:{names})[ \t]*:"  # "###Human:" anywhere, as the lineage cut it
    return re.compile(f"{line_start}|{hashes}", re.IGNORECASE)


def clean_response(
    response: str | None, *, roles: Sequence[str] = DEFAULT_TURN_ROLES, stop_strings: Sequence[str] = ()
) -> str:
    """The response as the metrics and the judge see it: cut at the earliest turn marker (line
    start) or stop string (anywhere), stripped, ``" "`` if empty (see the module docstring)."""
    text = response or ""
    m = turn_marker_pattern(tuple(roles)).search(text)
    end = len(text) if m is None else m.start()
    for s in stop_strings:
        i = text.find(s, 0, end) if s else -1
        if i != -1:
            end = i
    return text[:end].strip() or EMPTY_RESPONSE


def cleaning_options(config: dict[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """``roles`` (``model.turn_roles``, default ``DEFAULT_TURN_ROLES``) and ``stop_strings``
    (``model.stop_strings``, default none) for :func:`clean_response` from a run's resolved config."""
    model = (config or {}).get("model") or {}
    roles = model.get("turn_roles")
    stops = model.get("stop_strings") or ()
    return {
        "roles": tuple(roles) if roles is not None else DEFAULT_TURN_ROLES,
        "stop_strings": tuple(str(s) for s in stops),
    }
