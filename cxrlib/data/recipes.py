"""Recipes: which rows of which public datasets make which class of a cohort.

A recipe is a small declarative file (YAML, or a dict) read into a :class:`Recipe`::

    name: realdata
    seed: 0
    sources:                      # name -> adapter (cxrlib.data.sources.ADAPTERS) + root
      covid-chestxray: {adapter: ieee8023, root: covid-chestxray}
      nih: {adapter: nih-cxr14, root: nih-cxr14-sample}
    classes:                      # class -> list of rules; a row joins when one rule matches
      covid:
        - source: covid-chestxray
          label: covid            # column: value  (equals, case-insensitive)
          view: [PA, AP]          # allowed normalised views ("" = missing)
      pneumonia:
        - source: nih
          finding: {contains: Pneumonia}   # equals | startswith | contains | one_of
    caps: {normal: 500}           # at most this many images per class (whole patients)

Roots are relative to a base folder given at run time (``build_manifest(recipe,
base_dir)``, notebook 01's ``DATA_ROOT``), so a recipe names no machine's paths; absolute
roots are refused. Recipes shipped with the package live in ``cxrlib/recipes/*.yaml``
(:func:`available_recipes`).

Every row a source offers either ends in the manifest or is a row of
:attr:`BuildReport.dropped` with one reason (:data:`DROP_REASONS`, first that applies):
``unreadable`` (the adapter could not use it: missing image file, empty id), ``unlabeled``
(finding empty / ``todo`` / unknown), ``non-frontal view`` (lateral), ``missing view``,
``view not allowed``, ``finding matches no class``, ``ambiguous`` (two classes take it),
``over cap``. :func:`kept_and_dropped` adds the later decoding and deduplication drops and
counts everything per source and class.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.data import manifest as mf
from cxrlib.data.dedup import DedupReport
from cxrlib.data.io import LoadReport
from cxrlib.data.sources import ADAPTERS, name_key, open_dataset
from cxrlib.errors import CxrInputError

#: Tests a rule condition can make on a manifest column (compared case-insensitively).
OPERATORS: tuple[str, ...] = ("equals", "startswith", "contains", "one_of")
#: Rule keys that are not column conditions.
_RULE_KEYS = ("source", "view")
#: Why an offered row is not in the manifest, in precedence order (the first that applies).
DROP_REASONS: tuple[str, ...] = (
    "unreadable", "unlabeled", "non-frontal view", "missing view", "view not allowed",
    "finding matches no class", "ambiguous", "over cap",
)
#: Drop reason of the copies :func:`cxrlib.data.dedup.deduplicate` removes.
DUPLICATE = "duplicate"
#: Columns of :attr:`BuildReport.dropped`.
DROPPED_COLUMNS: tuple[str, ...] = (
    "source", "image_id", "path", "label", "finding", "view", "class", "reason", "detail",
)
#: Normalised labels / raw findings (as :func:`cxrlib.data.sources.name_key` gives) that mean "no label".
UNLABELED: frozenset[str] = frozenset({"", "todo", "unknown"})
#: Class column of :func:`kept_and_dropped` for rows an adapter could not read (label unknown).
UNREAD_CLASS = "(not read)"


class RecipeError(CxrInputError):
    """A recipe that cannot be used; the message names the recipe and what is wrong."""


@dataclass(frozen=True)
class Condition:
    """``column`` passes ``operator`` against ``value`` (case-insensitive, spaces stripped)."""

    column: str
    operator: str
    value: str | tuple[str, ...]

    def test(self, values: pd.Series) -> pd.Series:
        """Boolean mask over ``values`` (a column as strings)."""
        text = values.str.strip().str.lower()
        if self.operator == "one_of":
            return text.isin([str(v).strip().lower() for v in self.value])
        target = str(self.value).strip().lower()
        if self.operator == "equals":
            return text == target
        if self.operator == "startswith":
            return text.str.startswith(target)
        return text.str.contains(target, regex=False)


@dataclass(frozen=True)
class Rule:
    """Rows of ``source`` that pass every condition and, if given, have a view in ``views``."""

    source: str
    conditions: tuple[Condition, ...] = ()
    views: tuple[str, ...] | None = None

    def conditions_pass(self, df: pd.DataFrame) -> pd.Series:
        """Boolean mask of the rows of ``df`` that pass every column condition (view ignored)."""
        keep = pd.Series(True, index=df.index)
        for condition in self.conditions:
            keep &= condition.test(mf._column(df, condition.column))
        return keep

    def select(self, df: pd.DataFrame) -> pd.Series:
        """Boolean mask of the rows of ``df`` (one source's manifest) this rule takes."""
        keep = self.conditions_pass(df)
        if self.views is not None:
            keep &= mf._column(df, "view").isin(self.views)
        return keep


@dataclass(frozen=True)
class Source:
    """A dataset folder: the adapter that reads it and its root relative to the base folder."""

    name: str
    adapter: str
    root: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A cohort definition: sources, per-class rules, per-class caps and a seed."""

    name: str
    sources: dict[str, Source]
    classes: dict[str, list[Rule]]
    caps: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``params.json``), in the YAML form :func:`recipe_from_dict` reads."""
        def rule(r: Rule) -> dict[str, Any]:
            out: dict[str, Any] = {"source": r.source}
            for c in r.conditions:
                out[c.column] = {c.operator: list(c.value) if isinstance(c.value, tuple) else c.value}
            if r.views is not None:
                out["view"] = list(r.views)
            return out

        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "sources": {n: {"adapter": s.adapter, "root": s.root, **s.options} for n, s in self.sources.items()},
            "classes": {label: [rule(r) for r in rules] for label, rules in self.classes.items()},
            "caps": dict(self.caps),
        }


def _condition(column: str, spec: Any, where: str) -> Condition:
    if isinstance(spec, (str, int, float)):
        return Condition(column, "equals", str(spec))
    if isinstance(spec, list):
        return Condition(column, "one_of", tuple(str(v) for v in spec))
    if isinstance(spec, dict) and len(spec) == 1:
        operator, value = next(iter(spec.items()))
        if operator not in OPERATORS:
            raise RecipeError(f"{where}: unknown test {operator!r} on {column!r}; use one of {OPERATORS}")
        if operator == "one_of":
            if not isinstance(value, list) or not value:
                raise RecipeError(f"{where}: one_of on {column!r} needs a non-empty list, got {value!r}")
            return Condition(column, operator, tuple(str(v) for v in value))
        if not isinstance(value, (str, int, float)):
            raise RecipeError(f"{where}: {operator} on {column!r} needs a text value, got {value!r}")
        return Condition(column, operator, str(value))
    raise RecipeError(
        f"{where}: condition on {column!r} must be a value, a list or one of "
        f"{{{', '.join(OPERATORS)}: value}}, got {spec!r}"
    )


def recipe_from_dict(data: dict[str, Any], *, where: str = "recipe") -> Recipe:
    """Check and convert a recipe's plain data (see the module docstring); ``where`` names
    the recipe in error messages. Raises :class:`RecipeError` naming every problem's place."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {"name", "description", "seed", "sources", "classes", "caps"})
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}")
    for key in ("sources", "classes"):
        if not isinstance(data.get(key), dict) or not data[key]:
            raise RecipeError(f"{where}: {key!r} must be a non-empty mapping")
    sources: dict[str, Source] = {}
    for name, spec in data["sources"].items():
        place = f"{where}: source {name!r}"
        if not isinstance(spec, dict) or "adapter" not in spec or "root" not in spec:
            raise RecipeError(f"{place} needs 'adapter' and 'root'")
        if spec["adapter"] not in ADAPTERS:
            raise RecipeError(f"{place}: unknown adapter {spec['adapter']!r}; known: {sorted(ADAPTERS)}")
        root = str(spec["root"])
        if Path(root).is_absolute() or root.startswith("~"):
            raise RecipeError(f"{place}: root {root!r} must be relative to the base folder given at run time")
        if ".." in Path(root.replace("\\", "/")).parts:  # would read outside the base folder
            raise RecipeError(f"{place}: root {root!r} may not contain '..'; it must lie inside the base folder")
        options = {k: v for k, v in spec.items() if k not in ("adapter", "root")}
        sources[str(name)] = Source(str(name), str(spec["adapter"]), root, options)
    classes: dict[str, list[Rule]] = {}
    for label, rules in data["classes"].items():
        place = f"{where}: class {label!r}"
        if not isinstance(rules, list) or not rules:
            raise RecipeError(f"{place} needs a non-empty list of rules")
        parsed = []
        for number, spec in enumerate(rules, start=1):
            rule_place = f"{place}, rule {number}"
            if not isinstance(spec, dict) or spec.get("source") not in sources:
                raise RecipeError(
                    f"{rule_place}: 'source' must name one of the sources {sorted(sources)}, "
                    f"got {spec.get('source') if isinstance(spec, dict) else spec!r}"
                )
            conditions = tuple(_condition(str(column), value, rule_place)
                               for column, value in spec.items() if column not in _RULE_KEYS)
            views = spec.get("view")
            if views is not None:
                views = (views,) if isinstance(views, str) else tuple("" if v is None else str(v) for v in views)
            parsed.append(Rule(spec["source"], conditions, views))
        classes[str(label)] = parsed
    caps = data.get("caps") or {}
    if not isinstance(caps, dict):
        raise RecipeError(f"{where}: 'caps' must map class -> number of images")
    for label, cap in caps.items():
        if label not in classes:
            raise RecipeError(f"{where}: cap for unknown class {label!r}; classes: {sorted(classes)}")
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise RecipeError(f"{where}: cap of {label!r} must be an integer >= 0 (0: no cap), got {cap!r}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"{where}: seed must be an integer, got {seed!r}")
    return Recipe(name=str(data.get("name") or where), sources=sources, classes=classes,
                  caps={str(k): int(v) for k, v in caps.items() if v}, seed=seed,
                  description=str(data.get("description") or ""))


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``cxrlib/recipes/``."""
    folder = resources.files("cxrlib") / "recipes"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def is_recipe_path(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` looks like a recipe file rather than a shipped recipe's name."""
    text = os.fspath(name_or_path)
    return text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A shipped recipe by name (``"realdata"``) or a recipe YAML file by path."""
    import yaml

    if is_recipe_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise RecipeError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    else:
        name = os.fspath(name_or_path)
        entry = resources.files("cxrlib") / "recipes" / f"{name}.yaml"
        if not entry.is_file():
            raise RecipeError(f"unknown recipe {name!r}; shipped recipes: {available_recipes()} "
                              "(or give the path of a .yaml file)")
        text, where = entry.read_text(encoding="utf-8"), f"recipe {name!r}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{where}: not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:  # thousands of nested brackets: no recipe looks like that
        raise RecipeError(f"{where}: YAML nested too deeply to be a recipe") from None
    return recipe_from_dict(data, where=where)


@dataclass
class BuildReport:
    """How a recipe became a manifest."""

    #: images per class and source (after caps)
    counts: pd.DataFrame
    #: every offered row left out, one reason each (columns :data:`DROPPED_COLUMNS`):
    #: ``label`` / ``finding`` / ``view`` are the adapter's normalised label, raw finding and
    #: raw view; ``class`` the recipe class for ``over cap`` rows; ``reason`` one of
    #: :data:`DROP_REASONS`; ``detail`` says what exactly
    dropped: pd.DataFrame
    #: rows the adapters could not use (``source, file, row, reason, kind``)
    skipped: pd.DataFrame
    #: rows each source offered before the rules
    offered: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict:
        """Plain-JSON numbers."""
        bad = self.skipped[self.skipped["kind"] == "bad"] if len(self.skipped) else self.skipped
        return {
            "rows_offered": {k: int(v) for k, v in self.offered.items()},
            "images_per_class_and_source": {
                str(label): {str(s): int(n) for s, n in row.items() if n}
                for label, row in self.counts.iterrows()
            },
            "dropped_by_reason": {str(k): int(v) for k, v in self.dropped["reason"].value_counts().items()},
            "adapter_rows_skipped": int(len(bad)),
            "adapter_rows_excluded": int(len(self.skipped) - len(bad)),
        }


def _cap(rows: pd.DataFrame, cap: int, seed: int) -> pd.Series:
    """Mask keeping at most ``cap`` rows, taking whole patients in a seeded random order."""
    patients = sorted(mf._column(rows, "patient_id").unique())
    order = np.random.default_rng(seed).permutation(len(patients))
    per_patient = mf._column(rows, "patient_id").value_counts()
    chosen, total = set(), 0
    for index in order:
        patient = patients[index]
        if total + per_patient[patient] > cap:
            continue
        chosen.add(patient)
        total += per_patient[patient]
    return mf._column(rows, "patient_id").isin(chosen)


def _views_text(views: set[str]) -> str:
    return "[" + ", ".join(repr(v) for v in sorted(views)) + "]"


def _why_no_class(rows: pd.DataFrame, rules: list[Rule]) -> tuple[pd.Series, pd.Series]:
    """Reason and detail for rows of one source that no rule took (see :data:`DROP_REASONS`).

    A view reason applies when no rule of the source accepts the row's view at all, or when
    some rule's conditions pass (so only its view list refused the row).
    """
    label, finding = mf._column(rows, "label"), mf._column(rows, "finding")
    view = mf._column(rows, "view")
    raw_view = mf._column(rows, "view_raw").where(mf._column(rows, "view_raw") != "", view)
    unlabeled = label.map(name_key).isin(UNLABELED) | finding.map(name_key).isin(UNLABELED - {""})
    matching_views: list[set[str] | None] = [set() for _ in range(len(rows))]
    conditions_pass = pd.Series(False, index=rows.index)
    for rule in rules:
        passing = rule.conditions_pass(rows)
        conditions_pass |= passing
        for position in np.flatnonzero(passing.to_numpy()):
            known = matching_views[position]
            matching_views[position] = None if rule.views is None or known is None else known | set(rule.views)
    accepted: set[str] | None = set()
    for rule in rules:
        accepted = None if rule.views is None or accepted is None else accepted | set(rule.views)
    if not rules:
        accepted = None  # a source no class uses: its views are not the reason
    view_refused = ~view.isin(sorted(accepted)) if accepted is not None else pd.Series(False, index=rows.index)
    reasons, details = [], []
    for position, index in enumerate(rows.index):
        text = finding[index] or label[index]
        if unlabeled[index]:
            reasons.append("unlabeled")
            details.append(f"finding {finding[index]!r} (label {label[index]!r})")
        elif view_refused[index] or conditions_pass[index]:
            allowed = matching_views[position] if conditions_pass[index] else accepted
            allowed_text = _views_text(allowed) if allowed is not None else "any"
            if view[index] == "L":
                reasons.append("non-frontal view")
                details.append(f"lateral view {raw_view[index]!r}; allowed views {allowed_text}")
            elif view[index] == "":
                reasons.append("missing view")
                given = f"view {raw_view[index]!r} is no known view" if raw_view[index] else "no view given"
                details.append(f"{given}; allowed views {allowed_text}")
            else:
                reasons.append("view not allowed")
                details.append(f"view {raw_view[index]!r} ({view[index]}); allowed views {allowed_text}")
        else:
            reasons.append("finding matches no class")
            details.append(f"finding {text!r} matches no rule" if rules else "no class takes rows of this source")
    return pd.Series(reasons, index=rows.index), pd.Series(details, index=rows.index)


def _dropped_rows(rows: pd.DataFrame, reason: str | pd.Series, detail: str | pd.Series,
                  classes: str | pd.Series = "") -> pd.DataFrame:
    """Rows of the combined source table as rows of :attr:`BuildReport.dropped`."""
    view = mf._column(rows, "view_raw").where(mf._column(rows, "view_raw") != "", mf._column(rows, "view"))
    return pd.DataFrame({
        "source": mf._column(rows, "source"), "image_id": mf._column(rows, "image_id"),
        "path": mf._column(rows, "path"), "label": mf._column(rows, "source_label"),
        "finding": mf._column(rows, "finding"), "view": view, "class": classes,
        "reason": reason, "detail": detail,
    }, index=rows.index, columns=list(DROPPED_COLUMNS))


def build_manifest(
    recipe: Recipe,
    base_dir: str | os.PathLike,
    *,
    seed: int | None = None,
) -> tuple[pd.DataFrame, BuildReport]:
    """Read every source of ``recipe`` under ``base_dir`` and keep the rows its rules take.

    Returns one manifest (absolute paths, under ``base_dir``) whose
    ``label`` is the recipe's class, the adapter's own label kept in ``source_label`` and
    the recipe's source name in ``source``; ``image_id`` is ``<source>:<id>``. A row taken by
    two classes is dropped (its class is ambiguous). Caps keep whole patients, chosen
    with ``seed`` (default: the recipe's).

    Every row an adapter offered, or listed as unusable (``kind == "bad"`` in its
    ``skipped``), that is not in the manifest is one row of ``report.dropped`` with the
    first reason of :data:`DROP_REASONS` that applies. The label and view reasons explain
    rows no class took; a row a class took is only dropped as ``ambiguous`` or ``over cap``.
    Rows an adapter excludes by design (e.g. CT rows of a collection read for X-rays) are
    not offered; they stay in ``report.skipped``.
    """
    base = Path(base_dir).expanduser().resolve()
    if not base.is_dir():
        raise FileNotFoundError(f"recipe {recipe.name!r}: base folder {base} does not exist")
    seed = recipe.seed if seed is None else seed
    frames, skipped, offered, unreadable = [], [], {}, []
    for name, source in recipe.sources.items():
        folder = base / source.root
        if not folder.is_dir():
            raise FileNotFoundError(
                f"recipe {recipe.name!r}: source {name!r} ({source.adapter}) expects {folder}; "
                f"give the folder that holds {source.root!r} as the base folder (DATA_ROOT)"
            )
        adapter = open_dataset(source.adapter, folder, **source.options)
        table = adapter.manifest()
        skipped.append(adapter.skipped_frame().assign(source=name))
        for item in adapter.skipped:
            if item.kind == "bad":
                unreadable.append({"source": name, "image_id": "", "path": "", "label": "", "finding": "",
                                   "view": "", "class": "", "reason": "unreadable",
                                   "detail": f"{Path(item.file).name} {item.row}: {item.reason}"})
        offered[name] = len(table)
        table = table.assign(image_id=name + ":" + mf._column(table, "image_id"),
                             source_label=mf._column(table, "label"), source=name)
        frames.append(table)
    everything = pd.concat(frames, ignore_index=True).fillna("").astype(str)

    taken = pd.DataFrame(False, index=everything.index, columns=list(recipe.classes))
    for label, rules in recipe.classes.items():
        for rule in rules:
            rows = everything["source"] == rule.source
            taken.loc[rows, label] |= rule.select(everything[rows])
    n_classes = taken.sum(axis=1)
    dropped = [pd.DataFrame(unreadable, columns=list(DROPPED_COLUMNS))]
    for name in recipe.sources:
        rows = everything[(everything["source"] == name) & (n_classes == 0)]
        if len(rows):
            rules = [rule for class_rules in recipe.classes.values() for rule in class_rules if rule.source == name]
            reason, detail = _why_no_class(rows, rules)
            dropped.append(_dropped_rows(rows, reason, detail))
    ambiguous = everything[n_classes > 1]
    if len(ambiguous):
        names = taken[n_classes > 1].apply(lambda row: ", ".join(c for c in taken.columns if row[c]), axis=1)
        dropped.append(_dropped_rows(ambiguous, "ambiguous", "taken by classes " + names))
    chosen = everything[n_classes == 1].copy()
    chosen["label"] = taken[n_classes == 1].idxmax(axis=1)

    keep = pd.Series(True, index=chosen.index)
    for label, cap in recipe.caps.items():
        rows = chosen["label"] == label
        if rows.sum() > cap:
            keep[rows] = _cap(chosen[rows], cap, seed)
            dropped.append(_dropped_rows(chosen[rows & ~keep], "over cap",
                                         f"class {label!r} capped at {cap} images", classes=label))
    result = chosen[keep].reset_index(drop=True)
    mf.validate(result, labels=(*mf.LABELS, *recipe.classes))
    counts = pd.crosstab(result["label"], result["source"]) if len(result) else pd.DataFrame()
    dropped_table = pd.concat([frame for frame in dropped if len(frame)] or dropped[:1])
    # the report names files relative to the base folder (DATA_ROOT), as the recipe does
    dropped_table = mf.relative_paths(dropped_table, base)
    order = {name: number for number, name in enumerate(recipe.sources)}
    dropped_table = (dropped_table.assign(_order=dropped_table["source"].map(order))
                     .sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True))
    report = BuildReport(
        counts=counts,
        dropped=dropped_table.astype(str),
        skipped=pd.concat(skipped, ignore_index=True) if skipped else pd.DataFrame(),
        offered=offered,
    )
    return result, report


def kept_and_dropped(
    manifest: pd.DataFrame,
    recipe_report: BuildReport,
    dedup_report: DedupReport | None = None,
    *,
    unreadable: LoadReport | Iterable[str] | None = None,
) -> pd.DataFrame:
    """Images kept and dropped, per source and class, with one column per drop reason.

    Parameters
    ----------
    manifest
        What :func:`build_manifest` returned (before deduplication).
    recipe_report
        Its report: the rows the recipe dropped.
    dedup_report
        :func:`cxrlib.data.dedup.deduplicate`'s report on ``manifest`` (or a subset of it):
        the copies it dropped count as ``duplicate``.
    unreadable
        Image files that could not be decoded after the recipe (a
        :class:`~cxrlib.data.io.LoadReport`, e.g. from :func:`cxrlib.data.dedup.hash_images`,
        or manifest ``path`` values): they count as ``unreadable``.

    Returns
    -------
    DataFrame indexed by ``(source, class)`` -- the recipe class for kept rows and those
    dropped after the recipe or over a cap, the adapter's normalised label (e.g.
    ``unknown``, ``pneumonia``) for rows no class took, :data:`UNREAD_CLASS` for rows an
    adapter could not read -- with integer columns ``kept``, every reason of
    :data:`DROP_REASONS`, ``duplicate`` and ``total``, and a last row ``("total", "")``.
    Each offered row is counted once.
    """
    if unreadable is None:
        bad_paths: set[str] = set()
    elif isinstance(unreadable, LoadReport):
        bad_paths = {item.path for item in unreadable.bad}
    else:
        bad_paths = {str(path) for path in unreadable}
    ids, paths = mf._column(manifest, "image_id"), mf._column(manifest, "path")
    unknown_paths = sorted(bad_paths - set(paths))
    if unknown_paths:
        raise ValueError(f"kept_and_dropped: unreadable path(s) not in the manifest: {mf._listing(unknown_paths)}")
    duplicates = set(dedup_report.dropped) if dedup_report is not None else set()
    unknown_ids = sorted(duplicates - set(ids))
    if unknown_ids:
        raise ValueError(f"kept_and_dropped: deduplication dropped image id(s) not in the manifest: "
                         f"{mf._listing(unknown_ids)} (give the manifest the deduplication ran on)")
    outcome = pd.Series("kept", index=manifest.index, dtype=object)
    outcome[ids.isin(duplicates)] = DUPLICATE
    outcome[paths.isin(bad_paths)] = "unreadable"
    dropped = recipe_report.dropped
    classes = mf._column(dropped, "class").where(mf._column(dropped, "class") != "", mf._column(dropped, "label"))
    classes = classes.where(classes != "", UNREAD_CLASS)
    rows = pd.concat([
        pd.DataFrame({"source": mf._column(manifest, "source"), "class": mf._column(manifest, "label"),
                      "outcome": outcome}),
        pd.DataFrame({"source": mf._column(dropped, "source"), "class": classes,
                      "outcome": mf._column(dropped, "reason")}),
    ], ignore_index=True)
    columns = ["kept", *DROP_REASONS, DUPLICATE]
    table = (pd.crosstab([rows["source"], rows["class"]], rows["outcome"])
             .reindex(columns=columns, fill_value=0).astype(int))
    table.columns.name = None
    table["total"] = table.sum(axis=1)
    table.loc[("total", ""), :] = table.sum(axis=0)
    return table.astype(int)


def kept_and_dropped_totals(table: pd.DataFrame) -> dict:
    """Plain-JSON totals of a :func:`kept_and_dropped` table: ``{"all": {column: n}, "per_source":
    {source: {column: n}}}`` (per source only the non-zero columns)."""
    body = table.drop(index="total", level=0, errors="ignore")
    per_source = body.groupby(level=0).sum()
    return {
        "all": {str(column): int(n) for column, n in body.sum(axis=0).items()},
        "per_source": {str(source): {str(column): int(n) for column, n in row.items() if n}
                       for source, row in per_source.iterrows()},
    }
