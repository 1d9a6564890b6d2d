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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.data import manifest as mf
from cxrlib.data.sources import ADAPTERS, open_dataset

#: Tests a rule condition can make on a manifest column (compared case-insensitively).
OPERATORS: tuple[str, ...] = ("equals", "startswith", "contains", "one_of")
#: Rule keys that are not column conditions.
_RULE_KEYS = ("source", "view")


class RecipeError(ValueError):
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

    def select(self, df: pd.DataFrame) -> pd.Series:
        """Boolean mask of the rows of ``df`` (one source's manifest) this rule takes."""
        keep = pd.Series(True, index=df.index)
        for condition in self.conditions:
            keep &= condition.test(mf._column(df, condition.column))
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
        text, where = path.read_text(encoding="utf-8"), str(path)
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
        raise RecipeError(f"{where}: not valid YAML: {error}") from None
    return recipe_from_dict(data, where=where)


@dataclass
class BuildReport:
    """How a recipe became a manifest."""

    #: images per class and source (after caps)
    counts: pd.DataFrame
    #: rows left out, with ``source, image_id, reason`` (ambiguous class, cap)
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
            "dropped_by_reason": {str(k): int(v) for k, v in
                                  self.dropped["reason"].str.split(":").str[0].value_counts().items()},
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


def build_manifest(
    recipe: Recipe,
    base_dir: str | os.PathLike,
    *,
    seed: int | None = None,
) -> tuple[pd.DataFrame, BuildReport]:
    """Read every source of ``recipe`` under ``base_dir`` and keep the rows its rules take.

    Returns one manifest (``attrs["root"]`` = ``base_dir``, paths relative to it) whose
    ``label`` is the recipe's class, the adapter's own label kept in ``source_label`` and
    the recipe's source name in ``source``; ``image_id`` is ``<source>:<id>``. A row taken by
    two classes is dropped (its class is ambiguous). Caps keep whole patients, chosen
    with ``seed`` (default: the recipe's). Every drop is a row of the report.
    """
    base = Path(base_dir).expanduser().resolve()
    if not base.is_dir():
        raise FileNotFoundError(f"recipe {recipe.name!r}: base folder {base} does not exist")
    seed = recipe.seed if seed is None else seed
    frames, skipped, offered = [], [], {}
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
        offered[name] = len(table)
        table = mf.rebase_paths(table, adapter.root, base)
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
    dropped = []
    ambiguous = n_classes > 1
    for index in everything.index[ambiguous]:
        classes = ", ".join(c for c in taken.columns if taken.at[index, c])
        dropped.append({"source": everything.at[index, "source"], "image_id": everything.at[index, "image_id"],
                        "reason": f"ambiguous: taken by classes {classes}"})
    chosen = everything[n_classes == 1].copy()
    chosen["label"] = taken[n_classes == 1].idxmax(axis=1)

    keep = pd.Series(True, index=chosen.index)
    for label, cap in recipe.caps.items():
        rows = chosen["label"] == label
        if rows.sum() > cap:
            keep[rows] = _cap(chosen[rows], cap, seed)
            for index in chosen.index[rows & ~keep]:
                dropped.append({"source": chosen.at[index, "source"], "image_id": chosen.at[index, "image_id"],
                                "reason": f"cap: class {label!r} capped at {cap} images"})
    result = chosen[keep].reset_index(drop=True)
    result.attrs["root"] = str(base)
    mf.validate(result)
    counts = pd.crosstab(result["label"], result["source"]) if len(result) else pd.DataFrame()
    report = BuildReport(
        counts=counts,
        dropped=pd.DataFrame(dropped, columns=["source", "image_id", "reason"]),
        skipped=pd.concat(skipped, ignore_index=True) if skipped else pd.DataFrame(),
        offered=offered,
    )
    return result, report
