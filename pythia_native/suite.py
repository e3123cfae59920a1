"""The Pythia suite: the one table of model names and revisions in the code.

Everything that knows a Pythia name, a branch name or a suite fact lives here;
other modules ask this one. ``../shared/docs/PYTHIA.md`` is the spec.

Names (all under the ``EleutherAI`` organisation on the Hugging Face hub):

- current suite: ``pythia-{14m,31m}`` (standard only) and
  ``pythia-{70m,160m,410m,1b,1.4b,2.8b,6.9b,12b}``, each also ``-deduped``;
- v0 suite (the first training run, renamed when the suite was retrained in
  2023): ``pythia-<size>-v0`` and ``pythia-<size>-deduped-v0`` for 70m..12b;
- PolyPythias seeds: ``pythia-{14m,31m,70m,160m,410m}-seed{1..9}``, plus the
  decoupled 160m runs ``pythia-160m-data-seed{1..3}`` (only the data order
  varied) and ``pythia-160m-weight-seed{1..3}`` (only the initialization
  varied). Their model cards give the same 154 branches as the current suite.
- old names from before the January 2023 rename (19m->70m, 125m->160m,
  350m->410m, 800m->1b, 1.3b->1.4b, 2.7b->2.8b, 6.7b->6.9b, 13b->12b, also
  ``-deduped``) resolve to the new name with a ``RenamedModelWarning``.

Revisions (git branches of each repo):

- current suite and seeds: 154 branches, ``step0``, ``step1``, ``step2``,
  ``step4`` ... ``step512`` (powers of two), then ``step1000`` ... ``step143000``
  every 1000;
- v0 suite: 143 branches, ``step1000`` ... ``step143000``;
- ``main`` is the same checkpoint as ``step143000`` (see
  ``canonical_revision``); a 40-hex commit hash is valid for any repo;
- repos outside the suite (third-party GPT-NeoX models, pre-quantized copies,
  which normally have ``main`` only) accept any revision string.

One training step is 1024 sequences x 2048 tokens = 2,097,152 tokens. For v0
160m, 410m and 1.4b (trained with 4M-token batches) the branch names still count
2M-token steps, so their ``step1000`` is optimizer step 500: see
``optimizer_step``.
"""
from __future__ import annotations

import difflib
import numbers
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import CheckpointDataWarning, ModelNotFoundError, RenamedModelWarning, RevisionError

HUB_ORG = "EleutherAI"

#: sizes of the current suite, in order
SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
#: sizes that also exist deduplicated, and in the v0 suite
DEDUPED_SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
V0_SIZES = DEDUPED_SIZES
#: PolyPythias: nine extra seeds for the five smallest sizes
SEED_SIZES = ("14m", "31m", "70m", "160m", "410m")
SEEDS = tuple(range(1, 10))
#: PolyPythias decoupled 160m runs: data order only / initialization only
DECOUPLED_SEEDS = tuple(range(1, 4))
#: old size label -> new size label (the January 2023 rename)
RENAMED_SIZES = {
    "19m": "70m",
    "125m": "160m",
    "350m": "410m",
    "800m": "1b",
    "1.3b": "1.4b",
    "2.7b": "2.8b",
    "6.7b": "6.9b",
    "13b": "12b",
}
#: v0 sizes trained with 4M-token batches: their branch steps count 2M-token steps
V0_DOUBLE_BATCH_SIZES = ("160m", "410m", "1.4b")

FINAL_STEP = 143000
TOKENS_PER_STEP = 1024 * 2048
#: step0, then the 10 powers of two 1..512 (current suite only)
EARLY_STEPS = (0,) + tuple(2**i for i in range(10))
CURRENT_STEPS = EARLY_STEPS + tuple(range(1000, FINAL_STEP + 1, 1000))
V0_STEPS = tuple(range(1000, FINAL_STEP + 1, 1000))

_HASH_RE = re.compile(r"[0-9a-fA-F]{40}")
_STEP_RE = re.compile(r"(?:step)?(\d+)", re.IGNORECASE)
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class SuiteModel:
    """One entry of the suite table.

    ``name`` is the hub repo name without the org (``"pythia-160m-deduped-v0"``),
    ``suite`` is ``"current"`` or ``"v0"``, ``seed`` is ``None`` for the
    original run or ``"seed3"``, ``"data-seed1"``, ``"weight-seed2"``.
    """

    name: str
    size: str
    deduped: bool
    suite: str
    seed: Optional[str] = None

    @property
    def repo_id(self) -> str:
        return f"{HUB_ORG}/{self.name}"

    @property
    def steps(self) -> tuple[int, ...]:
        """The training steps that have a branch ``step<N>`` on the hub."""
        return V0_STEPS if self.suite == "v0" else CURRENT_STEPS


def _build_table() -> dict[str, SuiteModel]:
    table: dict[str, SuiteModel] = {}

    def add(model: SuiteModel) -> None:
        assert model.name not in table, model.name
        table[model.name] = model

    for size in SIZES:
        add(SuiteModel(f"pythia-{size}", size, False, "current"))
        if size in DEDUPED_SIZES:
            add(SuiteModel(f"pythia-{size}-deduped", size, True, "current"))
    for size in V0_SIZES:
        add(SuiteModel(f"pythia-{size}-v0", size, False, "v0"))
        add(SuiteModel(f"pythia-{size}-deduped-v0", size, True, "v0"))
    for size in SEED_SIZES:
        for seed in SEEDS:
            add(SuiteModel(f"pythia-{size}-seed{seed}", size, False, "current", f"seed{seed}"))
    for kind in ("data", "weight"):
        for seed in DECOUPLED_SEEDS:
            add(SuiteModel(f"pythia-160m-{kind}-seed{seed}", "160m", False, "current", f"{kind}-seed{seed}"))
    return table


#: name (lower case, no org) -> table entry; the only list of Pythia repos in the code
MODELS: dict[str, SuiteModel] = _build_table()


def _build_renamed() -> dict[str, str]:
    renamed = {}
    for old, new in RENAMED_SIZES.items():
        renamed[f"pythia-{old}"] = f"pythia-{new}"
        renamed[f"pythia-{old}-deduped"] = f"pythia-{new}-deduped"
    return renamed


#: old name -> current name (the January 2023 rename)
RENAMED: dict[str, str] = _build_renamed()


def model_names() -> list[str]:
    """All Pythia repo names of the table (without the ``EleutherAI/`` org)."""
    return list(MODELS)


@dataclass(frozen=True)
class ModelRef:
    """What a user's model argument refers to.

    - ``repo_id``: the hub repo (``"EleutherAI/pythia-160m"``), ``None`` for a local directory;
    - ``is_pythia``: an EleutherAI Pythia repo of the table (its revisions are validated);
    - ``suite``: ``"current"``, ``"v0"`` or ``None`` (not a Pythia repo);
    - ``renamed_from``: the old name the user typed (``"pythia-19m"``), if any;
    - ``local_path``: the directory, when the argument was an existing directory;
    - ``model``: the table entry for Pythia repos.
    """

    repo_id: Optional[str]
    is_pythia: bool
    suite: Optional[str]
    renamed_from: Optional[str] = None
    local_path: Optional[Path] = None
    model: Optional[SuiteModel] = None

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    def __str__(self) -> str:
        return str(self.local_path) if self.local_path is not None else str(self.repo_id)


def close_matches(name: str, n: int = 5) -> list[str]:
    """The Pythia names closest to ``name`` (difflib), best first: near an old
    name (pythia-1.3b), its current one (pythia-1.4b)."""
    key = name.strip().lower()
    if "/" in key:
        key = key.split("/", 1)[1]
    similar = [RENAMED.get(m, m) for m in difflib.get_close_matches(key, list(MODELS) + list(RENAMED), n=n, cutoff=0.6)]
    # A real size with a variant it lacks (pythia-14m-deduped): that size's models come first.
    size_match = re.match(r"pythia-(\d+(?:\.\d+)?[mb])(?![\w.])", key)
    size = RENAMED_SIZES.get(size_match.group(1), size_match.group(1)) if size_match else None
    same_size = [m.name for m in MODELS.values() if m.size == size]
    wants_seed, parts = "seed" in key, set(key.split("-"))
    same_size.sort(
        key=lambda m: (
            parts != set(m.split("-")),  # the right parts in the wrong order (pythia-160m-v0-deduped)
            wants_seed != (MODELS[m].seed is not None),
            -difflib.SequenceMatcher(None, key, m).ratio(),
        )
    )
    return list(dict.fromkeys(same_size[:n] + similar))[:n]


def _unknown_pythia(name: str) -> ModelNotFoundError:
    matches = close_matches(name)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    standard_only = "/".join(s for s in SIZES if s not in DEDUPED_SIZES)
    return ModelNotFoundError(
        f"{name!r} is not a Pythia model.{hint} Known: pythia-<size>[-deduped][-v0] for sizes "
        f"{', '.join(SIZES)} ({standard_only}: standard only, no v0), "
        f"pythia-<{SEED_SIZES[0]}..{SEED_SIZES[-1]}>-seed<{SEEDS[0]}..{SEEDS[-1]}>, "
        f"pythia-160m-<data|weight>-seed<{DECOUPLED_SEEDS[0]}..{DECOUPLED_SEEDS[-1]}>; "
        "pythia_native.suite.model_names() lists them all."
    )


def _pythia_ref(name: str, *, warn: bool) -> ModelRef:
    key = name.strip().lower()
    renamed_from = None
    if key in RENAMED:
        renamed_from, key = name.strip(), RENAMED[key]
        if warn:
            old_size = renamed_from.lower().split("-")[1]
            warnings.warn(
                f"{renamed_from!r} is a Pythia name from before the January 2023 rename; loading "
                f"'{HUB_ORG}/{key}'. Work that used the old name ran the first training run, now "
                f"published as '{key}-v0' (pass that name to reproduce it). "
                f"({old_size} -> {RENAMED_SIZES[old_size]})",
                RenamedModelWarning,
                stacklevel=3,
            )
    model = MODELS.get(key)
    if model is None:
        raise _unknown_pythia(name)
    return ModelRef(model.repo_id, True, model.suite, renamed_from=renamed_from, model=model)


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", ".\\"))
        or text.endswith(("/", os.sep))
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
        or text in (".", "..")
    )


def resolve_model(name_or_path: Union[str, os.PathLike, ModelRef], *, warn: bool = True) -> ModelRef:
    """Resolve a model argument to a ``ModelRef``. No network access.

    Accepted, in this order:

    1. an existing directory (a checkpoint on disk): passes through;
    2. a Pythia name with or without the org, any case: ``pythia-160m``,
       ``EleutherAI/pythia-160m``, ``Pythia-1.4B-deduped``; old names
       (``pythia-19m``) resolve to the new one with a ``RenamedModelWarning``;
    3. any other hub repo id ``org/name`` (a third-party GPT-NeoX checkpoint,
       e.g. a bitsandbytes 4-bit copy): kept as typed, ``is_pythia=False``.

    Raises ``ModelNotFoundError`` for unknown ``pythia-*`` names (listing the
    closest names), for a path-like argument that is not a directory, and for
    anything that is neither a name, a repo id nor a directory.
    """
    if isinstance(name_or_path, ModelRef):
        return name_or_path
    path_given = isinstance(name_or_path, os.PathLike)
    text = os.fspath(name_or_path).strip() if path_given else str(name_or_path).strip()
    if not text:
        raise ModelNotFoundError("The model name is empty: pass a Pythia name (pythia-160m), a hub repo id or a directory.")
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelRef(None, False, None, local_path=path.resolve())
    if path_given or _looks_like_path(text):
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise ModelNotFoundError(
            f"Local checkpoint {text!r} {what}: pass the directory that holds config.json and the weights, "
            "or a hub repo id such as EleutherAI/pythia-160m."
        )
    if "/" in text:
        if not _REPO_ID_RE.fullmatch(text):
            raise ModelNotFoundError(
                f"{text!r} is not a valid hub repo id: use 'org/name' (letters, digits, '.', '_', '-'), "
                "e.g. EleutherAI/pythia-160m, or an existing directory."
            )
        org, repo = text.split("/")
        if org.lower() == HUB_ORG.lower() and repo.lower().startswith("pythia"):
            return _pythia_ref(repo, warn=warn)
        return ModelRef(text, False, None)
    if text.lower().startswith("pythia"):
        return _pythia_ref(text, warn=warn)
    matches = close_matches(text)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    raise ModelNotFoundError(
        f"{text!r} is neither a Pythia name (e.g. pythia-160m), a hub repo id (org/name) nor an existing "
        f"directory.{hint}"
    )


def _pythia_model(model: Union[str, ModelRef, SuiteModel]) -> SuiteModel:
    if isinstance(model, SuiteModel):
        return model
    ref = resolve_model(model, warn=False)
    if ref.model is None:
        raise RevisionError(
            f"{ref} is not a repo of the Pythia suite, so its branches are not known here: list them with "
            f"huggingface_hub.list_repo_refs({str(ref)!r})."
        )
    return ref.model


def revisions(model: Union[str, ModelRef, SuiteModel]) -> list[str]:
    """The step branches of a Pythia model, in training order (no network).

    154 for the current suite and seeds (``step0, step1, step2, step4, ...,
    step512, step1000, ..., step143000``), 143 for v0 (``step1000`` ...
    ``step143000``). ``main`` is valid too and equals ``step143000``; it is not
    repeated in the list. Raises ``RevisionError`` for repos outside the suite.
    """
    return [f"step{s}" for s in _pythia_model(model).steps]


def nearest_steps(steps: tuple[int, ...], step: int, k: int = 3) -> list[int]:
    """The ``k`` valid steps closest to ``step``, in increasing order."""
    return sorted(sorted(steps, key=lambda s: (abs(s - step), s))[:k])


def _describe_branches(model: SuiteModel) -> str:
    steps = model.steps
    if model.suite == "v0":
        return (f"its {len(steps)} branches step{steps[0]}, step{steps[1]}, ..., step{steps[-1]} "
                "(v0 models have no earlier branches)")
    early = [f"step{s}" for s in EARLY_STEPS]
    return (f"its {len(steps)} branches {', '.join(early[:4])}, ..., {early[-1]}, step{V0_STEPS[0]}, "
            f"step{V0_STEPS[1]}, ..., step{steps[-1]}")


def resolve_revision(
    model: Union[str, ModelRef, SuiteModel], revision: Union[str, int, None] = None
) -> str:
    """Validate and normalize a revision for ``model``, before any network access.

    - ``None`` -> ``"main"``;
    - a 40-hex commit hash -> itself, lower case (any repo);
    - Pythia repos: ``"main"``, ``"stepN"`` / ``"StepN"`` / ``"N"`` / ``N`` ->
      ``"stepN"`` when the suite has that branch; anything else raises
      ``RevisionError`` naming the nearest valid steps;
    - repos outside the suite: any non-empty string, unchanged;
    - local directories: only ``None`` / ``"main"`` (a directory has no branches).
    """
    if isinstance(model, SuiteModel):
        ref = ModelRef(model.repo_id, True, model.suite, model=model)
    else:
        ref = resolve_model(model, warn=False)
    if revision is None:
        return "main"
    # Any integer type (numpy's too: `for s in np.arange(...)` is a sweep); not a bool.
    if isinstance(revision, bool) or not isinstance(revision, (str, numbers.Integral)):
        raise RevisionError(f"revision must be a string such as 'main' or 'step1000', got {revision!r}.")
    text = revision.strip() if isinstance(revision, str) else str(int(revision))
    if not text:
        raise RevisionError("The revision is empty: pass 'main', a branch such as 'step1000', or a commit hash.")
    if ref.is_local:
        if text == "main":
            return "main"
        raise RevisionError(
            f"{ref} is a local directory, which has no revision {text!r}: pass the directory of the checkpoint "
            "you want, or a hub repo id with the revision."
        )
    if _HASH_RE.fullmatch(text):
        return text.lower()
    if ref.model is None:
        if not isinstance(revision, str):
            raise RevisionError(f"{ref} is not a Pythia repo: pass its revision as a branch name, not {revision!r}.")
        return text
    model_entry = ref.model
    if text.lower() == "main":
        return "main"
    match = _STEP_RE.fullmatch(text)
    if match is None:
        raise RevisionError(
            f"{text!r} is not a revision of {ref.repo_id}: use 'main' (= step{FINAL_STEP}), a 40-hex commit hash, "
            f"or one of {_describe_branches(model_entry)}."
        )
    step = int(match.group(1))
    if step in model_entry.steps:
        return f"step{step}"
    near = ", ".join(f"step{s}" for s in nearest_steps(model_entry.steps, step))
    raise RevisionError(
        f"{ref.repo_id} has no branch step{step}; nearest: {near}. Valid: 'main', a commit hash, or "
        f"{_describe_branches(model_entry)}."
    )


def revision_step(model: Union[str, ModelRef, SuiteModel], revision: Union[str, int, None]) -> Optional[int]:
    """The branch step of a Pythia revision: ``main`` -> 143000, ``stepN`` -> N; ``None`` for a commit hash."""
    rev = resolve_revision(model, revision)
    if rev == "main":
        return FINAL_STEP
    if rev.startswith("step"):
        return int(rev[4:])
    return None


def canonical_revision(model: Union[str, ModelRef, SuiteModel], revision: Union[str, int, None]) -> str:
    """One name per checkpoint: ``main`` -> ``step143000`` (the same checkpoint), ``stepN`` -> ``stepN``.

    Except for the repos in ``MAIN_IS_NOT_FINAL_STEP`` (pythia-2.8b, whose
    ``main`` was reported to serve another file than ``step143000``): their
    ``main`` stays ``main``.

    Use it to compare or de-duplicate revisions; download with the name the
    user gave. Commit hashes and revisions of non-Pythia repos come back as
    ``resolve_revision`` returns them.
    """
    rev = resolve_revision(model, revision)
    ref = model if isinstance(model, SuiteModel) else resolve_model(model, warn=False).model
    if rev == "main" and ref is not None and ref.name not in MAIN_IS_NOT_FINAL_STEP:
        return f"step{FINAL_STEP}"
    return rev


def optimizer_step(model: Union[str, ModelRef, SuiteModel], revision: Union[str, int, None]) -> Optional[int]:
    """The real optimizer step of a Pythia branch.

    Branch names count 2M-token steps. v0 160m, 410m and 1.4b were trained
    with 4M-token batches, so for them ``stepN`` is optimizer step ``N // 2``
    (v0 ``step1000`` is optimizer step 500); for every other model it is ``N``.
    ``None`` for a commit hash.
    """
    step = revision_step(model, revision)
    entry = _pythia_model(model)
    if step is not None and entry.suite == "v0" and entry.size in V0_DOUBLE_BATCH_SIZES:
        return step // 2
    return step


def tokens_seen(model: Union[str, ModelRef, SuiteModel], revision: Union[str, int, None]) -> Optional[int]:
    """Training tokens seen at a Pythia branch: ``step * 2,097,152`` (every model, v0 included)."""
    _pythia_model(model)
    step = revision_step(model, revision)
    return None if step is None else step * TOKENS_PER_STEP


# Known upstream data problems (reported on github.com/EleutherAI/pythia; see each message).
_28B_SAME_AS_MAIN = frozenset(
    EARLY_STEPS
    + tuple(range(1000, 53001, 1000))
    + (55000, 60000, 65000, 70000, 80000, 90000, 100000, 103000, 110000, 120000, 130000, 140000)
)
_28B_SECOND_BLOB = frozenset((54000, 56000, 57000, 58000, 59000, 61000, 62000, 63000, 64000, 143000))
_12B_FINAL_FIRST_SHARD = frozenset((50000, 58000))
#: Repos whose ``main`` is not the same checkpoint as ``step143000`` (EleutherAI/pythia#205).
MAIN_IS_NOT_FINAL_STEP = frozenset(("pythia-2.8b",))


def known_data_problems(model: Union[str, ModelRef, SuiteModel], revision: Union[str, int, None]) -> list[str]:
    """Reported problems with the weights a Pythia branch serves on the hub (empty if none known).

    - step0, step1 and step2 were reported to hold identical weights for the
      current-suite models (EleutherAI/pythia#83, #198);
    - pythia-2.8b: 76 branches (step0..step53000 and several round steps)
      serve the same file as ``main``, 10 more (incl. step143000) share a
      second final-era file, so ``main`` and ``step143000`` differ there
      (EleutherAI/pythia#205, #195);
    - pythia-12b: step50000 and step58000 serve the final checkpoint's first
      shard (embed_in and early layers) (EleutherAI/pythia#206);
    - pythia-160m-weight-seed{1,2}: branches from step1 on do not descend from
      the repo's own step0 (EleutherAI/pythia#203).

    These are warnings for researchers, not errors: the weights load.
    """
    ref = model if isinstance(model, SuiteModel) else resolve_model(model, warn=False).model
    if ref is None:
        return []
    rev = resolve_revision(ref, revision)
    step = revision_step(ref, rev)
    problems: list[str] = []
    if step is None:
        return problems
    name = ref.name
    if ref.suite == "current" and step in (0, 1, 2):
        problems.append(
            f"{name} step{step}: step0, step1 and step2 were reported to hold identical weights "
            "(EleutherAI/pythia#83, #198); do not read differences between them as training."
        )
    if name == "pythia-2.8b":
        if step in _28B_SAME_AS_MAIN:
            problems.append(
                f"{name} step{step} was reported to serve the same weight file as main (final-era weights, not "
                "this training step) (EleutherAI/pythia#205, #195)."
            )
        elif rev == "main":
            problems.append(
                f"{name} main was reported to serve a different file from step143000 (EleutherAI/pythia#205): "
                "for this model main == step143000 does not hold; name the branch you mean."
            )
        elif step in _28B_SECOND_BLOB:
            problems.append(
                f"{name} step{step}: steps 54000, 56000-59000, 61000-64000 and 143000 were reported to serve one "
                "shared final-era weight file, not their own training step (EleutherAI/pythia#205)."
            )
    if name == "pythia-12b" and step in _12B_FINAL_FIRST_SHARD:
        problems.append(
            f"{name} step{step} was reported to serve the final checkpoint's first shard (embed_in and the early "
            "layers) (EleutherAI/pythia#206)."
        )
    if name in ("pythia-160m-weight-seed1", "pythia-160m-weight-seed2"):
        problems.append(
            f"{name}: its branches from step1 on were reported not to descend from its own step0 "
            "(EleutherAI/pythia#203); do not measure distance from initialization against this step0."
        )
    return problems


def warn_known_data_problems(model: Union[str, ModelRef, SuiteModel], revision: Union[str, int, None]) -> list[str]:
    """Issue a ``CheckpointDataWarning`` for each ``known_data_problems`` entry; return the messages."""
    problems = known_data_problems(model, revision)
    for message in problems:
        warnings.warn(message, CheckpointDataWarning, stacklevel=2)
    return problems
