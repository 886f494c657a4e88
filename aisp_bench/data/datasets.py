r"""Benchmark prompts: SHP and HH-RLHF test splits, local files, and the demo set.

* SHP (``stanfordnlp/SHP``): the prompt is the ``history`` field (the Reddit post);
  rows are deduplicated by ``post_id`` (the hub split has one row per comment pair).
* HH-RLHF (``Anthropic/hh-rlhf``): the prompt is the ``chosen`` transcript cut at its
  last ``\n\nAssistant:``; earlier turns are kept as a conversation. Ids are a hash of
  that prompt, so they are the same whichever file or subset the row came from.
* ``demo``: a few prompts written for this project, shipped in the package.

``num_prompts`` are drawn with ``sample_seed``, which does NOT change with the run seed:
the three seeds of an experiment see the same prompts. ``num_shards``/``shard`` then keep
every ``num_shards``-th of them from ``shard`` on (prompt shards: K jobs of one run, whose
union is exactly the run's prompts, balanced to within one prompt). ``path`` loads a local file in
the hub's own row schema (``.jsonl``, ``.jsonl.gz`` or a ``.json`` list) instead of the hub.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
import zlib
from collections.abc import Iterable
from pathlib import Path

from aisp_bench.registry import Registry
from aisp_bench.types import Message, Prompt

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).resolve().parent
PARSERS: Registry = Registry("dataset kind")


class DatasetError(ValueError):
    """Bad dataset input; the message is one line naming the bad value."""


# ----------------------------------------------------------------------------- files
def read_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl``, ``.jsonl.gz`` or ``.json`` (a list of objects) file."""
    p, where = Path(path).expanduser(), f"dataset.path {str(path)!r}"
    if not p.is_file():
        raise DatasetError(f"{where} does not exist or is not a file")
    name = p.name.lower()
    if not name.endswith((".json", ".jsonl", ".jsonl.gz")):
        raise DatasetError(f"{where}: unsupported file type; use .jsonl, .jsonl.gz or .json")
    try:
        with (gzip.open if name.endswith(".gz") else open)(p, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:  # zlib: a gzip file with corrupt data
        raise DatasetError(f"{where} cannot be read: {e}") from None
    if name.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where} is not valid JSON: {e.msg} (line {e.lineno})") from None
        if not isinstance(rows, list):
            raise DatasetError(f"{where} must hold a JSON list of rows")
    else:
        rows = []
        for i, line in enumerate(text.split("\n"), 1):  # text mode: every line ending is \n
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: line {i} is not valid JSON ({e.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: row {i} is not a JSON object")
    return rows


def _field(row: dict, key: str, i: int, where: str, kind: str) -> str:
    if key not in row:
        raise DatasetError(f"{where}: row {i} has no {key!r} field ({kind} rows need {key!r})")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: row {i} has an empty or non-text {key!r} field")
    return value


# ----------------------------------------------------------------------------- parsers
def _first_of_each_id(prompts: Iterable[Prompt]) -> list[Prompt]:
    unique: dict[str, Prompt] = {}
    for p in prompts:
        unique.setdefault(p.id, p)
    return list(unique.values())


@PARSERS.register("shp")
def parse_shp(rows: Iterable[dict], where: str) -> list[Prompt]:
    return _first_of_each_id(
        Prompt(id=str(row.get("post_id") or row.get("__index_level_0__") or i),
               messages=(Message("user", _field(row, "history", i, where, "SHP").strip()),))
        for i, row in enumerate(rows)
    )


_WARNED: set[str] = set()  # the files whose malformed rows were reported
_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def split_hh(transcript: str) -> tuple[Message, ...]:
    r"""``\n\nHuman: a\n\nAssistant: b\n\nHuman: c`` -> (user a, assistant b, user c)."""
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript
    parts = _TURN.split(text)
    return tuple(Message("user" if role == "Human" else "assistant", content.strip())
                 for role, content in zip(parts[1::2], parts[2::2]))


@PARSERS.register("hh_rlhf")
def parse_hh(rows: Iterable[dict], where: str) -> list[Prompt]:
    """Rows whose transcript is malformed (a few in the real test split run a Human turn
    into the Assistant's text without the blank line) are left out with a warning."""
    out, malformed = [], []
    for i, row in enumerate(rows):
        chosen = _field(row, "chosen", i, where, "HH-RLHF")
        cut = chosen.rfind("\n\nAssistant:")
        if cut < 0:
            raise DatasetError(f"{where}: row {i}: 'chosen' has no '\\n\\nAssistant:' turn")
        prompt_text = chosen[:cut]
        msgs = split_hh(prompt_text)
        if not msgs or msgs[-1].role != "user" or not msgs[-1].content:
            malformed.append(i)
            continue
        out.append(Prompt(id="hh-" + hashlib.blake2b(prompt_text.encode(), digest_size=6).hexdigest(), messages=msgs))
    if malformed and where not in _WARNED:  # once per file and process (a sweep reads it per job)
        _WARNED.add(where)
        log.warning("%s: left out %d row(s) whose prompt does not end with a Human turn (rows %s)",
                    where, len(malformed), ", ".join(map(str, malformed[:10])))
    return _first_of_each_id(out)


@PARSERS.register("prompts")
def parse_prompts(rows: Iterable[dict], where: str) -> list[Prompt]:
    """Project format: {"id": ..., "prompt": text} or {"id": ..., "messages": [...]}."""
    out = []
    for i, row in enumerate(rows):
        pid = str(row.get("id", i))
        if "messages" in row:
            try:
                out.append(Prompt.from_json(pid, row["messages"]))
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{where}: row {i} has malformed 'messages': {e}") from None
        else:
            out.append(Prompt.single(pid, _field(row, "prompt", i, where, "prompt").strip()))
    return out


# ----------------------------------------------------------------------------- dataset
def shard_of(prompts: list[Prompt], shard: int, num_shards: int) -> list[Prompt]:
    """Prompt shard ``shard`` of ``num_shards``: every ``num_shards``-th prompt from ``shard`` on."""
    return prompts[shard::num_shards]


class PromptDataset:
    """A benchmark's prompts, from the hub, a local file or the package.

    Args (the YAML keys of ``conf/dataset/*.yaml``):
        name: short name used in run folder names.
        kind: row schema: ``shp``, ``hh_rlhf`` or ``prompts`` (this project's format).
        hub_id: dataset on the Hugging Face hub (loaded with ``datasets``).
        hub_data_dir: ``data_dir`` for ``load_dataset`` (e.g. ``harmless-base``); null: all.
        split: hub split.
        path: local file instead of the hub (a path relative to the package data folder
            is accepted for files shipped with the package).
        num_prompts: prompts to draw (null: all).
        sample_seed: seed of that draw (fixed across run seeds).
        num_shards: split the drawn prompts into this many shards (1: no split).
        shard: which shard to load, 0 .. num_shards - 1: prompts shard, shard + num_shards, ...
    """

    def __init__(self, name: str, kind: str, hub_id: str | None = None, hub_data_dir: str | None = None,
                 split: str = "test", path: str | None = None, num_prompts: int | None = None,
                 sample_seed: int = 0, num_shards: int = 1, shard: int = 0) -> None:
        PARSERS.get(kind)  # unknown kinds fail here, listing the known ones (numbers: validate.py)
        if path is None and hub_id is None:
            raise DatasetError(f"dataset {name!r} needs dataset.path or dataset.hub_id")
        self.name, self.kind = name, kind
        self.hub_id, self.hub_data_dir, self.split = hub_id, hub_data_dir, split
        self.path, self.num_prompts, self.sample_seed = path, num_prompts, sample_seed
        self.num_shards, self.shard = num_shards, shard

    def _rows(self) -> tuple[list[dict], str]:
        if self.path is not None:
            p = Path(self.path).expanduser()
            if not p.is_absolute() and not p.exists() and (DATA_DIR / p).exists():
                p = DATA_DIR / p
            return read_rows(p), f"dataset.path {str(self.path)!r}"
        try:
            import datasets
        except ImportError:  # pragma: no cover - a dependency
            raise DatasetError("the `datasets` package is needed to load from the hub; or pass dataset.path=FILE") from None
        try:
            ds = datasets.load_dataset(self.hub_id, data_dir=self.hub_data_dir, split=self.split)
        except Exception as e:  # network, auth, missing split...: one line, and the way out
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DatasetError(
                f"cannot load {self.hub_id!r} split {self.split!r} from the Hugging Face hub ({type(e).__name__}: "
                f"{first}); download it where the hub is reachable and pass dataset.path=FILE"
            ) from None
        return [dict(r) for r in ds], f"hub dataset {self.hub_id!r}"

    def load(self) -> list[Prompt]:
        """The prompts of this shard (all of the run's when ``num_shards`` is 1), in the dataset's order."""
        rows, where = self._rows()
        prompts = PARSERS.get(self.kind)(rows, where)
        if not prompts:
            raise DatasetError(f"dataset {self.name!r} has no prompts ({where})")
        if self.num_prompts is not None and self.num_prompts < len(prompts):
            keep = sorted(random.Random(self.sample_seed).sample(range(len(prompts)), self.num_prompts))
            prompts = [prompts[i] for i in keep]
        return shard_of(prompts, self.shard, self.num_shards)
